"""Run a study: prepare its datasets, expand its grid, run every run (train + evals), idempotently.

Study directory (everything a later stage or a rerun needs is on disk):

    study.yaml       the study file as given          manifest.json   the expanded runs (grid.py)
    data/<name>/     prepared datasets                runs/<id>/      run dirs (+ status.json, log.txt)
    results.csv/.parquet  one row per run (results.py) report/         (report.py)

Each run's `status.json` records its state: running (host, pid, stage), done, or failed (error).
Rerunning a study skips done runs and resumes the others from their latest checkpoint; evals that
already have a result file are not run again. One failed run never stops the study.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smallscale.errors import UserError
from smallscale.io import atomic_write_json, atomic_write_text
from smallscale.study.grid import RunSpec, StudySpec, dataset_dir, expand, load_study

MANIFEST = "manifest.json"
STATES = ("done", "running", "interrupted", "failed", "pending")


# ----------------------------------------------------------------------------- planning
def plan(
    spec_path: str | Path, study_dir: str | Path, progress: bool = True, spec: StudySpec | None = None
) -> tuple[StudySpec, list[RunSpec]]:
    """Copy the study file, prepare its datasets (skipping finished ones) and write manifest.json.
    `spec`: the file already parsed, if the caller has it."""
    from smallscale.config import validate
    from smallscale.data.shards import PrepareConfig, load_manifest, prepare

    spec = spec if spec is not None else load_study(spec_path)
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study_dir / "study.yaml", Path(spec_path).read_text(encoding="utf-8"))
    vocab_sizes, train_tokens = {}, {}
    for name, ds in spec.datasets.items():
        path = dataset_dir(study_dir, name, ds)
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
    """{"state": one of STATES, ...}; a 'running' run whose process is gone reads 'interrupted'."""
    path = run_dir(study_dir, run_id) / "status.json"
    if not path.exists():
        return {"state": "pending"}
    status = json.loads(path.read_text(encoding="utf-8"))
    if status["state"] == "running" and status.get("host") == socket.gethostname() and not _alive(status.get("pid")):
        status = {**status, "state": "interrupted", "error": f"process {status.get('pid')} ended during {status.get('stage')}"}
    return status


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_status(path: Path, **fields: Any) -> dict[str, Any]:
    previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    status = {**previous, **fields, "updated": time.time()}
    atomic_write_json(path, status)
    return status


# ----------------------------------------------------------------------------- one run
def run_one(study_dir: str | Path, run_id: str, progress: bool = False) -> dict[str, Any]:
    """Train (or resume) one run of the study and run its evals; never raises for a run's failure."""
    from smallscale.config import validate
    from smallscale.eval.runs import load_run
    from smallscale.eval.tasks.registry import result_path, run_task
    from smallscale.train import checkpoint
    from smallscale.train.trainer import RunConfig, train

    spec = next((r for r in load_runs(study_dir) if r.id == run_id), None)
    if spec is None:
        raise UserError(f"run {run_id!r} is not in {str(Path(study_dir) / MANIFEST)!r}")
    out = run_dir(study_dir, run_id)
    out.mkdir(parents=True, exist_ok=True)
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
        summary = train(cfg, resume=True, progress=progress)
        if spec.evals:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            loaded = None
            for ev in spec.evals:
                name = ev.get("name") or ev["task"]
                if result_path(out, name).exists():
                    continue
                status = _write_status(status_path, stage=f"eval:{name}")
                loaded = loaded or load_run(out, device=device)
                result = run_task(ev["task"], loaded, limit=ev.get("limit"), batch_size=ev.get("batch_size"),
                                  device=device, **ev.get("options", {}))  # fmt: skip
                atomic_write_json(result_path(out, name), result)
        return _write_status(status_path, state="done", stage=None, finished=time.time(), val_bpb=summary.get("val_bpb"))
    except Exception as exc:  # one run's failure is recorded, never fatal to the study
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
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
    """Run what is not done yet; returns the count of runs per state afterwards."""
    pending = todo(study_dir, runs, retry_failed)
    if kind in ("local", "pool"):
        n = 1 if kind == "local" else (workers or _gpu_count() or 1)
        _run_processes(Path(study_dir), pending, n, gpus=_gpu_count() if kind == "pool" else 0, progress=progress,
                       total=len(runs))  # fmt: skip
    elif kind in ("slurm", "submitit-local"):
        from smallscale.study.slurm import submit_and_wait

        submit_and_wait(Path(study_dir), [r.id for r in pending], slurm or {}, cluster="local" if kind == "submitit-local" else None)
    else:
        raise UserError(f"executor {kind!r} is unknown; choose local, pool, slurm or submitit-local")
    return counts(study_dir, runs)


def counts(study_dir: str | Path, runs: list[RunSpec]) -> dict[str, int]:
    out = dict.fromkeys(STATES, 0)
    for r in runs:
        out[read_status(study_dir, r.id)["state"]] += 1
    return out


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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


def _run_processes(study_dir: Path, runs: list[RunSpec], n: int, gpus: int, progress: bool, total: int) -> None:
    """Keep up to `n` worker processes busy; each writes its own log.txt and status.json."""
    queue = list(runs)
    active: dict[int, tuple[subprocess.Popen, RunSpec, Any]] = {}  # slot -> (process, run, log file)
    bar, advance = _progress(progress, total, total - len(runs))
    try:
        while queue or active:
            for slot in [s for s in range(n) if s not in active]:
                if not queue:
                    break
                spec = queue.pop(0)
                out = run_dir(study_dir, spec.id)
                out.mkdir(parents=True, exist_ok=True)
                log = open(out / "log.txt", "a", encoding="utf-8")  # noqa: SIM115 (closed when the process ends)
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                proc = subprocess.Popen(_worker_command(study_dir, spec.id), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
                active[slot] = (proc, spec, log)
                advance(f"running {spec.id}")
            time.sleep(0.2)
            for slot, (proc, spec, log) in list(active.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del active[slot]
                status = read_status(study_dir, spec.id)
                if status["state"] not in ("done", "failed"):  # killed from outside (OOM killer, signal)
                    tail = _tail(run_dir(study_dir, spec.id) / "log.txt")
                    _write_status(run_dir(study_dir, spec.id) / "status.json", state="failed",
                                  error=f"worker exited with code {proc.returncode}: {tail}", finished=time.time())  # fmt: skip
                advance(f"{spec.id}: {read_status(study_dir, spec.id)['state']}", done=1)
    finally:
        for proc, _, log in active.values():
            proc.terminate()
            log.close()
        if bar is not None:
            bar.stop()


def _tail(path: Path, n: int = 300) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip() if path.exists() else ""
    return " ".join(text[-n:].split())


def _progress(enabled: bool, total: int, completed: int) -> tuple[Any, Callable[..., None]]:
    if not enabled:
        return None, lambda *a, **k: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("study"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   TextColumn("{task.description}"))  # fmt: skip
    task = bar.add_task("", total=total, completed=completed)
    bar.start()
    return bar, lambda text="", done=0: bar.update(task, advance=done, description=text)


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m smallscale.study.executors STUDY_DIR RUN_ID`."""
    from smallscale.launch import ensure_cpu_allocator_env

    ensure_cpu_allocator_env()
    study_dir, run_id = (argv or sys.argv[1:])[:2]
    status = run_one(study_dir, run_id)
    if status["state"] == "failed":
        print(f"run {run_id} failed: {status['error']}", file=sys.stderr)
    return 0 if status["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
