"""One command that checks every CUDA path smallscale takes and measures the GPU, in at most ~5
minutes on one GPU; writes bench/results/gpu.json.

Checks (each 'ok', 'failed: ...' or 'skipped: ...'; the exit status is 1 if any failed):
  bf16_autocast     a training step under torch.autocast(bf16): finite loss, bf16 logits, gradients
  fp16_grad_scaler  steps under fp16 autocast with torch.amp.GradScaler: the update is applied, the
                    scale stays finite
  compile           torch.compile(model) matches the eager loss (bf16) and trains
  flash_sdpa        the model's attention runs inside sdpa_kernel(SDPBackend.FLASH_ATTENTION) alone,
                    forward and backward, and matches the math backend
  fused_adamw       the optimizer smallscale builds is AdamW(fused=True) and its step matches the
                    unfused one
  nvml              telemetry.GpuMonitor reads utilisation and energy while the GPU works
  matmul_peak       the measured bf16 matmul FLOP/s against the datasheet peak (telemetry.PEAK_FLOPS)
  cpu_gpu_parity    a tiny fp32 model trained 5 steps on CPU and on the GPU: the same losses
  presets           tokens/s, MFU and peak memory (with the memory model's prediction) of
                    20m/40m/80m/160m at seq 1024: compiled, bf16, fused AdamW, micro-batch 16
  idle_between_steps  `smallscale train` (20m, compiled, 2 micro-batches per step) traced by
                    torch.profiler over 3 steady steps: the fraction of the traced time the GPU runs
                    no kernel and the longest gap, i.e. whether the loop's host work starves the GPU

`--device cpu --tiny` runs the same script on CPU with a tiny model (CI, seconds): the checks that
need CUDA report "skipped: no CUDA device", the others run on CPU, so the script cannot rot.

Run: `bash dev.sh shell python bench/gpu_check.py` on a GPU machine (`--device cuda:1` for another GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from smallscale.model.gpt import GPT, GPTConfig
from smallscale.model.presets import preset_config
from smallscale.optim import OptimConfig, build_optimizer
from smallscale.train import memory, telemetry

REPO = Path(__file__).resolve().parents[1]

NO_CUDA = "skipped: no CUDA device"
PRESETS = ("20m", "40m", "80m", "160m")
TINY = {"vocab_size": 512, "seq_len": 128, "n_layer": 2, "n_head": 2, "d_model": 64}


def cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else NO_CUDA


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch(cfg: GPTConfig, micro_batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (inputs, targets) of shape (micro_batch, seq_len), the same for a given seed on any device."""
    ids = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def small_model(tiny: bool, device: torch.device, **overrides: Any) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY, **overrides) if tiny else preset_config("20m", **overrides)
    return GPT(cfg).to(device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- checks
def check_bf16_autocast(device: torch.device, tiny: bool) -> dict:
    model = small_model(tiny, device)
    inputs, targets = batch(model.cfg, 2, device)
    with autocast(device, torch.bfloat16):
        out = model(inputs, targets)
    out.loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    ok = out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss).item() and grads_finite
    return {"status": "ok" if ok else "failed: non-finite loss/gradients or logits not bf16",
            "loss": out.loss.item(), "logits_dtype": str(out.logits.dtype)}  # fmt: skip


def check_fp16_grad_scaler(device: torch.device, tiny: bool) -> dict:
    if skip := cuda_only(device):
        return {"status": skip}
    model = small_model(tiny, device)
    optimizer = build_optimizer(model, OptimConfig())
    scaler = torch.amp.GradScaler("cuda")
    before = model.tok_emb.weight.detach().clone()
    losses = []
    for step in range(3):
        inputs, targets = batch(model.cfg, 2, device, seed=step)
        with autocast(device, torch.float16):
            loss = model(inputs, targets).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    moved = not torch.equal(before, model.tok_emb.weight.detach())
    scale = scaler.get_scale()
    ok = moved and all(map(torch.isfinite, map(torch.tensor, losses))) and 0 < scale < float("inf")
    return {"status": "ok" if ok else "failed: no update applied or non-finite loss/scale", "losses": losses, "scale": scale}


