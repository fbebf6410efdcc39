"""Wall time until a model is as good as X, on this machine: the task a researcher feels.

Task (reproducible by anyone): train on the first 90% of Tiny Shakespeare's speeches, score bits per
byte on the last 10% (the `tinyshakespeare` text task's tail, never trained on), and report the wall
time from the training process's start to its first evaluation at or below each target (2.74 bpb,
nanoGPT's CPU recipe's result on this task, and a stricter 2.40), evaluation time included.

How: the bench writes the 90/10 split as two JSONL files and prepares them as one dataset whose val
split is the tail (`data prepare --val-source`), so the trainer's in-loop `val_bpb` IS the text
task's bits per byte (the same documents, each scored on its own: tests/test_perplexity.py). Each
config runs twice as `smallscale train` processes: a calibration run with evaluations every tenth of
the run finds where each target is crossed, then the timed run evaluates only around those points
(from 0.8x to 1.3x of the crossing, step by step of 5%), so the reported time carries the cost of
the few evaluations a user would need, not of a dense curve.

    bash dev.sh shell python bench/bench_time_to_target.py                     # native ISA, precision auto
    bash dev.sh shell python bench/bench_time_to_target.py --isa avx2          # AVX2-restricted, fp32
    bash dev.sh shell python bench/bench_time_to_target.py -s optim.lr=3e-3    # a variant of the recipe
    bash dev.sh shell python bench/bench_time_to_target.py --screen --out /tmp/screen.json -s ...  # rank variants

`--screen` runs the calibration run only (half the cost) and reports its coarse hits (evaluations every
tenth of the run; `seconds_one_eval` less the earlier evaluations' cost); it writes only to an explicit --out.

Writes bench/results/time_to_target.json (one entry per --label, default the ISA setting), with the
CPU model, ISA flags, threads, precision, the config and the per-target times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smallscale.config import read_yaml  # noqa: E402
from smallscale.io import atomic_write_json  # noqa: E402

WORK = REPO / "bench" / ".work" / "time_to_target"
RESULTS = REPO / "bench" / "results" / "time_to_target.json"
TARGETS = (2.74, 2.40)
TAIL_FRACTION = 0.1  # as smallscale.eval.tasks.perplexity.TEXT_TASKS["tinyshakespeare"]
# The restrictions that make this CPU behave as an AVX2 + FMA machine (no AVX-512, no bf16, no AMX).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")


def cpu_description() -> dict:
    from smallscale import provenance

    flags = provenance.cpu_flags()
    return {
        "cpu": provenance.cpu_model(),
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "cores_usable": len(os.sched_getaffinity(0)),
        "machine": platform.machine(),
    }


def split_documents() -> tuple[list[str], list[str]]:
    """(first 90%, last 10%) of the speeches, cut exactly where the `tinyshakespeare` text task cuts."""
    from smallscale.data import sources

    docs = list(sources.iter_documents("builtin:tinyshakespeare", sources.SourceOptions()))
    cut = int(len(docs) * (1 - TAIL_FRACTION))
    return docs[:cut], docs[cut:]


def prepare_dataset(vocab_size: int, tokenizer: str = "bpe") -> Path:
    """The 90/10 dataset for this vocabulary (reused when it exists with the same settings)."""
    from smallscale.data.shards import FORMAT_VERSION, PrepareConfig, prepare

    WORK.mkdir(parents=True, exist_ok=True)
    head, tail = split_documents()
    for name, docs in (("head90.jsonl", head), ("tail10.jsonl", tail)):
        text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        path = WORK / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    out = WORK / f"shakespeare-90-10-{tokenizer}{vocab_size}"
    manifest = out / "manifest.json"  # a cache: one from an older dataset format is rebuilt, not refused
    stale = manifest.exists() and json.loads(manifest.read_text()).get("format_version") != FORMAT_VERSION
    prepare(PrepareConfig(source=str(WORK / "head90.jsonl"), val_source=str(WORK / "tail10.jsonl"), out=str(out),
                          tokenizer=tokenizer, vocab_size=vocab_size, workers=1), progress=False, force=stale)  # fmt: skip
    return out


def run_training(config: Path, overrides: list[str], out: Path, env: dict[str, str]) -> dict:
    """One `smallscale train` process; returns its summary and eval records."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "smallscale.cli", "train", str(config), f"out={out}", *overrides, "--no-progress"]
    launched = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - launched
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "val_bpb" in r]
    env_json = json.loads((out / "env.json").read_text())
    return {"summary": summary, "evals": evals, "process_wall_s": wall, "env": env_json}


def crossing(evals: list[dict], target: float) -> dict | None:
    """The first evaluation at or below the target, or None."""
    return next((e for e in evals if e["val_bpb"] <= target), None)


def interpolated_tokens(evals: list[dict], target: float) -> int | None:
    """Tokens at which the bpb curve (linear between evaluations) first reaches the target."""
    previous = None
    for e in evals:
        if e["val_bpb"] <= target:
            if previous is None:
                return e["tokens"]
            frac = (previous["val_bpb"] - target) / (previous["val_bpb"] - e["val_bpb"])
            return int(previous["tokens"] + frac * (e["tokens"] - previous["tokens"]))
        previous = e
    return None


