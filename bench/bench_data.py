"""Data pipeline throughput, measured side by side in one run.

1. `data prepare` throughput (MB of text per second, end to end: read, normalise, hash, encode, shard)
   with N worker processes vs one, on the real Swahili corpus (maneno-yetu, 15 MB, 7 files) with
   an already-trained tokenizer, so only the parallel part is timed.
2. Loader throughput (tokens/s of (inputs, targets) batches) vs what training consumes: the
   training tokens/s measured here on CPU for the `cpu-2m` preset, and a stated H200 figure.

Run: `bash dev.sh shell python bench/bench_data.py [--workers 2] [--source builtin:maneno-yetu]`
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from smallscale.data.loader import TrainLoader
from smallscale.data.shards import PrepareConfig, prepare
from smallscale.io import atomic_write_json


def time_prepare(source: str, out: Path, tokenizer: str, workers: int) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(source=source, out=str(out), tokenizer=tokenizer, workers=workers)
    t0 = time.perf_counter()
    manifest = prepare(cfg, progress=False)
    return time.perf_counter() - t0, manifest


def loader_tokens_per_s(dataset: Path, seq_len: int, micro_batch: int, seconds: float = 3.0) -> float:
    loader = TrainLoader(dataset, seq_len=seq_len, micro_batch=micro_batch, seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = loader.next_batch()
        n += x.numel()
    return n / (time.perf_counter() - t0)


def cpu_training_tokens_per_s(dataset: Path, steps: int = 10) -> float:
    from smallscale.train.trainer import load_run_config, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_run_config(None, [f"data.path={dataset}", f"out={tmp}/run", "model.preset=cpu-2m", f"train.steps={steps}",
                                     "train.global_batch_tokens=8192", "train.micro_batch=32", "train.log_every_steps=1000"])  # fmt: skip
        cfg.train.eval_every_tokens = None
        summary = train(cfg, progress=False)
    return summary["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="builtin:maneno-yetu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench/results/data.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Train the tokenizer once (not part of the parallel comparison).
        _, m0 = time_prepare(args.source, tmp / "tok", "bpe", args.workers)
        tok = tmp / "tokenizer.json"
        shutil.copy(tmp / "tok" / "tokenizer.json", tok)
        text_mb = (m0["splits"]["train"]["bytes"] + m0["splits"]["val"]["bytes"]) / 1e6
        t1, _ = time_prepare(args.source, tmp / "w1", str(tok), 1)
        tn, mn = time_prepare(args.source, tmp / "wn", str(tok), args.workers)
        loader_256 = loader_tokens_per_s(tmp / "wn", 256, 32)
        loader_1024 = loader_tokens_per_s(tmp / "wn", 1024, 16)
        train_cpu = cpu_training_tokens_per_s(tmp / "wn")

    result = {
        "source": args.source,
        "text_mb": round(text_mb, 2),
        "prepare_mb_per_s_1_worker": round(text_mb / t1, 2),
        f"prepare_mb_per_s_{args.workers}_workers": round(text_mb / tn, 2),
        "prepare_speedup": round(t1 / tn, 2),
        "train_tokens": mn["splits"]["train"]["tokens"],
        "loader_tokens_per_s_seq256_b32": round(loader_256),
        "loader_tokens_per_s_seq1024_b16": round(loader_1024),
        "cpu_training_tokens_per_s_cpu-2m": round(train_cpu),
        "loader_over_cpu_training": round(loader_256 / train_cpu, 1),
        # What a fast accelerator consumes: ~1.5M tokens/s is a generous H200 figure for a 20M model.
        "loader_over_h200_20m_estimate": round(loader_1024 / 1.5e6, 1),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
