"""Peak memory of a training step with and without activation (gradient) checkpointing.

Each setting runs in a fresh process: build the model and AdamW, record the resident memory, reset
the peak (telemetry.reset_peak_memory: Linux VmHWM), take two training steps (forward, backward,
AdamW; the first also allocates the optimizer state), read the peak (telemetry.peak_memory_bytes).
The increment over the resident memory before the first step is what the step needs: activations,
gradients and optimizer state; only the activations differ between the settings. Both processes
save their gradients after the first step, and the parent checks they are identical.

The default shape is one where activations dominate: preset cpu-6m (10 layers, d_model 192,
seq 256, vocab 8192) at batch 32.

Run: `bash dev.sh shell python bench/bench_memory.py [--preset cpu-6m] [--batch 32] [--precision auto]`
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from smallscale.io import atomic_write_json
from smallscale.launch import allocator_setting, ensure_cpu_allocator_env


def _vm_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def measure(preset: str, batch: int, precision: str, checkpointing: bool, grads_path: str) -> dict:
    """One setting, in this process: the memory record printed as JSON by `--child`."""
    import contextlib
    import gc

    import torch

    from smallscale.model.gpt import GPT
    from smallscale.model.presets import preset_config
    from smallscale.optim import OptimConfig, build_optimizer
    from smallscale.train import telemetry

    torch.manual_seed(0)
    cfg = preset_config(preset, grad_checkpointing=checkpointing)
    model = GPT(cfg).train()
    optimizer = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    gc.collect()
    before_bytes = _vm_rss_bytes()
    telemetry.reset_peak_memory(torch.device("cpu"))
    for step in range(2):
        with autocast():
            loss = model(inputs, targets).loss
        loss.backward()
        if step == 0:
            torch.save({name: p.grad for name, p in model.named_parameters()}, grads_path)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak_bytes = telemetry.peak_memory_bytes(torch.device("cpu"))
    return {
        "grad_checkpointing": checkpointing,
        "rss_before_step_bytes": before_bytes,
        "peak_bytes": peak_bytes,
        "step_bytes": peak_bytes - before_bytes,
        "loss": loss.item(),
        "params": model.num_params(),
    }


def run_child(preset: str, batch: int, precision: str, checkpointing: bool, grads_path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--batch", str(batch), "--precision", precision,
           "--grads", grads_path] + (["--checkpointing"] if checkpointing else [])  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-6m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--out", default="bench/results/memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.batch, args.precision, args.checkpointing, args.grads)))
        return

    import torch

    from smallscale.model.presets import preset_config
    from smallscale.train.trainer import resolve_precision

    precision = resolve_precision(args.precision, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        runs = {on: run_child(args.preset, args.batch, precision, on, f"{tmp}/grads-{on}.pt") for on in (False, True)}
        plain, ckpt = torch.load(f"{tmp}/grads-False.pt"), torch.load(f"{tmp}/grads-True.pt")
        identical = plain.keys() == ckpt.keys() and all(torch.equal(plain[k], ckpt[k]) for k in plain)

    mib = 2**20
    seq_len = preset_config(args.preset).seq_len
    print(f"{args.preset}, batch {args.batch} x seq {seq_len}, precision {precision}, allocator {allocator_setting()}")
    print(f"{'grad_checkpointing':<20} {'RSS before (MiB)':>17} {'peak (MiB)':>11} {'step (MiB)':>11}")
    for on, r in runs.items():
        print(f"{on!s:<20} {r['rss_before_step_bytes'] / mib:>17.0f} {r['peak_bytes'] / mib:>11.0f} {r['step_bytes'] / mib:>11.0f}")
    peak_ratio = runs[True]["peak_bytes"] / runs[False]["peak_bytes"]
    step_ratio = runs[True]["step_bytes"] / runs[False]["step_bytes"]
    print(f"with / without checkpointing: peak {peak_ratio:.2f}x, step increment {step_ratio:.2f}x; "
          f"gradients identical: {identical}")  # fmt: skip

    result = {
        "command": " ".join(sys.argv),
        "preset": args.preset,
        "batch": args.batch,
        "precision": precision,
        "allocator": allocator_setting(),
        "runs": list(runs.values()),
        "peak_ratio": peak_ratio,
        "step_ratio": step_ratio,
        "gradients_identical": identical,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    ensure_cpu_allocator_env()
    main()