def timed_evals(crossings: list[int], batch_tokens: int, total_tokens: int) -> list[int]:
    """Evaluation points around each expected crossing: 0.8x to 1.3x in 5% steps, on step boundaries."""
    points = set()
    for tokens in crossings:
        for k in range(16, 27):  # 0.80, 0.85, ..., 1.30
            t = int(tokens * k / 20) // batch_tokens * batch_tokens
            if 0 < t < total_tokens:
                points.add(t)
    return sorted(points)


def target_hits(run: dict, targets: tuple[float, ...]) -> dict:
    """Per target: the first evaluation at or below it, timed from the process start (evaluations included),
    and `seconds_one_eval`: that time less the earlier evaluations' cost (as if only the hit was evaluated)."""
    startup, per_target = run["summary"]["startup_s"], {}
    for target in targets:
        hit = crossing(run["evals"], target)
        earlier_eval_s = 0.0 if hit is None else sum(e["eval_s"] for e in run["evals"] if e["tokens"] < hit["tokens"])
        per_target[f"{target:.2f}"] = None if hit is None else {
            "seconds": round(startup + hit["elapsed_s"], 2), "seconds_one_eval": round(startup + hit["elapsed_s"] - earlier_eval_s, 2),
            "tokens": hit["tokens"], "step": hit["step"], "val_bpb": round(hit["val_bpb"], 4),
        }  # fmt: skip
    return per_target


def time_to_targets(config: Path, overrides: list[str], env: dict[str, str], targets: tuple[float, ...], name: str,
                    screen: bool = False) -> dict:  # fmt: skip
    """Calibrate, then time; returns the per-target result and both runs' curves. `screen`: the calibration
    run only (half the cost, for ranking configs), its hits timed with evaluations every tenth of the run."""
    cfg = read_yaml(config)
    train = {**cfg.get("train", {}), **_train_overrides(overrides)}
    batch = int(train["global_batch_tokens"])
    total = int(train.get("tokens") or int(train["steps"]) * batch)
    calibration_points = [total * k // 10 // batch * batch for k in range(1, 10)]
    calib = run_training(config, [*overrides, f"train.eval_at_tokens={calibration_points}", "train.eval_every_tokens=null"],
                         WORK / "runs" / f"{name}-calibrate", env)  # fmt: skip
    if screen:
        timed = calib
    else:
        expected = [interpolated_tokens(calib["evals"], t) for t in targets]
        points = timed_evals([t for t in expected if t is not None], batch, total)
        timed = run_training(config, [*overrides, f"train.eval_at_tokens={points}", "train.eval_every_tokens=null"],
                             WORK / "runs" / f"{name}-timed", env)  # fmt: skip
    startup = timed["summary"]["startup_s"]
    final = timed["summary"]
    return {
        "screen": screen,
        "targets": target_hits(timed, targets),
        "final_val_bpb": round(final["val_bpb"], 4),
        "run_seconds": round(startup + final["wall_s"], 2),
        "startup_s": round(startup, 2),
        "tokens_per_s": round(final["tokens_per_s"]),
        "precision": final["precision"],
        "compile": final["compile"],
        "threads": timed["env"].get("torch_threads"),
        "params": final["params"],
        "timed_evals": [{k: e[k] for k in ("tokens", "val_bpb", "elapsed_s", "eval_s")} for e in timed["evals"]],
        "calibration_evals": [{k: e[k] for k in ("tokens", "val_bpb", "elapsed_s", "eval_s")} for e in calib["evals"]],
    }


def _train_overrides(overrides: list[str]) -> dict:
    from smallscale.config import parse_overrides

    return parse_overrides(overrides).get("train", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "speedrun-cpu.yaml")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the <V> that ends the config's data.path (...bpe<V>)")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native", help="avx2: restrict to AVX2 + FMA, fp32")
    parser.add_argument("-s", "--set", action="append", default=[], help="key=value override of the config")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--screen", action="store_true", help="calibration run only: a cheaper, coarser ranking of configs")
    parser.add_argument("--label", default=None, help="results key (default: the --isa value)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    vocab = args.vocab_size or speedrun_vocab(args.config)
    dataset = prepare_dataset(vocab)
    env = dict(AVX2_ENV) if args.isa == "avx2" else {}
    overrides = [f"data.path={dataset}", *(["train.precision=fp32"] if args.isa == "avx2" else []), *args.set]
    label = args.label or args.isa
    result = {
        "machine": cpu_description(),
        "isa_setting": args.isa,
        "env": env,
        "config": str(args.config.relative_to(REPO)) if args.config.is_relative_to(REPO) else str(args.config),
        "vocab_size": vocab,
        "overrides": args.set,
        **time_to_targets(args.config, overrides, env, tuple(args.targets), label, args.screen),
    }
    print(json.dumps({k: v for k, v in result.items() if "evals" not in k}, indent=2))
    if args.screen and args.out == RESULTS:
        return  # screening numbers are not the benchmark's result
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    existing[label] = result
    atomic_write_json(args.out, existing)
    print(f"wrote {args.out} [{label}]")


def speedrun_vocab(config: Path) -> int:
    """The vocabulary a speedrun config was tuned for: its dataset folder name ends in bpe<V>."""
    path = str(read_yaml(config).get("data", {}).get("path", ""))
    digits = path.rsplit("bpe", 1)[-1]
    if not digits.isdigit():
        raise SystemExit(f"{config}: data.path {path!r} does not end in bpe<vocab size>; pass --vocab-size")
    return int(digits)


if __name__ == "__main__":
    main()
