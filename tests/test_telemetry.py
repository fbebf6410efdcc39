"""Telemetry: peak FLOP/s, MFU, peak memory, NVML sampling (with a fake NVML) and throughput."""

from __future__ import annotations

import itertools
import sys
import types

import pytest
import torch

from smallscale.train import telemetry
from smallscale.train.telemetry import (
    GpuMonitor,
    Throughput,
    device_peak_flops,
    gpu_peak_flops,
    measure_cpu_matmul_peak,
    mfu,
    peak_memory_bytes,
    reset_peak_memory,
)


def test_cpu_matmul_peak_is_plausible_and_cached():
    peak = measure_cpu_matmul_peak(torch.float32, seconds=0.3, sizes=(512,))
    assert 1e9 < peak < 1e14  # at least 1 GFLOP/s, below any CPU's reach
    assert device_peak_flops(torch.device("cpu"), torch.float32) == (peak, "measured-cpu-matmul")


def test_mfu_arithmetic():
    # 10k tokens/s of a 10M-parameter model (6N = 6e7 FLOPs/token) on a 1.2 TFLOP/s device
    assert mfu(10_000, 6e7, 1.2e12) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA A100-SXM4-80GB", torch.float16, 312e12),
        ("NVIDIA A10G", torch.bfloat16, 70e12),
        ("NVIDIA L40S", torch.bfloat16, 362e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("Tesla V100-SXM2-32GB", torch.bfloat16, None),  # no bf16 tensor cores
        ("Tesla T4", torch.float16, 65e12),
        ("Some Future GPU", torch.bfloat16, None),
    ],
)
def test_gpu_peak_table_lookup(name, dtype, expected):
    assert gpu_peak_flops(name, dtype) == expected


def test_float32_peak_follows_the_tf32_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 67e12
        torch.set_float32_matmul_precision("high")
        assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 494.5e12
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU peak can only be reset on Linux")
def test_peak_memory_grows_after_allocating_a_large_tensor():
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_bytes(cpu)
    big = torch.ones(64 * 2**20)  # 256 MiB, touched so it is resident
    after = peak_memory_bytes(cpu)
    del big
    assert after - before > 200 * 2**20


class FakeNVMLError(Exception):
    pass


def fake_pynvml(energy_mj=None, utils=(40, 80), power_mw=100_000):
    """A stand-in for the pynvml module: scripted counter readings and utilisation samples."""
    energy = iter(energy_mj) if energy_mj is not None else None
    util = itertools.cycle(utils)
    calls = {"init": 0, "shutdown": 0}

    def total_energy(handle):
        if energy is None:
            raise FakeNVMLError("Not Supported")
        return next(energy)

    def init():
        calls["init"] += 1

    def shutdown():
        calls["shutdown"] += 1

    return types.SimpleNamespace(
        NVMLError=FakeNVMLError,
        nvmlInit=init,
        nvmlShutdown=shutdown,
        nvmlDeviceGetHandleByIndex=lambda index: f"handle{index}",
        nvmlDeviceGetHandleByUUID=lambda uuid: "handle-uuid",
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
        nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=next(util), memory=0),
        nvmlDeviceGetPowerUsage=lambda handle: power_mw,
        calls=calls,
    )


def test_gpu_monitor_energy_from_two_counter_readings_and_mean_util(monkeypatch):
    nvml = fake_pynvml(energy_mj=[5_000_000, 5_250_000])
    monkeypatch.setattr(telemetry, "_import_pynvml", lambda: nvml)
    # a long interval: the thread samples once on start (40), stop samples once more (80)
    gpu = GpuMonitor("cuda:0", interval_s=3600)
    gpu.start()
    assert gpu.stop() == gpu.summary() == {"gpu_util": 60.0, "energy_j": 250.0}
    assert nvml.calls == {"init": 1, "shutdown": 1}


def test_gpu_monitor_integrates_power_without_an_energy_counter(monkeypatch):
    nvml = fake_pynvml(energy_mj=None, utils=(50,), power_mw=200_000)  # 200 W
    monkeypatch.setattr(telemetry, "_import_pynvml", lambda: nvml)
    clock = itertools.count(start=10.0, step=0.5)  # each power sample 0.5 s after the last
    with GpuMonitor("cuda:0", interval_s=3600, clock=lambda: next(clock)) as gpu:
        pass
    # two samples 0.5 s apart at 200 W
    assert gpu.summary() == {"gpu_util": 50.0, "energy_j": pytest.approx(100.0)}


def test_gpu_monitor_is_a_no_op_on_cpu(monkeypatch):
    nvml = fake_pynvml(energy_mj=[0, 1])
    monkeypatch.setattr(telemetry, "_import_pynvml", lambda: nvml)
    with GpuMonitor(torch.device("cpu")) as gpu:
        pass
    assert gpu.summary() == {"gpu_util": None, "energy_j": None}
    assert nvml.calls["init"] == 0


def test_gpu_monitor_is_a_no_op_without_nvml(monkeypatch):
    monkeypatch.setattr(telemetry, "_import_pynvml", lambda: None)
    with GpuMonitor("cuda:0") as gpu:
        pass
    assert gpu.summary() == {"gpu_util": None, "energy_j": None}


def test_throughput_over_a_window_and_overall():
    now = [0.0]
    meter = Throughput(window=2, clock=lambda: now[0])
    for tokens, step_s in [(1000, 1.0), (1000, 0.5), (3000, 0.5)]:
        now[0] += step_s
        meter.update(tokens)
    assert meter.tokens_per_s == pytest.approx(4000 / 1.0)  # the last two steps
    assert meter.overall_tokens_per_s == pytest.approx(5000 / 2.0)
    now[0] += 60.0  # an evaluation, excluded by restarting the clock
    meter.restart_clock()
    now[0] += 1.0
    meter.update(500)
    assert meter.overall_tokens_per_s == pytest.approx(5500 / 3.0)
