"""bench/gpu_check.py: on CPU with --tiny (what CI runs) every check reports, the CUDA-only ones as
skipped, and the JSON has the GPU numbers' shape; the GPU-idle measure reads a trace correctly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from gpu_check import NO_CUDA, gpu_idle  # noqa: E402

CUDA_ONLY = ("fp16_grad_scaler", "flash_sdpa", "nvml", "cpu_gpu_parity", "idle_between_steps")


def test_gpu_check_runs_on_cpu_with_a_tiny_model_and_skips_the_cuda_paths(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert result["device"].startswith("cpu: ") and result["tiny"] is True
    assert all(checks[name]["status"] == NO_CUDA for name in CUDA_ONLY)
    assert checks["compile"]["status"].startswith(NO_CUDA)
    for name in ("bf16_autocast", "fused_adamw", "matmul_peak", "presets"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["fused_adamw"]["fused"] is True
    (tiny,) = checks["presets"]["runs"]
    assert tiny["tokens_per_s"] > 0 and 0 < tiny["mfu"] < 1 and tiny["seq_len"] == 128


def test_gpu_idle_merges_overlapping_kernels_and_measures_the_gaps():
    kernel = lambda ts, dur: {"ph": "X", "cat": "kernel", "ts": ts, "dur": dur}  # noqa: E731
    events = [kernel(0, 100), kernel(50, 100), kernel(400, 100), {"ph": "X", "cat": "cpu_op", "ts": 150, "dur": 250},
              {"ph": "X", "cat": "gpu_memcpy", "ts": 520, "dur": 80}]  # fmt: skip
    idle = gpu_idle(events)
    # busy 0-150, 400-500, 520-600 over 0-600: gaps of 250 and 20 µs
    assert idle["traced_us"] == 600
    assert idle["gpu_idle_fraction"] == pytest.approx(270 / 600)
    assert idle["longest_gap_us"] == 250 and idle["gaps_over_100us"] == 1
    assert idle["kernels"] == 4
