"""Every GPU preset (20m, 40m, 80m, 160m) trains a few steps on CPU at its real shape: seq 1024,
vocabulary 32768, micro-batch 1, through `smallscale train` as a user runs it. Reports the median
step time (the first step, which warms up allocator and kernels, left out), tokens/s, the measured
peak memory (summary.json: peak resident memory of the process) and the memory model's prediction.

The dataset is Tiny Shakespeare encoded with a 512-entry BPE whose tokenizer is padded with unused
special tokens to exactly 32768 entries: the model has the real vocabulary (embedding, output
head, loss over 32768 logits), only the token ids are small, which costs the same.

Run: `bash dev.sh shell python bench/bench_presets_scale.py [--presets 20m,40m,80m,160m] [--steps 4]`
(under `flock /tmp/bench.lock` on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wide_vocab_dataset(
    out: Path, vocab_size: int, source: str = "builtin:tinyshakespeare", val_tokens: int = 4096, split_by: str | None = None
) -> Path:
    """A prepared dataset (`data prepare`) whose tokenizer has exactly `vocab_size` entries: a 512-entry
    byte-level BPE trained on `source`, padded with special tokens that text never produces."""
    from tokenizers import Tokenizer

    from smallscale.data.shards import PrepareConfig, prepare

    if (out / "manifest.json").exists():
        return out
    base = out.with_name(out.name + "-bpe512")
    options = {"source": source, "workers": 1, "val_tokens": val_tokens, "split_by": split_by}
    prepare(PrepareConfig(**options, out=str(base), vocab_size=512), progress=False)
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.add_special_tokens([f"<|unused{i}|>" for i in range(vocab_size - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    padded = out.with_name(out.name + "-tokenizer.json")
    tok.save(str(padded))
    prepare(PrepareConfig(**options, out=str(out), tokenizer=str(padded)), progress=False)
    return out


def train_run(dataset: Path, out: Path, preset: str, steps: int, micro_batch: int, extra: list[str]) -> dict:
    """`smallscale train` in a fresh process; returns its summary and metrics."""
    cmd = [sys.executable, "-m", "smallscale.cli", "train", f"out={out}", f"data.path={dataset}", f"model.preset={preset}",
           f"train.steps={steps}", f"train.micro_batch={micro_batch}", f"train.global_batch_tokens={micro_batch * 1024}",
           "train.log_every_steps=1", "train.eval_batch=1", "train.compile=false", *extra, "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((out / "summary.json").read_text()), "metrics": metrics}


def measure(dataset: Path, work: Path, preset: str, steps: int) -> dict:
    import torch

    from smallscale.data.shards import load_manifest
    from smallscale.model.presets import preset_config
    from smallscale.train.memory import estimate
    from smallscale.train.trainer import resolve_precision

    run = train_run(dataset, work / preset, preset, steps, micro_batch=1, extra=[])
    summary = run["summary"]
    tokens_per_step = 1024
    step_s = [tokens_per_step / m["tokens_per_s"] for m in run["metrics"] if "tokens_per_s" in m and m["step"] > 1]
    cfg = preset_config(preset, vocab_size=load_manifest(dataset)["vocab_size"])
    precision = resolve_precision("auto", torch.device("cpu"))
    predicted = estimate(cfg, 1, precision, "cpu", eval_batch=1).peak
    return {
        "preset": preset,
        "params": summary["params"],
        "seq_len": cfg.seq_len,
        "vocab_size": cfg.vocab_size,
        "micro_batch": 1,
        "precision": summary["precision"],
        "steps": steps,
        "step_s_median": statistics.median(step_s),
        "step_s_all": step_s,
        "tokens_per_s": tokens_per_step / statistics.median(step_s),
        "mfu": summary["mfu"],
        "peak_mem_bytes": summary["peak_mem_bytes"],
        "predicted_peak_bytes": predicted,
        "loss_first": run["metrics"][0]["loss"],
        "loss_last": run["metrics"][-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="20m,40m,80m,160m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "bench/results/presets_scale.json"))
    args = parser.parse_args()

    from smallscale.io import atomic_write_json
    from smallscale.launch import allocator_setting
    from smallscale.provenance import cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        dataset = wide_vocab_dataset(Path(tmp) / "shakespeare-32768", 32768)
        rows = [measure(dataset, Path(tmp), preset, args.steps) for preset in args.presets.split(",")]

    mib = 2**20
    print(f"CPU: {cpu_model()}; seq 1024, vocab 32768, micro-batch 1, {rows[0]['precision']}, eager, allocator {allocator_setting()}")
    print(f"{'preset':<7} {'params':>12} {'step s':>7} {'tokens/s':>9} {'MFU':>6} {'peak MiB':>9} {'predicted':>9} {'loss':>13}")
    for r in rows:
        print(f"{r['preset']:<7} {r['params']:>12,} {r['step_s_median']:>7.2f} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} "
              f"{r['peak_mem_bytes'] / mib:>9.0f} {r['predicted_peak_bytes'] / mib:>9.0f} {r['loss_first']:>6.2f}>{r['loss_last']:.2f}")  # fmt: skip
    atomic_write_json(args.out, {"command": " ".join(sys.argv), "cpu": cpu_model(), "allocator": allocator_setting(), "runs": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from smallscale.launch import ensure_cpu_allocator_env

    ensure_cpu_allocator_env()  # the trainer's own malloc setting, recorded with the numbers
    main()
