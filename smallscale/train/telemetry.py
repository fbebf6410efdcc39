"""Efficiency measurement: throughput, MFU, peak memory, GPU utilisation and energy.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per token from the project convention
6N + 12·n_layer·d_model·seq_len (ARCHITECTURE.md). The peak comes from a datasheet table on known
GPUs and from a timed matmul elsewhere (CPU, unknown GPUs); `device_peak_flops` says which.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

# Dense peak FLOP/s from NVIDIA datasheets: no 2:4 structured sparsity (datasheets quote the
# sparse figure with an asterisk; it is twice these). 'bf16'/'fp16' are tensor-core peaks with
# FP32 accumulate (what torch uses); 'tf32' is the tensor-core path torch takes for float32
# matmuls when TF32 is allowed; 'fp32' is the non-tensor-core peak. No entry = not accelerated.
# Keys are matched as substrings of torch.cuda.get_device_name(); the longest match wins, so
# 'H100 PCIe' beats 'H100' and 'A100' beats 'A10'.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},  # SXM4 and PCIe, 40/80GB
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},  # SXM5 ('H100 80GB HBM3')
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},  # SXM; same die as H100 SXM
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    # AWS-only variant with no NVIDIA datasheet; figures as AWS and its resellers publish them.
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 35e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},  # SXM2; no bf16 or tf32 tensor cores
    "V100-PCIE": {"fp16": 112e12, "fp32": 14e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def _table_key(device_name: str) -> str | None:
    matches = [key for key in PEAK_FLOPS if key in device_name]
    return max(matches, key=len) if matches else None


def _precision_key(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    assert dtype == torch.float32, f"no peak FLOP/s table for {dtype}"
    # float32 matmuls run on TF32 tensor cores unless the precision is 'highest' (torch's default).
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet dense peak FLOP/s of the GPU called `device_name` for matmuls in `dtype`.

    None for a GPU not in `PEAK_FLOPS`, or a dtype it does not accelerate (bf16 on V100/T4).
    float32 reads the current `torch.get_float32_matmul_precision()` to choose TF32 or FP32.
    """
    key = _table_key(device_name)
    return None if key is None else PEAK_FLOPS[key].get(_precision_key(dtype))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        getattr(torch, device.type).synchronize()  # torch.mps / torch.xpu


_MEASURED_PEAK: dict[tuple[str, torch.dtype], float] = {}


def _measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float, sizes: tuple[int, ...]) -> float:
    """Best FLOP/s over timed rounds of square matmuls of each size in `sizes` (`seconds` shared
    among them), cached per (device type, dtype)."""
    cache_key = (device.type, dtype)
    if cache_key in _MEASURED_PEAK:
        return _MEASURED_PEAK[cache_key]
    # A quick probe first, then each size unless one matmul at the best rate so far would take over
    # ten times its time share: where the dtype is emulated (bf16 on an AVX2 CPU, AMD EPYC Zen 5
    # restricted: one 2048^2 matmul took 195 s against 0.2 s in fp32) the large sizes are skipped.
    # The margin keeps a probe slowed by a busy machine from skipping a size that would run fine.
    best = _best_matmul_rate(device, dtype, 0.0, _PROBE_SIZE)
    for size in sorted(sizes):
        if 2 * size**3 / best <= 10 * seconds / len(sizes):
            best = max(best, _best_matmul_rate(device, dtype, seconds / len(sizes), size))
    _MEASURED_PEAK[cache_key] = best
    return best


_PROBE_SIZE = 512


def cpu_matmul_rates(dtype: torch.dtype, size: int = _PROBE_SIZE, seconds: float = 0.1) -> tuple[float, float]:
    """(FLOP/s in `dtype`, FLOP/s in fp32) of `size` x `size` CPU matmuls, each the best over about
    `seconds` and at least one timed matmul: whether `dtype` runs in hardware, in well under a
    second (an emulated bf16 512 matmul takes ~0.1 s: 2.6 against 48 GFLOP/s in fp32, AMD EPYC
    Zen 5 restricted to AVX2)."""
    cpu = torch.device("cpu")
    return _best_matmul_rate(cpu, dtype, seconds, size), _best_matmul_rate(cpu, torch.float32, seconds, size)


