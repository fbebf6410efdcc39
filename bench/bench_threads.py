"""CPU thread policy: concurrent runs in the pool executor, and the OpenMP wait policy under contention.

Every measurement is a real `smallscale` process (train, or `study run`) on one shape: cpu-2m with
rotary positions, seq_len 256, 2048-token batches (micro-batch 8), eager (runs under 1000 steps do
not compile), Tiny Shakespeare with BPE 4096, as the quickstart study trains. Tokens/s is each run's
steady rate: its logged windows of 2 steps after the first (step 1 warms up), so startup and the
final evaluation are not in it; they are in the walls.

Parts:

  pool    two runs (seeds 0 and 1) as one study: `study run --executor pool --workers 2` (both at
          once) vs `--executor local` (one after the other); total wall of the `study run` process
          and each run's tokens/s. With --baseline DIR (the code before the thread policy, e.g.
          `mkdir /tmp/before && git archive 623847b smallscale | tar -x -C /tmp/before`) the same two
          cases also run with that code (PYTHONPATH=DIR), interleaved with ours.
  policy  one `smallscale train` run, alone and next to a busy process (`python -c "while True: pass"`,
          one core), under each OpenMP wait policy: libgomp's default (OMP_WAIT_POLICY unset spins
          300000 rounds, ~3 ms, before sleeping: set here as GOMP_SPINCOUNT=300000, which is the same
          setting, as OMP_DISPLAY_ENV=VERBOSE shows) and OMP_WAIT_POLICY=PASSIVE (sleep at once).
          A run is stopped after --max-run-s seconds (a spinning run under contention can take many
          minutes); its tokens/s is then over the windows it completed.
  pin     two single-thread runs at once (OMP_NUM_THREADS=1 each, as the pool gives them), free to
          move between cores vs each pinned to its own core (sched_setaffinity).

Cases take turns (A B C, A B C, ...) and report medians. The cores may be shared with other users:
with --lock PATH each repetition (one turn of every case) holds an exclusive flock on PATH (the
shared benchmark mutex) while it runs, and every measurement records how much CPU other processes used meanwhile ("other load", in
cores: busy CPU time in /proc/stat minus this process tree's), printed next to the numbers.

    bash dev.sh shell python bench/bench_threads.py --part pool --baseline /tmp/before --lock /tmp/bench.lock
    bash dev.sh shell python bench/bench_threads.py --part policy --precision fp32 --lock /tmp/bench.lock

Writes bench/results/threads.json (one entry per part and precision, with the CPU model and ISA flags).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallscale.io import atomic_write_json  # noqa: E402

WORK = REPO / "bench" / ".work" / "threads"
RESULTS = REPO / "bench" / "results" / "threads.json"
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")
# The environment variables whose settings are measured here; the caller's are removed.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYTHONPATH")
POLICIES = {
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}
BATCH_TOKENS = 2048
LOG_EVERY = 2  # steps per logged tokens/s window


def run_overrides(steps: int, precision: str) -> dict[str, Any]:
    return {
        "model": {"preset": "cpu-2m", "position": "rope"},
        "optim": {"name": "adamw", "lr": 2.0e-3},
        "train": {"steps": steps, "global_batch_tokens": BATCH_TOKENS, "micro_batch": 8, "precision": precision,
                  "compile": False, "log_every_steps": LOG_EVERY},
    }  # fmt: skip


def machine() -> dict[str, Any]:
    import torch

    from smallscale import hardware, provenance

    flags = provenance.cpu_flags()
    return {"cpu": provenance.cpu_model(), "isa_flags": [f for f in ISA_FLAGS if f in flags],
            "usable_cpus": hardware.usable_cpus(), "torch": torch.__version__}  # fmt: skip


# ----------------------------------------------------------------------------- measuring
def busy_cpu_s() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of every descendant it has waited for."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))  # fmt: skip


@contextlib.contextmanager
def holding(lock: Path | None) -> Iterator[None]:
    """An exclusive flock on `lock` (the same mutex as `flock PATH command`), if given."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn's result plus its wall time and the load other processes put on the machine meanwhile."""
    busy0, own0, t0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    other = max(0.0, (busy_cpu_s() - busy0) - (own_cpu_s() - own0))
    return {**result, "wall_s": round(wall, 2), "other_load_cores": round(other / wall, 2)}