def check_compile(device: torch.device, tiny: bool) -> dict:
    if device.type != "cuda" and tiny:
        return {"status": f"{NO_CUDA} (compiling on CPU takes ~30 s; tests/test_train.py covers it)"}
    model = small_model(tiny, device)
    inputs, targets = batch(model.cfg, 4, device)
    with autocast(device, torch.bfloat16):
        eager = model(inputs, targets).loss.item()
    compiled = torch.compile(model)
    start = time.perf_counter()
    with autocast(device, torch.bfloat16):
        loss = compiled(inputs, targets).loss
    loss.backward()
    synchronize(device)
    compile_s = time.perf_counter() - start
    close = abs(loss.item() - eager) < 2e-2  # bf16: fused kernels round differently
    return {"status": "ok" if close else f"failed: compiled loss {loss.item():.4f} vs eager {eager:.4f}",
            "eager_loss": eager, "compiled_loss": loss.item(), "compile_s": compile_s}  # fmt: skip


def check_flash_sdpa(device: torch.device, tiny: bool) -> dict:
    if skip := cuda_only(device):
        return {"status": skip}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = small_model(tiny, device).to(torch.bfloat16)
    inputs, targets = batch(model.cfg, 2, device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" if flash cannot run
        flash = model(inputs, targets).loss
        flash.backward()
    with sdpa_kernel(SDPBackend.MATH):
        math_loss = model(inputs, targets).loss
    close = abs(flash.item() - math_loss.item()) < 2e-2
    return {"status": "ok" if close else "failed: flash and math attention disagree",
            "flash_loss": flash.item(), "math_loss": math_loss.item()}  # fmt: skip


def check_fused_adamw(device: torch.device, tiny: bool) -> dict:
    model = small_model(tiny, device)
    reference = small_model(tiny, device)
    optimizer = build_optimizer(model, OptimConfig())
    fused = bool(optimizer.defaults.get("fused"))
    unfused = torch.optim.AdamW(reference.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=False)
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0  # compare the update itself; decay groups are optim.py's business
    inputs, targets = batch(model.cfg, 2, device)
    for m, opt in ((model, optimizer), (reference, unfused)):
        m(inputs, targets).loss.backward()
        opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    ok = fused and diff < 1e-5
    return {"status": "ok" if ok else f"failed: fused={fused}, max difference {diff:.2e}", "fused": fused, "max_abs_diff": diff}


def check_nvml(device: torch.device, tiny: bool) -> dict:
    if skip := cuda_only(device):
        return {"status": skip}
    if telemetry._import_pynvml() is None:
        return {"status": "failed: pynvml is not installed (pip install nvidia-ml-py)"}
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    with telemetry.GpuMonitor(device, interval_s=0.1) as gpu:
        deadline = time.perf_counter() + 3.0
        while time.perf_counter() < deadline:
            for _ in range(20):
                a = (a @ a).clamp_(-1, 1)
            synchronize(device)
    summary = gpu.summary()
    ok = summary["gpu_util"] is not None and summary["gpu_util"] > 50 and (summary["energy_j"] or 0) > 0
    return {"status": "ok" if ok else f"failed: NVML read {summary}", **summary}


def check_matmul_peak(device: torch.device, tiny: bool) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" or not tiny else torch.float32
    sizes = (256,) if tiny else (4096, 8192)
    measured = telemetry._measure_matmul_peak(device, dtype, seconds=0.2 if tiny else 3.0, sizes=sizes)
    datasheet = telemetry.gpu_peak_flops(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None
    return {"status": "ok" if measured > 0 else "failed: no FLOP/s measured", "dtype": str(dtype), "sizes": sizes,
            "measured_flops": measured, "datasheet_flops": datasheet,
            "measured_over_datasheet": measured / datasheet if datasheet else None}  # fmt: skip


def check_cpu_gpu_parity(device: torch.device, tiny: bool) -> dict:
    if skip := cuda_only(device):
        return {"status": skip}
    losses = {}
    for where in (torch.device("cpu"), device):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY)).to(where)
        optimizer = build_optimizer(model, OptimConfig())
        run = []
        for step in range(5):
            inputs, targets = batch(model.cfg, 4, where, seed=step)
            loss = model(inputs, targets).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses[where.type] = run
    diff = max(abs(a - b) for a, b in zip(losses["cpu"], losses["cuda"], strict=True))
    return {"status": "ok" if diff < 1e-4 else f"failed: losses differ by {diff:.2e}", "max_abs_diff": diff,
            "losses_cpu": losses["cpu"], "losses_gpu": losses["cuda"]}  # fmt: skip


