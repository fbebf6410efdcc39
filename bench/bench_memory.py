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

`--validate` checks the memory model (smallscale/train/memory.py) instead: 4 sizes x gradient
checkpointing off/on, and 3 held-out settings x off/on, each trained for 2 steps by `smallscale
train` in a fresh process (the real loop: loader, final evaluation, checkpoint). Measured: the
process's peak resident memory (summary.json), and in a separate process the peak of live tensor
bytes over the same two steps (every tensor an operator returns, tracked until it is freed: what
torch.cuda.max_memory_allocated counts on a GPU). Predicted: `memory.estimate`. Writes
bench/results/memory_model.json.
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


class LiveTensorBytes:
    """Peak bytes of live tensor storage while active: a TorchDispatchMode sees every tensor an
    operator returns (forward, backward and optimizer alike), and a finalizer on its storage says
    when it is freed. Storages that exist before (the parameters) are not counted."""

    def __init__(self, existing: list) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._count(out)
                return out

        self.mode = _Mode()
        self.live = self.peak = 0
        self._seen = {t.untyped_storage().data_ptr() for t in existing}

    def _count(self, out) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in self._seen or size == 0:
                continue
            self._seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)


def live_tensor_peak(cfg, batch: int, precision: str, optimizer_name: str = "adamw") -> int:
    """Peak live tensor bytes of two training steps (forward, backward, optimizer) of a GPT with
    config `cfg` (a GPTConfig) on CPU, weights excluded."""
    import contextlib

    import torch

    from smallscale.model.gpt import GPT
    from smallscale.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = GPT(cfg).train()
    optimizer = build_optimizer(model, OptimConfig(name=optimizer_name))
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    tracker = LiveTensorBytes([*model.parameters(), *model.buffers(), inputs, targets])
    with tracker.mode:
        for _ in range(2):
            with autocast():
                loss = model(inputs, targets).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return tracker.peak


# (preset, vocabulary, micro-batch, precision; None: the CPU's auto). The first 8 runs (4 sizes x
# checkpointing) fitted memory.CPU_RUNTIME_BYTES and CPU_ALLOCATOR_SLACK; the HELD_OUT ones did not.
VALIDATION = (("cpu-2m", 8192, 8, None), ("cpu-6m", 8192, 8, None), ("20m", 32768, 2, None), ("40m", 32768, 1, None))
HELD_OUT = (("80m", 32768, 1, None), ("cpu-6m", 8192, 4, "fp32"), ("20m", 32768, 1, "fp32"))


def validate(out_path: str) -> None:
    import os
    from pathlib import Path

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_presets_scale import train_run, wide_vocab_dataset

    from smallscale.model.presets import preset_config
    from smallscale.provenance import cpu_model
    from smallscale.train.memory import estimate
    from smallscale.train.trainer import resolve_precision

    auto = resolve_precision("auto", torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {v: wide_vocab_dataset(Path(tmp) / f"shakespeare-{v}", v) for v in (8192, 32768)}
        cases = [(*case, False) for case in VALIDATION] + [(*case, True) for case in HELD_OUT]
        for preset, vocab, batch, precision, held_out in cases:
            precision = precision or auto
            for checkpointing in (False, True):
                cfg = preset_config(preset, vocab_size=vocab, grad_checkpointing=checkpointing)
                est = estimate(cfg, batch, precision, "cpu", eval_batch=1)
                predicted_tensors = est.optimizer_state + max(est.details.values())
                run = train_run(datasets[vocab], Path(tmp) / f"{preset}-{precision}-{checkpointing}", preset, 2, batch,
                                [f"model.grad_checkpointing={str(checkpointing).lower()}", f"train.precision={precision}"])  # fmt: skip
                measured = run["summary"]["peak_mem_bytes"]
                live = json.loads(subprocess.run(
                    [sys.executable, __file__, "--live", preset, str(vocab), str(batch), precision, str(checkpointing)],
                    capture_output=True, text=True, check=True).stdout.splitlines()[-1])  # fmt: skip
                row = {
                    "preset": preset, "vocab_size": vocab, "micro_batch": batch, "seq_len": cfg.seq_len,
                    "precision": precision, "grad_checkpointing": checkpointing, "held_out": held_out,
                    "phase": est.phase, "predicted_peak_bytes": est.peak, "measured_peak_bytes": measured,
                    "error_peak": est.peak / measured - 1, "predicted_tensor_bytes": predicted_tensors,
                    "measured_live_tensor_bytes": live, "error_tensors": predicted_tensors / live - 1,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)

    mib = 2**20
    print(f"CPU: {cpu_model()}; 2 steps + the final evaluation (eval_batch 1) + checkpoint; allocator {allocator_setting()}")
    print(f"{'preset':<7} {'B':>2} {'prec':>5} {'ckpt':>5} {'peak predicted':>14} {'measured':>8} {'error':>6}  "
          f"{'tensors predicted':>17} {'live':>6} {'error':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['preset']:<7} {r['micro_batch']:>2} {r['precision']:>5} {r['grad_checkpointing']!s:>5} "
              f"{r['predicted_peak_bytes'] / mib:>14.0f} {r['measured_peak_bytes'] / mib:>8.0f} {r['error_peak']:>+6.1%}  "
              f"{r['predicted_tensor_bytes'] / mib:>17.0f} {r['measured_live_tensor_bytes'] / mib:>6.0f} "
              f"{r['error_tensors']:>+6.1%}{'  (held out)' if r['held_out'] else ''}")  # fmt: skip
    atomic_write_json(out_path, {"command": " ".join(sys.argv), "cpu": cpu_model(), "allocator": allocator_setting(), "rows": rows})
    print(f"wrote {out_path}")


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
    parser.add_argument("--validate", action="store_true", help="check the memory model (smallscale/train/memory.py)")
    parser.add_argument("--live", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.validate:
        validate(args.out if args.out != "bench/results/memory.json" else "bench/results/memory_model.json")
        return
    if args.live:
        from smallscale.model.presets import preset_config

        preset, vocab, batch, precision, checkpointing = args.live
        cfg = preset_config(preset, vocab_size=int(vocab), grad_checkpointing=checkpointing == "True")
        print(json.dumps(live_tensor_peak(cfg, int(batch), precision)))
        return
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
