"""Training speed of CPU preset shapes: the shipped presets against reshaped candidates of the same
size, per machine kind, so the presets keep shapes whose matmuls run well on any CPU.

One step = the trainer's step at the quickstart's setting (forward with the loss on every token,
backward, clip, fused AdamW) on a fixed random batch: micro-batch 8 x 256 tokens, vocab 4096 (the
quickstart's BPE), eager (runs under 1000 steps do not compile). Cases take turns one step at a
time and report their median, so a change in the machine's load hits all alike. Achieved GFLOP/s =
tokens/s x `GPT.flops_per_token`: at equal size, the higher is the better shape.

--isa avx2 restricts torch, oneDNN and MKL to AVX2 (an AVX2-only CPU: fp32 only); native measures
fp32 and, where the CPU has bf16, bf16 autocast (what `precision=auto` picks there).
Results: bench/results/cpu_presets.json, one entry per machine kind.

Run: `bash dev.sh shell python bench/bench_cpu_presets.py [--isa avx2] [--steps 12]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import isa_setting, restrict_isa  # noqa: E402

# name -> (n_layer, n_head, d_model); "*" marks a shipped preset's shape before this benchmark.
SHAPES: dict[str, tuple[int, int, int]] = {
    "500k 4x48 h3 (hd16)": (4, 3, 48),
    "500k 4x48 h2 (hd24)": (4, 2, 48),
    "500k 4x48 h1 (hd48)": (4, 1, 48),
    "2m 7x112 h4 (hd28)": (7, 4, 112),
    "2m 5x128 h4 (hd32)": (5, 4, 128),
    "2m 5x128 h2 (hd64)": (5, 2, 128),
    "2m 8x96 h3 (hd32)": (8, 3, 96),
    "6m 10x192 h6 (hd32)": (10, 6, 192),
    "6m 10x192 h3 (hd64)": (10, 3, 192),
}
VOCAB, SEQ, BATCH = 4096, 256, 8


class Runner:
    def __init__(self, name: str, shape: tuple[int, int, int], precision: str, warmup: int):
        import torch

        from smallscale.model.gpt import GPT, GPTConfig
        from smallscale.optim import OptimConfig, build_optimizer

        n_layer, n_head, d_model = shape
        torch.manual_seed(0)
        self.name, self.precision = name, precision
        self.model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, vocab_size=VOCAB, seq_len=SEQ))
        self.params = self.model.num_params()
        self.flops_per_token = self.model.flops_per_token()
        self.optimizer = build_optimizer(self.model, OptimConfig())
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
        self.inputs, self.targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        bf16 = precision == "bf16"
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.step_s: list[float] = []
        for _ in range(warmup):
            self.step()

    def step(self) -> None:
        import torch

        with self.autocast():
            loss = self.model(self.inputs, self.targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        t0 = time.perf_counter()
        self.step()
        self.step_s.append(time.perf_counter() - t0)

    def result(self) -> dict:
        median_s = statistics.median(self.step_s)
        tokens_per_s = BATCH * SEQ / median_s
        return {
            "params": self.params,
            "flops_per_token": self.flops_per_token,
            "ms_per_step": round(1e3 * median_s, 2),
            "tokens_per_s": round(tokens_per_s),
            "gflop_per_s": round(tokens_per_s * self.flops_per_token / 1e9, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="only shapes whose name contains one of these")
    parser.add_argument("--out", default="bench/results/cpu_presets.json")
    args = parser.parse_args()
    restrict_isa(args.isa)

    import torch

    from smallscale.train.trainer import cpu_supports_bf16

    precisions = ["fp32"] + (["bf16"] if args.isa == "native" and cpu_supports_bf16() else [])
    shapes = {k: v for k, v in SHAPES.items() if not args.only or any(s in k for s in args.only)}
    runners = [Runner(name, shape, p, args.warmup) for p in precisions for name, shape in shapes.items()]
    load_before = os.getloadavg()[0]
    for _ in range(args.steps):
        for runner in runners:
            runner.timed_step()
    results: dict[str, dict] = {}
    for runner in runners:
        row = results.setdefault(runner.precision, {})[runner.name] = runner.result()
        print(f"{runner.precision}  {runner.name:22s} {row['params'] / 1e6:6.3f}M  {row['ms_per_step']:7.1f} ms/step "
              f"{row['tokens_per_s']:7d} tok/s  {row['gflop_per_s']:6.1f} GFLOP/s", flush=True)  # fmt: skip
    entry = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name")), None),  # fmt: skip
        "torch_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "setting": {"vocab_size": VOCAB, "seq_len": SEQ, "micro_batch": BATCH, "steps": args.steps},
        **isa_setting(),
        "results": results,
    }
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.isa] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out} [{args.isa}]")


if __name__ == "__main__":
    main()