def measure_presets(device: torch.device, tiny: bool, steps: int) -> dict:
    """tokens/s and MFU of each GPU preset at seq 1024 (a tiny model on CPU): the trainer's step
    (bf16 autocast, fused AdamW, clipping), compiled on CUDA, timed over `steps` after 3 warm-up steps."""
    names = ("tiny",) if tiny else PRESETS
    micro_batch = 4 if tiny else 16
    dtype = torch.bfloat16
    peak, peak_source = telemetry.device_peak_flops(device, dtype)
    rows = []
    for name in names:
        torch.compiler.reset()  # each preset compiled afresh, with static shapes
        torch.manual_seed(0)
        cfg = GPTConfig(**TINY) if name == "tiny" else preset_config(name)
        model = GPT(cfg).to(device)
        optimizer = build_optimizer(model, OptimConfig())
        forward = torch.compile(model) if device.type == "cuda" else model
        inputs, targets = batch(cfg, micro_batch, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step() -> torch.Tensor:
            with autocast(device, dtype):
                loss = forward(inputs, targets).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        start = time.perf_counter()
        for _ in range(3):
            step()
        synchronize(device)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        synchronize(device)
        seconds = time.perf_counter() - start
        tokens_per_s = steps * micro_batch * cfg.seq_len / seconds
        flops_per_token = model.flops_per_token()
        predicted = memory.estimate(cfg, micro_batch, "bf16", device.type, eval_batch=0)
        step_tensors = predicted.weights + predicted.optimizer_state + max(predicted.details.values())
        rows.append({
            "preset": name, "params": model.num_params(), "seq_len": cfg.seq_len, "micro_batch": micro_batch,
            "compiled": device.type == "cuda", "warmup_s": warmup_s, "step_s": seconds / steps,
            "tokens_per_s": tokens_per_s, "mfu": telemetry.mfu(tokens_per_s, flops_per_token, peak),
            "loss": loss.item(),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "predicted_tensor_bytes": step_tensors,
        })  # fmt: skip
        del model, optimizer, forward
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "ok", "peak_flops": peak, "peak_flops_source": peak_source, "runs": rows}


def measure_idle_between_steps(device: torch.device, tiny: bool, work: Path) -> dict:
    """Run `smallscale train` for 8 steps under torch.profiler, tracing steps 3-5 (after compiling),
    and measure how much of the traced time the GPU runs no kernel."""
    if skip := cuda_only(device):
        return {"status": skip}
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    from smallscale.train.trainer import load_run_config, train

    sys.path.insert(0, str(REPO / "bench"))
    from bench_presets_scale import wide_vocab_dataset

    corpus = work / "corpus.txt"
    words = "the of a to and in that is was for on with as by at from it his an were are which be this".split()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(words), (400_000,), generator=gen).tolist()
    corpus.write_text("\n".join(" ".join(words[i] for i in ids[j : j + 40]) for j in range(0, len(ids), 40)), encoding="utf-8")
    dataset = wide_vocab_dataset(work / "synthetic-32768", 32768, source=str(corpus), split_by="line")
    cfg = load_run_config(None, [
        f"out={work / 'run'}", f"data.path={dataset}", "model.preset=20m", "train.steps=8", "train.micro_batch=16",
        "train.global_batch_tokens=32768", "train.precision=bf16", "train.compile=true", "train.device=cuda",
        "train.eval_batch=4", "train.log_every_steps=1",
    ])  # fmt: skip
    trace_path = work / "trace.json"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=2, warmup=1, active=3, repeat=1),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(trace_path))) as prof:  # fmt: skip
        handle = register_optimizer_step_post_hook(lambda *_: prof.step())  # one profiler step per optimizer step
        try:
            train(cfg, progress=False)
        finally:
            handle.remove()
    return {"status": "ok", **gpu_idle(json.loads(trace_path.read_text())["traceEvents"])}


