"""CPU launch path: the process re-executes itself once with glibc malloc thresholds raised, and
the OpenMP wait policy is set before torch loads libgomp."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from smallscale.launch import BUSY_LOAD, MALLOC_TUNABLES, OPT_OUT_VAR, WAIT_POLICY, allocator_setting, launch_env

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc tunables only"
)

# Prints the environment after the call, and a marker per execution of the script.
SCRIPT = """
import json, os, sys
{before}
print("start", flush=True)
from smallscale.launch import ensure_cpu_allocator_env
ensure_cpu_allocator_env()
{after}
print(json.dumps({{"tunables": os.environ.get("GLIBC_TUNABLES"), "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "argv": sys.argv[1:], "pid": os.getpid()}}))
"""
_CLEARED = ("GLIBC_TUNABLES", OPT_OUT_VAR, "LD_PRELOAD", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_DISPLAY_ENV")


def run(env_changes: dict[str, str | None], before: str = "", after: str = "") -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    script = SCRIPT.format(before=before, after=after)
    proc = subprocess.run([sys.executable, "-c", script, "train", "x=1"], env=env, capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    return lines[:-1], json.loads(lines[-1])


BUSY = "import smallscale.launch as L; L._load_average = lambda: 4.0  # a machine other processes keep busy"


def test_reexecs_once_with_the_malloc_tunables_and_the_same_arguments():
    starts, after = run({}, before=BUSY)
    assert starts == ["start", "start"]  # the script ran twice: before and after the re-exec
    assert after["tunables"] == MALLOC_TUNABLES
    assert after["wait_policy"] == WAIT_POLICY
    assert after["argv"] == ["train", "x=1"]


def test_nothing_is_left_to_change_after_the_reexec():
    assert launch_env({}, load=4.0) == {"GLIBC_TUNABLES": MALLOC_TUNABLES, "OMP_WAIT_POLICY": WAIT_POLICY}
    assert launch_env({"GLIBC_TUNABLES": MALLOC_TUNABLES, "OMP_WAIT_POLICY": WAIT_POLICY}, load=4.0) == {}


def test_the_passive_wait_policy_only_on_a_busy_machine():
    # alone, libgomp's spinning default is 13% faster; next to a busy process PASSIVE is 83% faster
    assert launch_env({}, load=0.1) == {"GLIBC_TUNABLES": MALLOC_TUNABLES}
    assert launch_env({}, load=BUSY_LOAD)["OMP_WAIT_POLICY"] == WAIT_POLICY
    _, after = run({}, before="import smallscale.launch as L; L._load_average = lambda: 0.0  # an idle machine")
    assert after["wait_policy"] is None and after["tunables"] == MALLOC_TUNABLES


def test_the_wait_policy_reaches_openmp_when_torch_is_imported_after_the_call():
    # malloc opted out: no re-exec is needed; libgomp prints its settings as torch loads it
    env = {OPT_OUT_VAR: "1", "OMP_DISPLAY_ENV": "VERBOSE"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(before=BUSY, after="import torch")],
                          env={**{k: v for k, v in os.environ.items() if k not in _CLEARED}, **env},
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert proc.stdout.splitlines()[0] == "start"  # ran once
    assert "GOMP_SPINCOUNT = '0'" in proc.stderr  # PASSIVE: no spinning (libgomp's default: 300000 rounds)


def test_never_reexecs_for_the_wait_policy_alone_when_torch_is_already_imported():
    # a caller that imported torch (a notebook, a test calling cli.main) keeps its process
    starts, after = run({OPT_OUT_VAR: "1"}, before=f"{BUSY}\nimport torch")
    assert starts == ["start"]
    assert after["wait_policy"] is None and after["tunables"] is None


@pytest.mark.parametrize("env", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}])
def test_keeps_the_wait_policy_the_user_chose(env):
    _, after = run(env)
    assert after["wait_policy"] == env.get("OMP_WAIT_POLICY")


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


@pytest.mark.parametrize(("loadavg", "busy"), [("1.50 1.20 1.00 1/300 123", 0.0), ("1.50 1.20 1.00 3/300 123", 1.5)])
def test_load_counts_only_while_another_process_runs(tmp_path, monkeypatch, loadavg, busy):
    # the 1-minute average lags: a job that ended a moment ago leaves it high with nothing running
    import smallscale.launch as launch

    (tmp_path / "loadavg").write_text(loadavg + "\n")
    monkeypatch.setattr(launch, "Path", lambda p: tmp_path / "loadavg" if p == "/proc/loadavg" else Path(p))
    assert launch._load_average() == busy