def _best_matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float, size: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    flops_per_matmul = 2 * size**3
    torch.matmul(a, b, out=out)  # warm-up: thread pools, kernel selection
    _synchronize(device)
    best, reps, deadline = 0.0, 1, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)  # into one buffer: time the matmul, not the allocator
        _synchronize(device)
        elapsed = time.perf_counter() - start
        best = max(best, reps * flops_per_matmul / elapsed)
        if elapsed < 0.05:
            reps *= 2  # rounds long enough that the timer and launch overhead do not count
        if time.perf_counter() >= deadline:
            break
    return best


# On the 2-core Intel Xeon with AMX bf16 runs at 1.2-1.4 TFLOP/s at 1024 but 2.1-2.6 at 2048
# (bench/bench_components.py, 'matmul_peak'): one size alone would understate the peak and
# overstate MFU. fp32 is ~0.34-0.40 TFLOP/s at both.
CPU_PEAK_SIZES = (1024, 2048)


def measure_cpu_matmul_peak(
    dtype: torch.dtype = torch.float32, seconds: float = 1.0, sizes: tuple[int, ...] = CPU_PEAK_SIZES
) -> float:
    """Achievable CPU FLOP/s for `dtype`: the best rate of torch.matmul on square matrices of the
    given sizes.

    Runs with the current `torch.get_num_threads()`, i.e. what training gets. The first result per
    dtype is cached for the life of the process; later calls return it whatever their arguments.
    """
    return _measure_matmul_peak(torch.device("cpu"), dtype, seconds, sizes)


# A CPU run measures the matmul peak only until this machine has PEAK_MEASUREMENTS measurements of
# it (same CPU model, ISA level, torch version, dtype and thread count); then it uses their best,
# kept in $SMALLSCALE_CACHE/cpu_matmul_peak.json (default ~/.cache/smallscale). Why: the measurement
# costs ~1 s of every run's startup, and one taken while another process shares the cores reads
# low, which made the MFU of identical runs of one study differ by up to 2x; the best of a few is
# the machine's peak, the same for every later run.
PEAK_MEASUREMENTS = 3
PEAK_CACHE_FILE = "cpu_matmul_peak.json"


def _peak_cache_path() -> Path:
    base = os.environ.get("SMALLSCALE_CACHE") or Path.home() / ".cache" / "smallscale"
    return Path(base) / PEAK_CACHE_FILE


def cpu_peak_key(dtype: torch.dtype) -> str:
    """What a CPU matmul peak depends on: CPU model, ISA level as torch dispatches, torch, dtype, threads."""
    from smallscale.provenance import cpu_model

    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()}|{capability}|torch {torch.__version__}|{dtype}|threads {torch.get_num_threads()}"


def cached_cpu_matmul_peak(dtype: torch.dtype) -> float:
    """`measure_cpu_matmul_peak`, or the best of this machine's earlier measurements once it has
    PEAK_MEASUREMENTS of them (see above). A cache that cannot be read or written is ignored."""
    path, key = _peak_cache_path(), cpu_peak_key(dtype)
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(key)
    try:  # an entry of any other shape (an edited or damaged file) counts as no measurement
        flops, measurements = float(entry["flops"]), int(entry["measurements"])
        if not (math.isfinite(flops) and flops > 0):
            raise ValueError(flops)
    except (TypeError, KeyError, ValueError, OverflowError):
        flops, measurements = 0.0, 0
    if measurements >= PEAK_MEASUREMENTS:
        return flops
    best = max(measure_cpu_matmul_peak(dtype), flops)
    cache[key] = {"flops": best, "measurements": measurements + 1}
    try:
        from smallscale.io import atomic_write_json

        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only home: measure every run, as before
    return best


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s for MFU on `device` in `dtype`, and where it came from.

    Known GPUs: the datasheet table ('table:H100'). Everything else, CPU included: a timed matmul
    on the device ('measured-cuda-matmul', 'measured-cpu-matmul', ...). A measured peak is below
    the datasheet one, so MFU against it reads higher than MFU against a table value.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key, peak = _table_key(name), gpu_peak_flops(name, dtype)
        if peak is not None:
            return peak, f"table:{key}"
    if device.type == "cpu":
        return cached_cpu_matmul_peak(dtype), "measured-cpu-matmul"
    return _measure_matmul_peak(device, dtype, seconds=1.0, sizes=(4096,)), f"measured-{device.type}-matmul"


def device_name(device: torch.device) -> str:
    """'cpu: <model name>' or the CUDA device name, for results tables."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from smallscale.provenance import cpu_model

    return f"cpu: {cpu_model()}"


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (an exec, as the allocator re-exec, keeps the start)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of `peak_flops`."""
    assert peak_flops > 0, peak_flops
    return tokens_per_s * flops_per_token / peak_flops


