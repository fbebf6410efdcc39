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

Run only by name, `--only fast_paths [--isa avx2]`: each custom autograd function of the model
(linear_cross_entropy, the head_grad layout, rmsnorm, rotary, matmul attention) against its plain
PyTorch form, forward + backward, at the bench shape and the CPU presets' (FAST_PATH_SHAPES), in
fp32 and, where the CPU has bf16, under bf16 autocast; the numbers behind
`smallscale.model.gpt.use_fast_path`. `--isa avx2` re-runs the process with torch, oneDNN and MKL
capped at AVX2 (an AVX2-only CPU: fp32 only). `--cpu-time` times one thread by its CPU time
instead of two by the wall clock, which other processes on a shared machine cannot stretch. About
1.5 minutes per setting on 2 quiet cores; results in bench/results/fast_paths_{native,avx2}[_cpu_time].json.

Run: `bash dev.sh shell python bench/bench_components.py [--only fast_paths --isa avx2]`
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import isa_setting, restrict_isa  # noqa: E402

from smallscale.io import atomic_write_json  # noqa: E402
from smallscale.launch import allocator_setting, ensure_cpu_allocator_env  # noqa: E402

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


# (micro-batch, d_model, n_head, vocab) at seq 256: bench_train.py's shape and the CPU presets at
# the batches and vocabularies their configs use (quickstart: cpu-2m, 16, 4096; speedrun: 8)
FAST_PATH_SHAPES = {
    "bench": (16, 256, 4, 8192),
    "cpu-500k": (16, 48, 3, 4096),
    "cpu-2m": (16, 128, 4, 4096),
    "cpu-6m": (8, 192, 6, 8192),
}
FAST_PATH_SEQ = 256


def interleaved_ms(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median ms of each fn, timed in turns (a b a b ...) so a change in load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def fast_path_cases(shape: tuple[int, int, int, int], bf16: bool) -> dict[str, dict[str, Callable[[], None]]]:
    """For each custom function of the model: {'custom': step, 'plain': step}, each step one forward
    + backward on inputs shaped and laid out as in a training step (q, k, v are head-split views of
    the qkv projection; under bf16 autocast the residual stream is fp32, q/k/v bf16)."""
    import torch
    import torch.nn.functional as F

    from smallscale.model import gpt, positions

    B, C, nh, V = shape
    T, hs = FAST_PATH_SEQ, C // nh
    N = B * T
    act = torch.bfloat16 if bf16 else torch.float32  # dtype of matmul outputs (q, k, v, logits)

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    gen = torch.Generator().manual_seed(0)

    def leaf(*size: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*size, generator=gen)).to(dtype).requires_grad_()

    def clear(*tensors: torch.Tensor) -> None:
        for t in tensors:
            t.grad = None

    h, weight = leaf(N, C), leaf(V, C, scale=0.02)
    targets = torch.randint(0, V, (N,), generator=gen)

    def lce_custom() -> None:
        with autocast():
            loss = gpt._LinearCrossEntropy.apply(h, weight, targets)[1]
        loss.backward()
        clear(h, weight)

    def lce_plain() -> None:
        with autocast():
            loss = F.cross_entropy(F.linear(h, weight).float(), targets)
        loss.backward()
        clear(h, weight)

    dlogits, h_act = torch.randn(N, V, generator=gen).to(act), torch.randn(N, C, generator=gen).to(act)

    def head_grad_custom() -> None:  # the layout _LinearCrossEntropy.backward uses
        (h_act.t().contiguous() @ dlogits).t().to(torch.float32, memory_format=torch.contiguous_format)

    def head_grad_plain() -> None:
        (dlogits.t() @ h_act).to(torch.float32, memory_format=torch.contiguous_format)

    x, norm_weight = leaf(B, T, C), leaf(C, scale=0.1)
    grad_norm = torch.randn(B, T, C, generator=gen).to(act)

    def norm_custom() -> None:
        gpt._RMSNormFunction.apply(x, norm_weight, 1e-5, act).backward(grad_norm)
        clear(x, norm_weight)

    def norm_plain() -> None:  # the Linear after the norm would cast its fp32 output to bf16
        F.rms_norm(x, (C,), norm_weight, 1e-5).to(act).backward(grad_norm)
        clear(x, norm_weight)

    # (B, nh, T, hs) views of one (B, T, 3C) projection output, as CausalSelfAttention makes them
    qkv = leaf(B, T, 3 * C, dtype=act)
    cos, sin = positions.rope_cos_sin(T, hs, 10000.0)
    grad_heads = torch.randn(B, nh, T, hs, generator=gen).to(act)

    def heads() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.split(C, dim=2))

    def rotary_custom() -> None:
        positions.apply_rotary(heads()[0], cos, sin).backward(grad_heads)
        clear(qkv)

    def rotary_plain() -> None:
        q = heads()[0]
        q1, q2 = q.chunk(2, dim=-1)  # transformers' Llama: q * cos + rotate_half(q) * sin
        (q * cos.to(act) + torch.cat((-q2, q1), dim=-1) * sin.to(act)).backward(grad_heads)
        clear(qkv)

    def attention_custom() -> None:
        gpt._matmul_causal_attention(*heads()).backward(grad_heads)
        clear(qkv)

    def attention_plain() -> None:
        F.scaled_dot_product_attention(*heads(), is_causal=True).backward(grad_heads)
        clear(qkv)

    return {
        "linear_cross_entropy": {"custom": lce_custom, "plain": lce_plain},
        "head_grad": {"custom": head_grad_custom, "plain": head_grad_plain},
        "rmsnorm": {"custom": norm_custom, "plain": norm_plain},
        "rotary": {"custom": rotary_custom, "plain": rotary_plain},
        "attention": {"custom": attention_custom, "plain": attention_plain},
    }


