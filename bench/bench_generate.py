"""Generation speed with and without the KV cache, measured side by side in one run.

Model: the `cpu-2m` preset (5 layers, d_model 128, 4 heads, seq 256; bench/results/generate.json
was measured at its former 7 x 112 shape) at vocab 4096, default
architecture (rope + rmsnorm + swiglu), random weights. Each case continues a 32-token random prompt
by 200 greedy tokens (no EOS, so every row runs all 200 steps) at batch 1 and 8; tokens/s counts
new tokens over all rows, end to end (prefill included). Without the cache every step reruns the
whole sequence, so its cost per token grows with the length; with it, each step feeds one token.
The two paths must produce the same tokens: the run checks it.

On a CPU shared with other work, torch's intra-op threads wait on each other at every small op, so
a one-token step can slow down by an order of magnitude; `--threads 1` avoids that, and the load
average at the start is recorded with the results.

Run: `bash dev.sh shell python bench/bench_generate.py [--new-tokens 200] [--repeats 2] [--threads N] [--device cpu]`
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from smallscale.eval.generate import generate
from smallscale.io import atomic_write_json
from smallscale.model.gpt import GPT
from smallscale.model.presets import preset_config

PROMPT_TOKENS = 32


def time_generation(model: GPT, prompts: torch.Tensor, new_tokens: int, use_cache: bool, repeats: int):
    """Best wall time (s) over `repeats`, and the tokens of the last run."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if prompts.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompts, new_tokens, temperature=0, use_cache=use_cache)
        if prompts.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2, help="report the best of this many runs per case")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/generate.json")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_average_1min = os.getloadavg()[0]

    torch.manual_seed(0)
    cfg = preset_config("cpu-2m", vocab_size=4096)
    model = GPT(cfg).to(args.device).eval()
    generate(model, torch.zeros(1, PROMPT_TOKENS, dtype=torch.long, device=args.device), 8)  # warm-up

    rows = []
    for batch in args.batches:
        prompts = torch.randint(3, cfg.vocab_size, (batch, PROMPT_TOKENS), device=args.device)
        timings, outputs = {}, {}
        for use_cache in (True, False):
            seconds, tokens = time_generation(model, prompts, args.new_tokens, use_cache, args.repeats)
            timings[use_cache], outputs[use_cache] = seconds, tokens
        new_tokens = batch * args.new_tokens
        rows.append({
            "batch": batch,
            "new_tokens": new_tokens,
            "cache_s": timings[True],
            "no_cache_s": timings[False],
            "cache_tokens_per_s": new_tokens / timings[True],
            "no_cache_tokens_per_s": new_tokens / timings[False],
            "speedup": timings[False] / timings[True],
            "same_tokens": bool(torch.equal(outputs[True], outputs[False])),
        })

    print(f"cpu-2m shape, vocab {cfg.vocab_size}, {model.num_params():,} params, prompt {PROMPT_TOKENS} + "
          f"{args.new_tokens} greedy tokens, {args.device}, {torch.get_num_threads()} threads, best of {args.repeats}, "
          f"load average {load_average_1min:.1f} on {os.cpu_count()} cores")
    print(f"{'batch':>5} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speedup':>8} {'same tokens':>12}")
    for r in rows:
        print(f"{r['batch']:>5} {r['cache_tokens_per_s']:>12.0f} {r['no_cache_tokens_per_s']:>15.0f} "
              f"{r['speedup']:>7.1f}x {r['same_tokens']!s:>12}")

    result = {
        "model": {"preset": "cpu-2m", "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "params": model.num_params(),
                  "position": cfg.position, "norm": cfg.norm, "mlp": cfg.mlp},
        "prompt_tokens": PROMPT_TOKENS,
        "max_new_tokens": args.new_tokens,
        "decoding": "greedy",
        "repeats": args.repeats,
        "environment": {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "load_average_1min": load_average_1min,
                        "platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "results": rows,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
