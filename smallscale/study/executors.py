"""Run a study: prepare its datasets, expand its grid, run every run (train + evals), idempotently.

Study directory (everything a later stage or a rerun needs is on disk):

    study.yaml       the study file as given          manifest.json   the expanded runs (grid.py)
    data/<name>/     prepared datasets                runs/<id>/      run dirs (+ status.json, log.txt)
    results.csv/.parquet  one row per run (results.py) report/         (report.py)

Each run's `status.json` records its state: running (host, pid, stage), done, or failed (error).
Rerunning a study skips done runs and resumes the others from their latest checkpoint; evals that
already have a result file are not run again. One failed run never stops the study.

One writer per folder (`smallscale.lock`): the process that trains a run (its worker, or its SLURM
job) holds the run directory's lock for the whole train + evals, and only the lock holder writes a
run's status.json. So `running` means "a live process holds the lock" (read from the lock, on any
host that shares the filesystem's locks), and a `running` record whose lock is free reads
`interrupted`. Two `study run` processes on one study directory (a second terminal, a rerun while
the first still runs, a requeued SLURM job racing a manual rerun) share the work instead of
refusing or repeating it: each skips the runs another process owns, trains the rest, then waits
until the runs owned by others have ended (running again any whose owner died before finishing), so
both end with the same complete study. Sharing is the choice over "exit at once naming the owner"
because the run lock has to exist anyway (requeued SLURM jobs), and with it a second process costs
nothing and finishes early work: two people, or a driver per node, can run one study together.
The study directory's own lock is held only while planning (datasets, manifest.json) and while
writing results and the report; a second `study run` waits for those, which are short.

Executors:
  local   one run at a time, each in its own process (a crash or OOM fails only that run);
  pool    `workers` runs at once; on a machine with GPUs one run per GPU (CUDA_VISIBLE_DEVICES);
  slurm   submitit job array (`slurm.py`); preempted jobs are requeued and resume from checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smallscale import lock as folder_lock
from smallscale.errors import Stopped, UserError
from smallscale.hardware import usable_cpus
from smallscale.io import atomic_write_json, atomic_write_text, no_space_message
from smallscale.study.grid import RunSpec, StudySpec, dataset_dir, expand, load_study
from smallscale.study.progress import StudyProgress

if TYPE_CHECKING:
    from smallscale.train.trackers import RunLabels

MANIFEST = "manifest.json"
STATES = ("done", "running", "interrupted", "failed", "pending")
BUSY_EXIT = 3  # a worker's exit status when another process owns its run (not a failure of the run)


# ----------------------------------------------------------------------------- planning
def plan(
    spec_path: str | Path, study_dir: str | Path, progress: bool = True, spec: StudySpec | None = None
) -> tuple[StudySpec, list[RunSpec]]:
    """Copy the study file, prepare its datasets (skipping finished ones) and write manifest.json.
    `spec`: the file already parsed, if the caller has it."""
    from smallscale.config import validate
    from smallscale.data.mixture import prepare_mixture, study_mixture
    from smallscale.data.shards import PrepareConfig, load_manifest, prepare
    from smallscale.study.grid import mixture_sources

    spec = spec if spec is not None else load_study(spec_path)
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study_dir / "study.yaml", Path(spec_path).read_text(encoding="utf-8"))
    vocab_sizes, train_tokens = {}, {}
    sources_only = mixture_sources(spec.datasets)
    for name, ds in spec.datasets.items():
        if name in sources_only:
            continue  # prepared inside each mixture that names it, with that mixture's tokenizer
        path = dataset_dir(study_dir, name, ds)
        if ds.mix is not None and not (path / "manifest.json").exists():
            datasets = {n: d.model_dump() for n, d in spec.datasets.items()}
            prepare_mixture(study_mixture(ds.mix, datasets, path, f"study dataset {name!r}"), progress=progress)
        if ds.source is not None and not (path / "manifest.json").exists():
            options = {k: v for k, v in ds.model_dump().items() if k != "path" and v is not None}
            prepare(validate(PrepareConfig, {**options, "out": str(path)}, source=f"study dataset {name!r}"), progress=progress)
        if not (path / "manifest.json").exists():
            raise UserError(f"study dataset {name!r}: {str(path)!r} is not a prepared dataset (no manifest.json)")
        manifest = load_manifest(path)
        vocab_sizes[name], train_tokens[name] = manifest["vocab_size"], manifest["splits"]["train"]["tokens"]
    runs = expand(spec, study_dir, vocab_sizes, train_tokens)
    atomic_write_json(study_dir / MANIFEST, {"name": spec.name, "description": spec.description,
                                             "runs": [r.as_dict() for r in runs]})  # fmt: skip
    return spec, runs


def load_runs(study_dir: str | Path) -> list[RunSpec]:
    path = Path(study_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{str(study_dir)!r} is not a study directory (no {MANIFEST}); run `smallscale study run STUDY.yaml` first")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [RunSpec(**r) for r in data["runs"]]


# ----------------------------------------------------------------------------- status
def run_dir(study_dir: str | Path, run_id: str) -> Path:
    return Path(study_dir) / "runs" / run_id


def read_status(study_dir: str | Path, run_id: str) -> dict[str, Any]:
    """{"state": one of STATES, ...}. A 'running' run names its `owner` (pid, host, since) and how
    that is known (`owner_liveness`); a 'running' record whose run lock is free reads 'interrupted'."""
    out = run_dir(study_dir, run_id)
    path = out / "status.json"
    if not path.exists():
        return {"state": "pending"}
    status = json.loads(path.read_text(encoding="utf-8"))
    if status["state"] != "running":
        return status
    holder = folder_lock.owner(out)
    if holder is None:
        where = f"process {status.get('pid')} on host {status.get('host')}"
        return {**status, "state": "interrupted", "error": f"{where} ended during {status.get('stage')}"}
    return {**status, "owner": holder.describe(), "owner_liveness": holder.liveness}


def _write_status(path: Path, **fields: Any) -> dict[str, Any]:
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    status = {**previous, **fields, "updated": time.time()}
    atomic_write_json(path, status)
    return status


# ----------------------------------------------------------------------------- one run
def run_one(study_dir: str | Path, run_id: str, progress: bool = False) -> dict[str, Any]:
    """Train (or resume) one run of the study and run its evals, holding the run directory's lock
    throughout; never raises for a run's failure. FolderBusy (before anything is written) when
    another process owns the run."""
    spec = next((r for r in load_runs(study_dir) if r.id == run_id), None)
    if spec is None:
        raise UserError(f"run {run_id!r} is not in {str(Path(study_dir) / MANIFEST)!r}")
    from smallscale.train.trackers import RunLabels

    out = run_dir(study_dir, run_id)
    # In a tracker the study is the group and the axes are the tags: its runs table is the study grid.
    study_name = json.loads((Path(study_dir) / MANIFEST).read_text(encoding="utf-8")).get("name")
    with folder_lock.hold(out, "study worker"):
        return _run_owned(spec, out, progress, RunLabels(group=study_name, tags=spec.axes))


def _run_owned(spec: RunSpec, out: Path, progress: bool, labels: RunLabels) -> dict[str, Any]:
    from smallscale.config import validate
    from smallscale.eval.runs import load_run
    from smallscale.eval.tasks.registry import result_path, run_task
    from smallscale.train import checkpoint
    from smallscale.train.trainer import RunConfig, train

    run_id = spec.id
    status_path = out / "status.json"
    previous = json.loads(status_path.read_text(encoding="utf-8")) if status_path.exists() else {}
    if previous.get("state") == "done":
        return previous
    found = checkpoint.latest(out / "checkpoints")
    status = _write_status(
        status_path, state="running", stage="train", host=socket.gethostname(), pid=os.getpid(), started=time.time(),
        attempts=previous.get("attempts", 0) + 1, resumed_from_step=found.state["step"] if found else 0, error=None,
    )  # fmt: skip
    try:
        cfg = validate(RunConfig, {**spec.config, "out": str(out)}, source=f"run {run_id}")
        summary = train(cfg, resume=True, progress=progress, labels=labels)
        if spec.evals:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            loaded = None
            for ev in spec.evals:
                name = ev.get("name") or ev["task"]
                if result_path(out, name).exists():
                    continue
                _write_status(status_path, stage=f"eval:{name}")
                loaded = loaded or load_run(out, device=device)
                result = run_task(ev["task"], loaded, limit=ev.get("limit"), batch_size=ev.get("batch_size"),
                                  device=device, **ev.get("options", {}))  # fmt: skip
                atomic_write_json(result_path(out, name), result)
        return _write_status(status_path, state="done", stage=None, finished=time.time(), val_bpb=summary.get("val_bpb"))
    except Stopped as exc:  # SIGTERM: the run checkpointed; the study stops too, and a rerun resumes it
        _write_status(status_path, state="interrupted", error=str(exc), finished=time.time())
        raise
    except Exception as exc:  # one run's failure is recorded, never fatal to the study
        full = no_space_message(exc)
        message = str(exc) if isinstance(exc, UserError) else full or f"{type(exc).__name__}: {exc}"
        if full is None:  # a full disk is no bug: its one line is the error, which `main` logs
            with open(out / "log.txt", "a", encoding="utf-8") as log:
                log.write(traceback.format_exc())
        return _write_status(status_path, state="failed", error=message, finished=time.time())


# ----------------------------------------------------------------------------- executors
def todo(study_dir: str | Path, runs: list[RunSpec], retry_failed: bool = True) -> list[RunSpec]:
    skip = {"done", "running"} | (set() if retry_failed else {"failed"})
    return [r for r in runs if read_status(study_dir, r.id)["state"] not in skip]


def execute(
    study_dir: str | Path,
    runs: list[RunSpec],
    kind: str = "local",
    workers: int | None = None,
    slurm: dict[str, Any] | None = None,
    retry_failed: bool = True,
    progress: bool = True,
) -> dict[str, int]:
    """Run what is not done yet, skipping the runs other processes own, then wait for those (and run
    any whose owner died before finishing); returns the count of runs per state afterwards."""
    if kind not in ("local", "pool", "slurm", "submitit-local"):
        raise UserError(f"executor {kind!r} is unknown; choose local, pool, slurm or submitit-local")
    study_dir = Path(study_dir)
    pending = todo(study_dir, runs, retry_failed)
    while True:
        if pending and kind in ("local", "pool"):
            gpus = _gpu_count() if kind == "pool" else 0
            n = 1 if kind == "local" else (workers or gpus or default_cpu_workers(usable_cpus()))
            _run_processes(study_dir, pending, n, gpus=gpus, progress=progress, total=len(runs), all_runs=runs)
        elif pending:
            from smallscale.study.slurm import submit_and_wait

            submit_and_wait(study_dir, [r.id for r in pending], slurm or {}, cluster="local" if kind == "submitit-local" else None)
        waited = _wait_for_other_owners(study_dir, runs)
        pending = [r for r in runs if r.id in waited and read_status(study_dir, r.id)["state"] in ("interrupted", "pending")]
        if not pending:
            return counts(study_dir, runs)


def _wait_for_other_owners(study_dir: Path, runs: list[RunSpec]) -> set[str]:
    """Block while other processes own runs of this study; returns the ids of the runs waited for."""
    waited: set[str] = set()
    told: set[tuple[str, int]] = set()
    while True:
        owners = {r.id: o for r in runs if (o := folder_lock.owner(run_dir(study_dir, r.id))) is not None}
        if not owners:
            return waited
        waited |= set(owners)
        if {(o.host, o.pid) for o in owners.values()} - told:
            who = "; ".join(sorted({o.describe() for o in owners.values()}))
            print(f"waiting for {len(owners)} run(s) that other processes are training: {who}", file=sys.stderr, flush=True)
            told |= {(o.host, o.pid) for o in owners.values()}
        time.sleep(folder_lock.WAIT_POLL_S)


def counts(study_dir: str | Path, runs: list[RunSpec]) -> dict[str, int]:
    out = dict.fromkeys(STATES, 0)
    for r in runs:
        out[read_status(study_dir, r.id)["state"]] += 1
    return out


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_cpu_workers(cpus: int) -> int:
    """The pool's worker count on a machine without GPUs: one single-thread run per usable core.
    bench/bench_threads.py --part pool (AMD EPYC Zen 5, 2 cores, two runs of cpu-2m (its former 7 x 112 shape) of 10 steps of 2048
    tokens, medians of 2): pool of 2 single-thread workers 13.5 s wall (6.3k tokens/s each) against
    19.9 s one after the other with 2 threads (10.0k tokens/s); bf16 11.7 s vs 18.2 s. Before this
    policy, 2 workers of 2 threads each oversubscribed the cores: 43.0 s (fp32), 26.7 s (bf16)."""
    return cpus


def worker_threads(slot: int, workers: int, cpus: int) -> int:
    """CPU threads of pool worker `slot` (0-based) of `workers`: the `cpus` usable cores shared out,
    the first `cpus % workers` slots taking one more, at least 1 each."""
    return max(1, cpus // workers + (slot < cpus % workers))


def worker_env(slot: int, workers: int, cpus: int, gpus: int, environ: dict[str, str]) -> dict[str, str]:
    """The environment of pool worker `slot`: its GPU (one each, in turn) and its share of the CPU
    cores as OMP_NUM_THREADS / MKL_NUM_THREADS, which torch reads at import and the trainer keeps,
    so that N runs at once start N x cores threads no longer. A user's OMP_NUM_THREADS is kept."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(worker_threads(slot, workers, cpus))
    return env


