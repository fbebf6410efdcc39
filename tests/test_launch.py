"""CPU launch path: the process re-executes itself once with glibc malloc thresholds raised."""

import json
import os
import platform
import subprocess
import sys

import pytest

from smallscale.launch import MALLOC_TUNABLES, OPT_OUT_VAR, allocator_setting

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc tunables only"
)

# Prints the environment after the call, and a marker per execution of the script.
SCRIPT = """
import json, os, sys
print("start", flush=True)
from smallscale.launch import ensure_cpu_allocator_env
ensure_cpu_allocator_env()
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:], "pid": os.getpid()}))
"""


def run(env_changes: dict[str, str | None]) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT_VAR, "LD_PRELOAD")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "train", "x=1"], env=env, capture_output=True, text=True, check=True
    )
    lines = proc.stdout.splitlines()
    return lines[:-1], json.loads(lines[-1])


def test_reexecs_once_with_the_malloc_tunables_and_the_same_arguments():
    starts, after = run({})
    assert starts == ["start", "start"]  # the script ran twice: before and after the re-exec
    assert after["tunables"] == MALLOC_TUNABLES
    assert after["argv"] == ["train", "x=1"]


def test_keeps_other_glibc_tunables_the_user_set():
    _, after = run({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert after["tunables"] == f"glibc.cpu.hwcaps=-AVX512F:{MALLOC_TUNABLES}"


@pytest.mark.parametrize(
    "env",
    [
        {OPT_OUT_VAR: "1"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"LD_PRELOAD": "libjemalloc.so.2"},
    ],
)
def test_leaves_the_process_alone_when_opted_out_or_the_user_chose_an_allocator(env):
    starts, after = run(env)
    assert starts == ["start"]
    assert after["tunables"] == env.get("GLIBC_TUNABLES")


def test_allocator_setting_names_the_setting_in_force():
    assert allocator_setting({}) == "default"
    assert allocator_setting({"GLIBC_TUNABLES": MALLOC_TUNABLES}) == "tuned"
    assert allocator_setting({"GLIBC_TUNABLES": MALLOC_TUNABLES, OPT_OUT_VAR: "1"}) == "opt-out"
    assert allocator_setting({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}) == "preloaded"
