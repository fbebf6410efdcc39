"""Process-start settings that must be in force before the first allocation: the CPU allocator and
the OpenMP wait policy.

glibc malloc serves an allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with
a fresh mmap and returns it with munmap on free. A CPU training step allocates and frees its logits
and activations (up to hundreds of MiB) every step, so every step maps them again and the kernel
zero-fills each page on first touch. On the 2-core reference machine, at the shape of
bench/bench_train.py: 46k page faults and 87 ms of system time per step for smallscale (bf16),
174k and 326 ms for the HF GPT2 fp32 peer. Raising the mmap and trim thresholds keeps freed memory
in the heap for reuse: ~0 faults, 1-20 ms of system time, steps 12-16% shorter. glibc reads the
thresholds once, at process start, hence the re-exec. The cost: the process keeps its peak memory
until it exits. tcmalloc (LD_PRELOAD) measured the same; it needs a package installed, this does not.

The OpenMP runtime of torch's CPU build (libgomp) reads OMP_WAIT_POLICY when torch is imported: see
WAIT_POLICY below for when it is set to PASSIVE and why.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

OPT_OUT_VAR = "SMALLSCALE_NO_MALLOC_TUNING"
# Every allocation below this many bytes comes from the heap; freed heap memory is kept up to the
# same amount. 64 GiB: far above any tensor of a CPU-sized model, and a bound, not a reservation.
MALLOC_THRESHOLD_BYTES = 64 * 2**30
# Not glibc.malloc.hugetlb=1 (transparent huge pages on the heap): a few percent less CPU per step
# for smallscale, but where the kernel reclaims idle pages (DAMON) every refault then costs a 2 MiB
# zeroing and compaction, ~100 ms of system time per step for the HF GPT2 fp32 peer of the bench.
MALLOC_TUNABLES = (
    f"glibc.malloc.mmap_threshold={MALLOC_THRESHOLD_BYTES}:glibc.malloc.trim_threshold={MALLOC_THRESHOLD_BYTES}"
)
_USER_CHOICE_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
# OpenMP wait policy. libgomp's default spins ~300000 rounds (~3 ms) before an idle thread sleeps:
# fastest alone, but next to another busy process the spinning threads take the cores it needs.
# bench/bench_threads.py --part policy (AMD EPYC Zen 5, 2 cores, fp32, cpu-2m at its former 7 x 112 shape, 2 threads, medians of
# 2): alone, default 11,248 tokens/s vs PASSIVE 9,770 (-13%); next to a process busy on one core,
# default 3,250 vs PASSIVE 5,942 (+83%); bf16: alone 25,826 vs 17,673 (-32%), next to a busy core
# 7,939 vs 14,458 (+82%). So PASSIVE when other processes already keep at least
# BUSY_LOAD cores busy as this one starts (1-minute load average), else libgomp's default.
WAIT_POLICY = "PASSIVE"
BUSY_LOAD = 0.5
# Either of these set by the user is their choice of how OpenMP threads wait, and is kept.
_WAIT_CHOICE_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _load_average() -> float:
    """Cores other processes keep busy, as far as is cheaply known at launch: the 1-minute load
    average, but 0 when this process is the only runnable one at this instant (/proc/loadavg's
    running count), since the average lags a job that has just ended."""
    try:
        fields = Path("/proc/loadavg").read_text(encoding="ascii").split()
        return float(fields[0]) if int(fields[3].split("/")[0]) >= 2 else 0.0
    except (OSError, ValueError, IndexError):  # not Linux
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def allocator_setting(environ: dict[str, str] | None = None) -> str:
    """What allocator setting the environment asks for: 'opt-out', 'preloaded' (jemalloc/tcmalloc
    in LD_PRELOAD), 'user' (the user's own glibc malloc settings), 'tuned' (ours), 'not-glibc', or
    'default'. Recorded by benchmarks next to their numbers."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT_VAR) == "1":
        return "opt-out"
    if any(name in env.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "preloaded"
    tunables = env.get("GLIBC_TUNABLES", "")
    if MALLOC_TUNABLES in tunables:
        return "tuned"
    if "glibc.malloc." in tunables or any(name in env for name in _USER_CHOICE_VARS):
        return "user"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not-glibc"
    return "default"


def launch_env(environ: dict[str, str] | None = None, load: float | None = None) -> dict[str, str]:
    """The environment variables to set before this process allocates or imports torch: the malloc
    thresholds (unless the allocator is already chosen, see `allocator_setting`) and, on a busy
    machine (`load`, default the 1-minute load average, at least BUSY_LOAD), the passive OpenMP
    wait policy (unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT). Empty when all is in force."""
    env = os.environ if environ is None else environ
    changes = {}
    if allocator_setting(env) == "default":
        previous = env.get("GLIBC_TUNABLES")
        changes["GLIBC_TUNABLES"] = f"{previous}:{MALLOC_TUNABLES}" if previous else MALLOC_TUNABLES
    busy = (_load_average() if load is None else load) >= BUSY_LOAD
    if busy and not any(name in env for name in _WAIT_CHOICE_VARS):
        changes["OMP_WAIT_POLICY"] = WAIT_POLICY
    return changes


def ensure_cpu_allocator_env(argv: list[str] | None = None) -> None:
    """Put the settings of `launch_env` in force (see the module docstring): set them in this
    process's environment and re-exec it once, which the malloc thresholds need (glibc reads them
    at process start). The wait policy takes effect when torch is imported after this call (libgomp
    reads it as it loads) or through the re-exec; it never causes one by itself, so a caller that
    imported torch already (a notebook, a test calling `main()`) keeps its process.

    Call it first thing in a command-line entry point. Does nothing when the settings are already
    in force or chosen by the user. `argv` is the full command line to run again (default
    `sys.orig_argv`: the interpreter and its flags, so `python -m pkg ...` re-runs as itself).
    On CUDA runs the settings are harmless (host tensors are small, CPU threads mostly idle) and
    are applied all the same.
    """
    changes = launch_env()
    reexec = "GLIBC_TUNABLES" in changes and bool(sys.executable)
    if not changes or ("torch" in sys.modules and not reexec):
        return
    os.environ.update(changes)
    if not reexec:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv[1:]])
