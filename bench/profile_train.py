"""Where a training step of smallscale's default CPU setting spends its time, by kind of work.

The step of bench/bench_train.py (same shape, same default case: the default architecture,
precision=auto, compile=auto for a long run) under torch.profiler, with inductor's per-kernel
records on, grouped into:

  matmul        aten mm / bmm / baddbmm / addmm (the model FLOPs live here)
  softmax       aten softmax forward and backward (the loss's over the vocabulary, attention's)
  fused         inductor's generated kernels (norms, rotary, SwiGLU, residual adds, casts, ...)
  optimizer     the AdamW kernel and gradient clipping's norms
  other         everything else (copies, casts, small ops, autograd bookkeeping)

It prints each group's share of the profiled self time and the MFU the step would reach if the
matmuls were all it did ("matmul-only bound"): the gap between that and 65% of the peak is what
the matmul kernels themselves leave; the rest is everything else. The profiler slows the step by
~10-20%, unevenly (large softmaxes most), so the shares are indicative; the unprofiled step time
is printed next to them. About 1 minute on 2 cores; results in bench/results/train_profile.json.

Run: `bash dev.sh shell python bench/profile_train.py [--steps 3] [--isa avx2]` (avx2: torch, oneDNN and MKL
capped at AVX2, as bench_train.py --isa avx2; results in train_profile_avx2.json)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import BATCH, SHAPE, Runner, default_case, isa_setting, measure_peaks, restrict_isa  # noqa: E402

from smallscale.io import atomic_write_json  # noqa: E402
from smallscale.launch import allocator_setting, ensure_cpu_allocator_env  # noqa: E402

MATMUL = {"aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::_weight_int8pack_mm"}
SOFTMAX = {"aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax", "aten::_log_softmax_backward_data"}
OPTIMIZER = {"aten::_fused_adamw_", "aten::_foreach_norm", "aten::linalg_vector_norm", "aten::_foreach_mul_"}


def group_of(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    if name in SOFTMAX:
        return "softmax"
    if name.startswith(("graph_", "cpp_fused")):
        return "fused"
    if name in OPTIMIZER:
        return "optimizer"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native", help="avx2: restrict torch, oneDNN and MKL to AVX2")
    parser.add_argument("--out", default=None, help="default: bench/results/train_profile.json, or train_profile_avx2.json")
    args = parser.parse_args()
    restrict_isa(args.isa)
    out = args.out or ("bench/results/train_profile.json" if args.isa == "native" else f"bench/results/train_profile_{args.isa}.json")

    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from smallscale import provenance

    inductor_config.cpp.enable_kernel_profile = True  # a profiler record per generated kernel
    case = default_case()
    peak = measure_peaks((case.precision,))[case.precision]
    runner = Runner(case, warmup=3)
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            runner.step()

    # self time of every leaf-ish event, grouped; nested records (module / autograd wrappers) have
    # little self time of their own, so the sum is close to the profiled wall time x threads used
    per_group: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        per_group[group_of(event.key)] += event.self_cpu_time_total / 1e3 / args.steps  # ms per step
        top[event.key] += event.self_cpu_time_total / 1e3 / args.steps
    total = sum(per_group.values())
    flops_per_step = runner.flops_per_token * BATCH * SHAPE["seq_len"]
    matmul_s = per_group["matmul"] / 1e3 * step_s * 1e3 / total  # the matmul share of the real step
    result = {
        "command": " ".join(sys.argv),
        "case": case.name,
        "cpu": provenance.cpu_model(),
        "setting": isa_setting(),
        "shape": {**SHAPE, "batch": BATCH},
        "allocator": allocator_setting(),
        "peak_flops": peak,
        "step_ms_unprofiled": 1e3 * step_s,
        "mfu": flops_per_step / step_s / peak,
        "profiled_ms_per_step": total,
        "groups_ms_per_step": dict(per_group),
        "groups_share": {k: v / total for k, v in per_group.items()},
        "matmul_only_bound_mfu": flops_per_step / matmul_s / peak,
        "matmul_rate_flops": flops_per_step / matmul_s,
        "top_ops_ms_per_step": dict(sorted(top.items(), key=lambda kv: -kv[1])[:15]),
    }
    print(f"{case.name}: {1e3 * step_s:.0f} ms/step unprofiled, MFU {result['mfu']:.1%} of the {case.precision} peak "
          f"({peak / 1e9:.0f} GFLOP/s); profiled {total:.0f} ms/step of self time:")  # fmt: skip
    for name, ms in sorted(per_group.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<10} {ms:7.1f} ms  {ms / total:6.1%}")
    print(f"matmul-only bound: MFU {result['matmul_only_bound_mfu']:.1%} (the model's FLOPs at the matmuls' "
          f"own rate, {result['matmul_rate_flops'] / 1e9:.0f} GFLOP/s); top ops (ms/step):")  # fmt: skip
    for name, ms in list(result["top_ops_ms_per_step"].items())[:10]:
        print(f"  {ms:7.1f}  {name[:90]}")
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    ensure_cpu_allocator_env()
    main()