def _worker_command(study_dir: Path, run_id: str) -> list[str]:
    return [sys.executable, "-m", "smallscale.study.executors", str(study_dir), run_id]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the study process dies (Linux), so a killed
    study never leaves orphaned training processes writing into its directory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


def _run_processes(
    study_dir: Path, runs: list[RunSpec], n: int, gpus: int, progress: bool, total: int, all_runs: list[RunSpec] | None = None
) -> None:
    """Keep up to `n` worker processes busy; each writes its own log.txt and status.json. A run that
    is done, or owned by another process, by the time its turn comes is passed over."""
    queue = list(runs)
    active: dict[int, tuple[subprocess.Popen, RunSpec, Any]] = {}  # slot -> (process, run, log file)
    cpus = usable_cpus()
    if n > cpus and "OMP_NUM_THREADS" not in os.environ:
        warnings.warn(f"{n} workers share {cpus} usable CPU cores: each runs 1 thread and they take turns on the cores; "
                      f"--workers {cpus} or fewer runs them side by side", stacklevel=3)  # fmt: skip
    view = _view(study_dir, progress, all_runs or runs, total - len(runs))
    try:
        while queue or active:
            for slot in [s for s in range(n) if s not in active]:
                spec = _next_startable(study_dir, queue, view)
                if spec is None:
                    break
                out = run_dir(study_dir, spec.id)
                out.mkdir(parents=True, exist_ok=True)
                log = open(out / "log.txt", "a", encoding="utf-8")  # noqa: SIM115 (closed when the process ends)
                env = worker_env(slot, n, cpus, gpus, dict(os.environ))
                proc = subprocess.Popen(_worker_command(study_dir, spec.id), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
                active[slot] = (proc, spec, log)
                view.started(spec.id)
            time.sleep(0.2)
            view.refresh([spec.id for _, spec, _ in active.values()], [spec.id for spec in queue])
            for slot, (proc, spec, log) in list(active.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del active[slot]
                if proc.returncode == BUSY_EXIT:  # another process took the run first; waited for later
                    view.finished(spec.id, "taken by another process", counted=False)
                    continue
                if read_status(study_dir, spec.id)["state"] not in ("done", "failed", "interrupted"):  # killed from outside (OOM killer, SIGKILL)
                    tail = _tail(run_dir(study_dir, spec.id) / "log.txt")
                    record_failure(run_dir(study_dir, spec.id), f"worker exited with code {proc.returncode}: {tail}")
                view.finished(spec.id, read_status(study_dir, spec.id)["state"])
    finally:
        for proc, _, log in active.values():
            proc.terminate()
            log.close()
        view.stop()


def _next_startable(study_dir: Path, queue: list[RunSpec], view: StudyProgress) -> RunSpec | None:
    """Pop runs off `queue` until one that is not done and that no other process owns."""
    while queue:
        spec = queue.pop(0)
        if read_status(study_dir, spec.id)["state"] == "done":
            view.note(f"run {spec.id} done by another process", counted=True)
        elif (holder := folder_lock.owner(run_dir(study_dir, spec.id))) is not None:
            view.note(f"run {spec.id} skipped: owned by {holder.describe()}")
        else:
            return spec
    return None


def record_failure(out: Path, error: str) -> None:
    """Record a run as failed whose process died outside `run_one`, unless it has ended or another
    process owns it by now (only a run's lock holder writes its status.json)."""
    try:
        with folder_lock.hold(out, "recording a worker's exit"):
            path = out / "status.json"
            state = json.loads(path.read_text(encoding="utf-8"))["state"] if path.exists() else None
            if state not in ("done", "failed"):
                _write_status(path, state="failed", error=error, finished=time.time())
    except folder_lock.FolderBusy:
        pass


def _tail(path: Path, n: int = 300) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip() if path.exists() else ""
    return " ".join(text[-n:].split())


def _view(study_dir: Path, progress: bool, runs: list[RunSpec], done: int) -> StudyProgress:
    """The study's live view (smallscale/study/progress.py): bars in a terminal, plain lines in a
    log; with progress off, plain lines only for runs starting and ending (never a periodic line)."""
    if progress:
        return StudyProgress(study_dir, runs, done=done)
    return StudyProgress(study_dir, runs, done=done, interactive=False, every_s=float("inf"))


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m smallscale.study.executors STUDY_DIR RUN_ID`."""
    from smallscale.launch import ensure_cpu_allocator_env

    ensure_cpu_allocator_env()
    study_dir, run_id = (argv or sys.argv[1:])[:2]
    try:
        status = run_one(study_dir, run_id)
    except folder_lock.FolderBusy as busy:
        print(f"run {run_id} skipped: {busy}", file=sys.stderr)
        return BUSY_EXIT
    except Stopped as stopped:
        print(f"run {run_id}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except Exception as exc:  # a full disk outside train + evals (the run's lock, status.json): one line
        line = no_space_message(exc)
        if line is None:
            raise
        print(f"run {run_id} failed: {line}", file=sys.stderr)
        return 1
    if status["state"] == "failed":
        print(f"run {run_id} failed: {status['error']}", file=sys.stderr)
    return 0 if status["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
