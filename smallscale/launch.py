"""Process-start settings that must be in force before the first allocation: the CPU allocator.

glibc malloc serves an allocation above its mmap threshold (128 KiB, rising to at most 32 MiB) with
a fresh mmap and returns it with munmap on free. A CPU training step allocates and frees its logits
and activations (up to hundreds of MiB) every step, so every step maps them again and the kernel
zero-fills each page on first touch. On the 2-core reference machine, at the shape of
bench/bench_train.py: 46k page faults and 87 ms of system time per step for smallscale (bf16),
174k and 326 ms for the HF GPT2 fp32 peer. Raising the mmap and trim thresholds keeps freed memory
in the heap for reuse: ~0 faults, 1-20 ms of system time, steps 12-16% shorter. glibc reads the
thresholds once, at process start, hence the re-exec. The cost: the process keeps its peak memory
until it exits. tcmalloc (LD_PRELOAD) measured the same; it needs a package installed, this does not.
"""

from __future__ import annotations

import os
import platform
import sys

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


def ensure_cpu_allocator_env(argv: list[str] | None = None) -> None:
    """Re-exec this process once with glibc malloc thresholds raised (see the module docstring).

    Call it first thing in a command-line entry point. Does nothing when the setting is already in
    force, when the user chose an allocator or malloc settings of their own, off glibc/Linux, or
    with SMALLSCALE_NO_MALLOC_TUNING=1. `argv` is the full command line to run again (default
    `sys.orig_argv`: the interpreter and its flags, so `python -m pkg ...` re-runs as itself).
    On CUDA runs the setting is harmless (host tensors are small) and is applied all the same.
    """
    if allocator_setting() != "default" or not sys.executable:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    previous = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = f"{previous}:{MALLOC_TUNABLES}" if previous else MALLOC_TUNABLES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv[1:]])