def bench_fast_paths(cpu_time: bool = False) -> dict:
    """Each custom function against its plain PyTorch form, per shape and precision, in this
    process's ISA setting (see --isa): fp32 everywhere, bf16 autocast where the CPU has bf16.

    cpu_time: one thread, timed by its CPU time (time.thread_time) instead of the wall clock: work
    that other processes on a shared machine cannot stretch, as they stretch a 2-thread step
    whose threads wait for each other at every barrier."""
    import torch

    from smallscale.train.trainer import cpu_supports_bf16

    clock = time.perf_counter
    if cpu_time:
        torch.set_num_threads(1)
        clock = time.thread_time
    out: dict = {}
    for precision in ("fp32", "bf16") if cpu_supports_bf16() else ("fp32",):
        for shape_name, shape in FAST_PATH_SHAPES.items():
            for fn_name, pair in fast_path_cases(shape, precision == "bf16").items():
                big = fn_name in ("linear_cross_entropy", "head_grad") and shape[3] * shape[0] > 65536
                ms = interleaved_ms(pair, repeats=9 if big else 15, clock=clock)
                key = f"{fn_name}/{shape_name}/{precision}"
                out[key] = {**{f"{k}_ms": v for k, v in ms.items()}, "faster": min(ms, key=ms.get)}
                print(f"  {key:<40} custom {ms['custom']:8.2f} ms  plain {ms['plain']:8.2f} ms", flush=True)
    return out


BENCHES = {
    "adamw": bench_adamw,
    "head_grad": bench_head_grad,
    "loss": bench_loss,
    "matmul_peak": bench_matmul_peak,
    "compile_cpu2m": bench_compile_cpu2m,
}
EXTRA_BENCHES = {"fast_paths": bench_fast_paths}  # run only when named in --only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=[*BENCHES, *EXTRA_BENCHES], default=None)
    parser.add_argument("--isa", choices=["native", "avx2"], default="native", help="avx2: restrict torch, oneDNN and MKL to AVX2")
    parser.add_argument("--cpu-time", action="store_true", help="fast_paths on one thread, timed by its CPU time")
    parser.add_argument("--out", default=None, help="default: bench/results/components.json, or fast_paths_ISA[_cpu_time].json")
    args = parser.parse_args()
    restrict_isa(args.isa)

    import torch

    from smallscale import provenance

    names = args.only or list(BENCHES)
    suffix = "_cpu_time" if args.cpu_time else ""
    out = args.out or (f"bench/results/fast_paths_{args.isa}{suffix}.json" if names == ["fast_paths"] else "bench/results/components.json")
    results = {}
    for name in names:
        results[name] = bench_fast_paths(args.cpu_time) if name == "fast_paths" else BENCHES[name]()
        if name != "fast_paths":
            print(name, {k: round(v, 2) for k, v in results[name].items()}, flush=True)
    atomic_write_json(out, {"command": " ".join(sys.argv), "allocator": allocator_setting(),
                            "torch_threads": torch.get_num_threads(), "cpu": provenance.cpu_model(),
                            "setting": isa_setting(), "clock": "thread_time, 1 thread" if args.cpu_time else "wall",
                            "results": results})  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    ensure_cpu_allocator_env()
    main()
