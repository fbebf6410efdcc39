"""bf16 on a CPU without bf16 hardware: an explicit train.precision=bf16 warns with the measured
slowdown, and the MFU peak measurement does not spend minutes on emulated matmuls."""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from smallscale.train import telemetry, trainer

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CPU = torch.device("cpu")


def test_explicit_bf16_on_a_cpu_without_bf16_warns_with_the_measured_slowdown(monkeypatch):
    monkeypatch.setattr(trainer, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(telemetry, "cpu_matmul_rates", lambda dtype: (2.6e9, 48.4e9))
    with pytest.warns(UserWarning) as record:
        assert trainer.resolve_precision("bf16", CPU) == "bf16"
    assert str(record[0].message) == (
        "train.precision=bf16 on this CPU is emulated: a 512x512 matmul ran 19x slower than fp32 "
        "(2.6 GFLOP/s vs 48.4 GFLOP/s); use precision=fp32 or auto"
    )


@pytest.mark.parametrize(("choice", "has_bf16", "resolved"), [("bf16", True, "bf16"), ("auto", False, "fp32"), ("fp32", False, "fp32")])
def test_no_warning_and_no_measurement_unless_bf16_is_asked_for_without_hardware(choice, has_bf16, resolved, monkeypatch):
    monkeypatch.setattr(trainer, "cpu_supports_bf16", lambda: has_bf16)
    monkeypatch.setattr(telemetry, "cpu_matmul_rates", lambda dtype: pytest.fail("measured"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.resolve_precision(choice, CPU) == resolved


def test_bf16_under_the_avx2_restriction_warns_with_a_real_measurement():
    code = (
        "import warnings, torch; from smallscale.train.trainer import resolve_precision\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); resolve_precision('bf16', torch.device('cpu'))\n"
        "print([str(x.message) for x in w])"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ENV}, capture_output=True, text=True, check=True)
    match = re.search(r"ran (\d+)x slower than fp32 \(([\d.]+) GFLOP/s vs ([\d.]+) GFLOP/s\)", out.stdout)
    assert match, out.stdout
    ratio, bf16_gflops, fp32_gflops = int(match[1]), float(match[2]), float(match[3])
    assert ratio >= 2 and bf16_gflops < fp32_gflops  # emulated bf16: 19x at 512 on an AMD EPYC Zen 5
    assert abs(ratio - fp32_gflops / bf16_gflops) <= 0.5 + 0.1 * ratio  # the text's rates give its ratio (rounded)


def test_matmul_peak_skips_sizes_an_emulated_dtype_would_take_minutes_over(monkeypatch):
    timed = []

    def fake_rate(device, dtype, seconds, size):
        timed.append(size)
        return 1e9  # 1 GFLOP/s: one 2048^2 matmul would take 17 s

    monkeypatch.setattr(telemetry, "_best_matmul_rate", fake_rate)
    monkeypatch.setattr(telemetry, "_MEASURED_PEAK", {})
    assert telemetry.measure_cpu_matmul_peak(torch.bfloat16, seconds=1.0, sizes=(1024, 2048)) == 1e9
    assert timed == [512, 1024]  # the probe, then 1024 (2.1 s, under ten times its 0.5 s share)


def test_matmul_peak_times_every_size_at_hardware_speed(monkeypatch):
    timed = []
    monkeypatch.setattr(telemetry, "_best_matmul_rate", lambda device, dtype, seconds, size: timed.append(size) or size * 1e8)
    monkeypatch.setattr(telemetry, "_MEASURED_PEAK", {})
    assert telemetry.measure_cpu_matmul_peak(torch.float32, seconds=1.0, sizes=(2048, 1024)) == 2048 * 1e8
    assert timed == [512, 1024, 2048]


def test_cpu_matmul_rates_are_positive_flop_rates():
    bf16_flops, fp32_flops = telemetry.cpu_matmul_rates(torch.bfloat16, size=128, seconds=0.01)
    assert 1e7 < bf16_flops < 1e14 and 1e7 < fp32_flops < 1e14


def test_a_run_uses_the_best_of_three_measured_peaks_then_stops_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLSCALE_CACHE", str(tmp_path))
    measured = iter([1e9, 3e9, 2e9])
    calls = []

    def fake_measure(dtype):
        calls.append(dtype)
        return next(measured)

    monkeypatch.setattr(telemetry, "measure_cpu_matmul_peak", fake_measure)
    peaks = [telemetry.device_peak_flops(CPU, torch.float32)[0] for _ in range(5)]
    assert peaks == [1e9, 3e9, 3e9, 3e9, 3e9]  # a low reading (a busy machine) never lowers the peak
    assert len(calls) == telemetry.PEAK_MEASUREMENTS == 3
    cache = json.loads((tmp_path / telemetry.PEAK_CACHE_FILE).read_text())
    assert cache == {telemetry.cpu_peak_key(torch.float32): {"flops": 3e9, "measurements": 3}}


def test_the_peak_cache_is_per_dtype_and_thread_count_and_optional(tmp_path, monkeypatch):
    monkeypatch.setenv("SMALLSCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(telemetry, "measure_cpu_matmul_peak", lambda dtype: 5e9 if dtype == torch.bfloat16 else 2e9)
    assert telemetry.cached_cpu_matmul_peak(torch.bfloat16) == 5e9
    assert telemetry.cached_cpu_matmul_peak(torch.float32) == 2e9
    threads = torch.get_num_threads()
    before = telemetry.cpu_peak_key(torch.float32)
    try:
        torch.set_num_threads(threads + 1)
        assert telemetry.cpu_peak_key(torch.float32) != before  # another thread count, another peak
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / telemetry.PEAK_CACHE_FILE).mkdir()  # not a file: unreadable and unwritable as one
    monkeypatch.setenv("SMALLSCALE_CACHE", str(tmp_path / "ro"))
    assert telemetry.cached_cpu_matmul_peak(torch.float32) == 2e9


@pytest.mark.parametrize("entry", ['"x"', '{"flops": "abc", "measurements": 9}', '{"flops": -1, "measurements": 9}',
                                   '{"flops": 1e400, "measurements": 9}', '{"measurements": 9}'])  # fmt: skip
def test_a_damaged_peak_cache_entry_is_measured_again(tmp_path, monkeypatch, entry):
    monkeypatch.setenv("SMALLSCALE_CACHE", str(tmp_path))
    key = telemetry.cpu_peak_key(torch.float32)
    (tmp_path / telemetry.PEAK_CACHE_FILE).write_text(f"{{{json.dumps(key)}: {entry}}}")
    monkeypatch.setattr(telemetry, "measure_cpu_matmul_peak", lambda dtype: 2e9)
    assert telemetry.cached_cpu_matmul_peak(torch.float32) == 2e9
    assert json.loads((tmp_path / telemetry.PEAK_CACHE_FILE).read_text())[key] == {"flops": 2e9, "measurements": 1}
