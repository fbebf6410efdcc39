"""The measurements behind the CPU speed choices in the code, each against its alternative.

At the shape of bench/bench_train.py (N = 16*256 tokens, d_model 256, vocab 8192, bf16 where the
trainer uses it), median of timed repeats, same process, allocator as the CLI sets it:

  adamw          torch AdamW step, fused vs foreach (smallscale.optim uses fused)
  head_grad      output-head weight gradient: dlogits^T @ h vs (h^T.contiguous() @ dlogits)^T
                 (smallscale.model.gpt._LinearCrossEntropy uses the second)
  loss           linear_cross_entropy forward + backward, eager vs inside torch.compile
                 (the model keeps it eager under compile)
  matmul_peak    square bf16/fp32 matmul rates at 1024 and 2048 (telemetry takes the best of both)
  compile_cpu2m  one training step of cpu-2m at micro-batch 8, eager vs compiled, and the time of
                 the first compiled steps (what train.compile=auto weighs)

About 2 minutes on 2 cores; results in bench/results/components.json.

Run: `bash dev.sh shell python bench/bench_components.py`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from smallscale.io import atomic_write_json
from smallscale.launch import allocator_setting, ensure_cpu_allocator_env

N, C, V = 16 * 256, 256, 8192


def median_ms(fn: Callable[[], object], repeats: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_adamw() -> dict:
    import torch

    from smallscale.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=V, seq_len=256, n_layer=4, n_head=4, d_model=C))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    out = {}
    for kind in ("fused", "foreach"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, **{kind: True})
        out[f"{kind}_ms"] = median_ms(opt.step)
    return out


def bench_head_grad() -> dict:
    import torch

    dlogits, h = torch.randn(N, V, dtype=torch.bfloat16), torch.randn(N, C, dtype=torch.bfloat16)
    return {
        "dlogits_t_at_h_ms": median_ms(lambda: (dlogits.t() @ h).float()),
        "h_t_contiguous_at_dlogits_ms": median_ms(
            lambda: (h.t().contiguous() @ dlogits).t().to(torch.float32, memory_format=torch.contiguous_format)
        ),
    }


def bench_loss() -> dict:
    import torch

    from smallscale.model.gpt import _LinearCrossEntropy

    h = torch.randn(N, C, requires_grad=True)
    weight = (0.02 * torch.randn(V, C)).requires_grad_()
    targets = torch.randint(0, V, (N,))

    def step(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fn(h, weight, targets)
            loss.backward()

        return run

    def f_cross_entropy(h, weight, targets):  # what inductor gets to fuse when the loss is compiled
        return torch.nn.functional.cross_entropy((h @ weight.t()).float(), targets)

    eager = median_ms(step(lambda *a: _LinearCrossEntropy.apply(*a)[1]), repeats=10)
    compiled = median_ms(step(torch.compile(f_cross_entropy)), repeats=10)
    return {"eager_linear_cross_entropy_ms": eager, "compiled_f_cross_entropy_ms": compiled}


def bench_matmul_peak() -> dict:
    import torch

    from smallscale.train.telemetry import _best_matmul_rate

    cpu = torch.device("cpu")
    return {
        f"{name}_{size}_gflops": _best_matmul_rate(cpu, dtype, 1.0, size) / 1e9
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
        for size in (1024, 2048)
    }


def bench_compile_cpu2m() -> dict:
    import torch

    from smallscale.model.gpt import GPT
    from smallscale.model.presets import preset_config
    from smallscale.optim import OptimConfig, build_optimizer

    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(preset_config("cpu-2m", vocab_size=V)).train()
        optimizer = build_optimizer(model, OptimConfig())
        forward = torch.compile(model) if compiled else model
        ids = torch.randint(0, V, (8, model.cfg.seq_len + 1))
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = forward(x, y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for _ in range(3):
            step()
        name = "compiled" if compiled else "eager"
        out[f"{name}_first_3_steps_s"] = time.perf_counter() - t0
        out[f"{name}_ms"] = median_ms(step, repeats=15, warmup=0)
    return out


BENCHES = {
    "adamw": bench_adamw,
    "head_grad": bench_head_grad,
    "loss": bench_loss,
    "matmul_peak": bench_matmul_peak,
    "compile_cpu2m": bench_compile_cpu2m,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(BENCHES), default=None)
    parser.add_argument("--out", default="bench/results/components.json")
    args = parser.parse_args()

    import torch

    results = {}
    for name in args.only or BENCHES:
        results[name] = BENCHES[name]()
        print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
    atomic_write_json(args.out, {"command": " ".join(sys.argv), "allocator": allocator_setting(),
                                 "torch_threads": torch.get_num_threads(), "results": results})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    ensure_cpu_allocator_env()
    main()