def gpu_idle(events: list[dict]) -> dict:
    """Idle fraction and gaps of the GPU timeline in a chrome trace: kernels, copies and memsets
    ('ts', 'dur' in µs) merged into busy intervals."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))  # fmt: skip
    if not spans:
        return {"gpu_idle_fraction": None, "note": "no GPU kernels in the trace"}
    busy, gaps, (start, end) = 0.0, [], spans[0]
    for s, e in spans[1:]:
        if s > end:  # the GPU ran nothing from `end` to `s`
            busy += end - start
            gaps.append(s - end)
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    total = max(e for _, e in spans) - spans[0][0]
    return {
        "traced_us": total,
        "gpu_idle_fraction": 1 - busy / total if total else 0.0,
        "longest_gap_us": max(gaps, default=0.0),
        "gaps_over_100us": sum(g > 100 for g in gaps),
        "idle_in_gaps_over_100us": sum(g for g in gaps if g > 100) / total if total else 0.0,
        "kernels": len(spans),
    }


# ----------------------------------------------------------------------------- driver
def run_check(name: str, fn: Callable[[], dict]) -> dict:
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # a failed check is a result to report, not the end of the run
        result = {"status": f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}",
                  "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    print(f"{name:<20} {result['status']}  ({result['seconds']:.1f} s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model instead of the 20m-160m presets (CI)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per preset")
    parser.add_argument("--out", default=str(REPO / "bench/results/gpu.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu --tiny to check the script itself", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan: dict[str, Callable[[], dict]] = {
            "bf16_autocast": lambda: check_bf16_autocast(device, args.tiny),
            "fp16_grad_scaler": lambda: check_fp16_grad_scaler(device, args.tiny),
            "compile": lambda: check_compile(device, args.tiny),
            "flash_sdpa": lambda: check_flash_sdpa(device, args.tiny),
            "fused_adamw": lambda: check_fused_adamw(device, args.tiny),
            "nvml": lambda: check_nvml(device, args.tiny),
            "matmul_peak": lambda: check_matmul_peak(device, args.tiny),
            "cpu_gpu_parity": lambda: check_cpu_gpu_parity(device, args.tiny),
            "presets": lambda: measure_presets(device, args.tiny, args.steps),
            "idle_between_steps": lambda: measure_idle_between_steps(device, args.tiny, Path(tmp)),
        }
        for name, fn in plan.items():
            checks[name] = run_check(name, fn)
    for row in checks["presets"].get("runs", []):
        print(f"  {row['preset']:<5} {row['tokens_per_s']:>10,.0f} tokens/s  MFU {row['mfu']:.1%}  step {row['step_s'] * 1000:.1f} ms"
              + (f"  peak {row['peak_allocated_bytes'] / 2**30:.2f} GiB (predicted {row['predicted_tensor_bytes'] / 2**30:.2f})"
                 if row["peak_allocated_bytes"] else ""))  # fmt: skip
    from smallscale.io import atomic_write_json
    from smallscale.provenance import cpu_model

    result = {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_model()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": args.tiny,
        "wall_s": time.perf_counter() - started,
        "checks": checks,
    }
    atomic_write_json(args.out, result)
    failed = [name for name, c in checks.items() if c["status"].startswith("failed")]
    print(f"wrote {args.out} ({result['wall_s']:.0f} s); " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed or skipped"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