def steady_tokens_per_s(run_dir: Path) -> float:
    """Tokens over seconds of the logged windows after the first (which holds step 1's warm-up);
    of all windows if the run was stopped before a second one."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "tokens_per_s" in r]
    windows = windows[1:] or windows
    assert windows, f"{run_dir} logged no step"
    window_tokens = LOG_EVERY * BATCH_TOKENS
    return len(windows) * window_tokens / sum(window_tokens / r["tokens_per_s"] for r in windows)


def run_record(run_dir: Path) -> dict[str, Any]:
    env = json.loads((run_dir / "env.json").read_text())
    steps = sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()) * LOG_EVERY
    return {"tokens_per_s": round(steady_tokens_per_s(run_dir)), "threads": env["torch_threads"],
            "precision": env["precision"], "steps_logged": steps}  # fmt: skip


def environment(extra: dict[str, str], code: Path | None = None) -> dict[str, str]:
    """The caller's environment without thread settings, `extra` added, importing smallscale from
    `code` (default: this checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return {**env, "PYTHONPATH": str(code or REPO), **extra}


def smallscale(args: list[str], env: dict[str, str], **popen: Any) -> subprocess.Popen:
    # Not from the checkout's root: `python -m` puts the working directory first on sys.path.
    return subprocess.Popen([sys.executable, "-m", "smallscale.cli", *args], cwd=WORK, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)  # fmt: skip


def wait_ok(proc: subprocess.Popen, deadline: float | None = None) -> None:
    """Wait for `proc`; stop it at `deadline` (time.monotonic()). Any other non-zero exit is fatal."""
    while deadline is not None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if proc.poll() is None and deadline is not None:
        proc.terminate()
        proc.communicate()
        return
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, proc.args))} failed:\n{err[-2000:]}")


def prepare_dataset(code: Path | None = None) -> Path:
    """The dataset, prepared by the code measured (the baseline's may read another format)."""
    from smallscale.data.builtins import resolve_data_root

    out = WORK / ("shakespeare" if code is None else "shakespeare-baseline")
    root = resolve_data_root(None)  # found from this checkout; a baseline elsewhere would not find it
    args = ["data", "prepare", "builtin:tinyshakespeare", "--vocab-size", "4096", "-o", str(out), "--workers", "1",
            *(["--data-root", str(root)] if root else [])]  # fmt: skip
    if smallscale(args, environment({}, code)).wait() != 0:  # made by another version of `data prepare`
        wait_ok(smallscale([*args, "--force"], environment({}, code)))
    return out


def train_args(out: Path, dataset: Path, steps: int, precision: str, seed: int = 0) -> list[str]:
    o = run_overrides(steps, precision)
    flat = [f"{section}.{k}={v}" for section, values in o.items() for k, v in values.items()]
    return ["train", f"out={out}", f"data.path={dataset}", f"train.seed={seed}", *flat, "--no-progress"]