def _vm_hwm_bytes() -> int | None:
    """Linux peak resident set size (VmHWM), which /proc/self/clear_refs can reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last `reset_peak_memory`: CUDA allocator peak, else peak process RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss if sys.platform == "darwin" else max_rss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window. On CPU this works on Linux only (elsewhere the peak runs from
    process start)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        pass


def _import_pynvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuMonitor:
    """Samples NVML while a block runs: mean GPU utilisation and energy used.

        with GpuMonitor(device) as gpu:
            train()
        gpu.summary()  # {'gpu_util': 87.5, 'energy_j': 1234.0}; also what stop() returns

    gpu_util is NVML's utilisation (percent of time at least one kernel ran, not SM occupancy),
    sampled every `interval_s` on a background thread and once more at exit. energy_j is the delta
    of the board's energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ, Volta and newer), else
    the power samples integrated over time. On CPU, or without a working NVML, it does nothing and
    both values are None.
    """

    def __init__(
        self,
        device: torch.device | str,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self._clock = clock
        self._nvml: Any = None
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._utils: list[float] = []
        self._power_samples: list[tuple[float, float]] = []  # (clock s, watts)
        self._energy_start_mj: int | None = None
        self._energy_j: float | None = None

    def __enter__(self) -> GpuMonitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.device.type != "cuda":
            return
        self._stop.clear()
        self._utils, self._power_samples, self._energy_j = [], [], None
        nvml = _import_pynvml()
        if nvml is None:
            return
        try:
            nvml.nvmlInit()
            self._handle = _nvml_handle(nvml, self.device)
        except nvml.NVMLError:
            return
        self._nvml = nvml
        try:
            self._energy_start_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except nvml.NVMLError:
            self._energy_start_mj = None  # pre-Volta: integrate power instead
        self._thread = threading.Thread(target=self._run, name="GpuMonitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval_s):
                return

    def _sample(self) -> None:
        nvml = self._nvml
        try:
            self._utils.append(float(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            if self._energy_start_mj is None:
                watts = nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0  # mW
                self._power_samples.append((self._clock(), watts))
        except nvml.NVMLError:
            pass  # a missed sample only thins the average

    def stop(self) -> dict[str, float | None]:
        """Stop sampling; returns `summary()`."""
        if self._thread is None:
            return self.summary()
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        nvml = self._nvml
        if self._energy_start_mj is not None:
            try:
                end_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
                self._energy_j = (end_mj - self._energy_start_mj) / 1000.0
            except nvml.NVMLError:
                self._energy_j = None
        elif len(self._power_samples) >= 2:
            samples = self._power_samples
            self._energy_j = sum(  # trapezoid rule
                (t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(samples, samples[1:], strict=False)
            )
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
        return self.summary()

    def summary(self) -> dict[str, float | None]:
        gpu_util = sum(self._utils) / len(self._utils) if self._utils else None
        return {"gpu_util": gpu_util, "energy_j": self._energy_j}


def _nvml_handle(nvml: Any, device: torch.device) -> Any:
    """NVML's handle for a torch CUDA device, matched by UUID: CUDA and NVML number devices
    differently when CUDA_VISIBLE_DEVICES reorders or hides them."""
    index = device.index if device.index is not None else 0
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except (AssertionError, RuntimeError, AttributeError):
        return nvml.nvmlDeviceGetHandleByIndex(index)
    return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")


class Throughput:
    """Tokens per second over the last `window` updates and over the whole run.

    Each `update(tokens)` counts the time since the previous update (or `restart_clock()`), so
    call `restart_clock()` after evaluation or checkpointing to keep them out of training speed.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self.total_tokens = 0
        self.total_s = 0.0
        self._last = clock()

    def restart_clock(self) -> None:
        self._last = self._clock()

    def update(self, tokens: int) -> None:
        now = self._clock()
        elapsed_s, self._last = now - self._last, now
        self._recent.append((tokens, elapsed_s))
        self.total_tokens += tokens
        self.total_s += elapsed_s

    @property
    def tokens_per_s(self) -> float:
        """Over the last `window` updates; 0 before the first."""
        seconds = sum(s for _, s in self._recent)
        return sum(t for t, _ in self._recent) / seconds if seconds > 0 else 0.0

    @property
    def overall_tokens_per_s(self) -> float:
        return self.total_tokens / self.total_s if self.total_s > 0 else 0.0