def show(rep: int, case: str, sample: dict[str, Any]) -> None:
    runs = sample["runs"]
    print(f"  rep {rep}: {case:40s} wall {sample['wall_s']:6.1f} s  tokens/s {'/'.join(str(r['tokens_per_s']) for r in runs)}"
          f"  threads {'/'.join(str(r['threads']) for r in runs)}  steps {'/'.join(str(r['steps_logged']) for r in runs)}"
          f"  other load {sample['other_load_cores']}", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- parts
def part_pool(args: argparse.Namespace, precision: str) -> dict[str, list[dict]]:
    codes = {"after": None, **({"before": args.baseline} if args.baseline else {})}
    studies = {}
    for name, code in codes.items():
        spec = {"name": "threads-bench", "datasets": {"shakespeare": {"path": str(prepare_dataset(code))}},
                "base": run_overrides(args.steps, precision), "grid": {"train.seed": [0, 1]}}  # fmt: skip
        studies[name] = WORK / f"pool-{name}-{precision}.yaml"
        studies[name].write_text(json.dumps(spec))  # JSON is YAML
    executors = {"pool --workers 2": ["--executor", "pool", "--workers", "2"], "sequential": ["--executor", "local"]}

    def one(code_name: str, executor: list[str], folder: Path) -> dict[str, Any]:
        shutil.rmtree(folder, ignore_errors=True)
        command = ["study", "run", str(studies[code_name]), "-o", str(folder), *executor, "--no-report", "--no-progress"]
        wait_ok(smallscale(command, environment({}, codes[code_name])))
        return {"runs": [run_record(d) for d in sorted((folder / "runs").iterdir())]}

    samples: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        with holding(args.lock):
            for code_name in codes:
                for ex_name, executor in executors.items():
                    case = f"{code_name}, {ex_name}"
                    folder = WORK / "studies" / case.replace(", ", "-").replace(" ", "_")
                    samples.setdefault(case, []).append(timed(lambda c=code_name, e=executor, f=folder: one(c, e, f)))
                    show(rep, case, samples[case][-1])
    return samples


def part_policy(args: argparse.Namespace, precision: str) -> dict[str, list[dict]]:
    dataset = prepare_dataset()

    def one(policy: dict[str, str], busy: bool) -> dict[str, Any]:
        out = WORK / "policy-run"
        shutil.rmtree(out, ignore_errors=True)
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            wait_ok(smallscale(train_args(out, dataset, args.steps, precision), environment(policy)),
                    deadline=time.monotonic() + args.max_run_s)  # fmt: skip
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        return {"runs": [run_record(out)]}

    samples: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        with holding(args.lock):
            for busy in (False, True):
                for name, policy in POLICIES.items():
                    case = f"{'next to a busy core' if busy else 'alone'}, {name}"
                    samples.setdefault(case, []).append(timed(lambda p=policy, b=busy: one(p, b)))
                    show(rep, case, samples[case][-1])
    return samples


def part_pin(args: argparse.Namespace, precision: str) -> dict[str, list[dict]]:
    dataset = prepare_dataset()

    def one(pinned: bool) -> dict[str, Any]:
        outs = [WORK / f"pin-run{i}" for i in range(2)]
        procs = []
        for i, out in enumerate(outs):
            shutil.rmtree(out, ignore_errors=True)
            pin = (lambda cpu=i: os.sched_setaffinity(0, {cpu})) if pinned else None
            procs.append(smallscale(train_args(out, dataset, args.steps, precision, seed=i),
                                    environment({"OMP_NUM_THREADS": "1"}), preexec_fn=pin))  # fmt: skip
        deadline = time.monotonic() + args.max_run_s
        for proc in procs:
            wait_ok(proc, deadline)
        return {"runs": [run_record(out) for out in outs]}

    samples: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        with holding(args.lock):
            for pinned in (False, True):
                case = "each pinned to a core" if pinned else "free to move"
                samples.setdefault(case, []).append(timed(lambda p=pinned: one(p)))
                show(rep, case, samples[case][-1])
    return samples


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions: total wall, each run's tokens/s (by position), other load."""
    n_runs = len(samples[0]["runs"])
    return {
        "wall_s": round(statistics.median(s["wall_s"] for s in samples), 1),
        "tokens_per_s": [round(statistics.median(s["runs"][i]["tokens_per_s"] for s in samples)) for i in range(n_runs)],
        "threads": [s_run["threads"] for s_run in samples[0]["runs"]],
        "other_load_cores": round(statistics.median(s["other_load_cores"] for s in samples), 2),
    }


PARTS = {"pool": part_pool, "policy": part_policy, "pin": part_pin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=tuple(PARTS), required=True)
    parser.add_argument("--precision", nargs="+", default=None, help="default: fp32 and the CPU's native precision")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-run-s", type=float, default=120, help="policy, pin: stop a run after this many seconds")
    parser.add_argument("--baseline", type=Path, default=None, help="pool: the code before, to compare")
    parser.add_argument("--lock", type=Path, default=None, help="hold an flock on this file during each repetition")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from smallscale.train.trainer import cpu_supports_bf16

    precisions = args.precision or ["fp32", *(["bf16"] if cpu_supports_bf16() else [])]
    WORK.mkdir(parents=True, exist_ok=True)
    about = machine()
    print(f"{about['cpu']}, {about['usable_cpus']} usable cores, ISA {' '.join(about['isa_flags'])}, torch {about['torch']}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    for precision in precisions:
        print(f"{args.part}, {precision}, {args.steps} steps of {BATCH_TOKENS} tokens, {args.reps} repetitions", flush=True)
        samples = PARTS[args.part](args, precision)
        medians = {case: summarise(s) for case, s in samples.items()}
        for case, row in medians.items():
            print(f"  median {case:40s} wall {row['wall_s']:6.1f} s  tokens/s {row['tokens_per_s']}  "
                  f"threads {row['threads']}  other load {row['other_load_cores']}")  # fmt: skip
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        results.setdefault(args.part, {})[precision] = {
            "machine": about, "steps": args.steps, "reps": args.reps, "shape": run_overrides(args.steps, precision),
            "max_run_s": args.max_run_s if args.part != "pool" else None,
            "baseline": str(args.baseline) if args.baseline else None, "measured_at": time.strftime("%Y-%m-%d %H:%M"),
            "medians": medians, "samples": samples,
        }  # fmt: skip
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
