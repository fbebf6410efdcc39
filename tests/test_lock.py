"""The folder lock (smallscale/lock.py): one owner per folder, told by name to a second process; a
killed owner frees the folder at once; re-entrant within a process; record mode where flock fails."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from smallscale import lock
from smallscale.errors import UserError

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# Holds FOLDER's lock (purpose PURPOSE), says "held" on stdout, then sleeps until killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from smallscale.lock import hold
    with hold(sys.argv[1], sys.argv[2]):
        print("held", flush=True)
        time.sleep(600)
""")
# Tries to take FOLDER's lock once; prints "took" or the FolderBusy message.
TAKER = textwrap.dedent("""
    import sys
    from smallscale.lock import FolderBusy, hold
    try:
        with hold(sys.argv[1], "train"):
            print("took")
    except FolderBusy as busy:
        print(busy)
""")


def start_holder(folder: Path, purpose: str = "train", **env: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), purpose], env={**ENV, **env},
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def try_in_other_process(folder: Path, **env: str) -> str:
    return subprocess.run([sys.executable, "-c", TAKER, str(folder)], env={**ENV, **env}, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------- flock mode
def test_second_process_is_refused_with_one_line_naming_the_owner(tmp_path):
    holder = start_holder(tmp_path / "run", "train")
    try:
        with pytest.raises(lock.FolderBusy) as refused, lock.hold(tmp_path / "run", "resume"):
            pass
    finally:
        stop(holder)
    message = str(refused.value)
    assert isinstance(refused.value, UserError) and "\n" not in message
    assert re.fullmatch(
        rf"'{re.escape(str(tmp_path / 'run'))}' is in use: train running as pid {holder.pid} on host "
        rf"{re.escape(socket.gethostname())} since \d\d:\d\d; wait for it or stop it",
        message,
    ), message


def test_owner_killed_with_sigkill_frees_the_folder_at_once(tmp_path):
    holder = start_holder(tmp_path / "run")
    assert lock.owner(tmp_path / "run").pid == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / "run" / lock.LOCK_FILE).read_text())["pid"] == holder.pid  # its record stays...
    assert lock.owner(tmp_path / "run") is None  # ...but the kernel released its lock
    started = time.perf_counter()
    with lock.hold(tmp_path / "run", "resume") as me:
        took_s = time.perf_counter() - started
        assert me.pid == os.getpid()
    assert took_s < 0.1  # no stale-lock timeout: the next owner takes over at once


def test_lock_is_reentrant_within_a_process_and_released_by_the_outermost_hold(tmp_path):
    with lock.hold(tmp_path / "run", "study worker"):
        with lock.hold(tmp_path / "run", "train"):  # what run_one -> train does
            assert lock.owner(tmp_path / "run").purpose == "study worker"
        assert f"pid {os.getpid()}" in try_in_other_process(tmp_path / "run")  # the inner exit kept it
    assert try_in_other_process(tmp_path / "run") == "took"


def test_owner_reports_the_holder_of_another_process_and_how_it_is_known(tmp_path):
    holder = start_holder(tmp_path / "ds", "data prepare")
    try:
        found = lock.owner(tmp_path / "ds")
    finally:
        stop(holder)
    assert (found.pid, found.host, found.purpose, found.liveness) == (holder.pid, socket.gethostname(), "data prepare", "lock held")
    assert lock.owner(tmp_path / "ds") is None and lock.owner(tmp_path / "never-made") is None


def test_a_probe_in_progress_does_not_make_a_free_folder_busy(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / lock.LOCK_FILE).touch()
    # Another process in the middle of `owner()`: it holds the shared probe lock for 0.1 s.
    probe = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, sys, time
        with open(sys.argv[1]) as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            print("probing", flush=True)
            time.sleep(0.1)
    """), str(tmp_path / "run" / lock.LOCK_FILE)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert probe.stdout.readline().strip() == "probing"
    with lock.hold(tmp_path / "run", "train") as me:
        assert me.pid == os.getpid()
    probe.wait()


def test_clean_release_empties_the_record_and_removes_a_folder_made_only_for_the_lock(tmp_path):
    (tmp_path / "kept").mkdir()
    with lock.hold(tmp_path / "kept", "train"):
        assert json.loads((tmp_path / "kept" / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / "kept" / lock.LOCK_FILE).read_text() == ""
    with lock.hold(tmp_path / "made" / "run", "train"):  # e.g. `smallscale train` that fails before writing
        pass
    assert not (tmp_path / "made").exists()
    with lock.hold(tmp_path / "made" / "run", "train"):
        (tmp_path / "made" / "notes.txt").write_text("kept")
    assert sorted(p.name for p in (tmp_path / "made").iterdir()) == ["notes.txt"]


def test_wait_polls_until_the_owner_ends_and_says_who_it_waits_for(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "WAIT_POLL_S", 0.05)
    holder = start_holder(tmp_path / "study", "study run: planning")
    told: list[lock.Owner] = []

    def on_wait(owner: lock.Owner) -> None:
        told.append(owner)
        stop(holder)  # the owner finishes while we wait

    with lock.hold(tmp_path / "study", "study run: results and report", wait=True, on_wait=on_wait) as me:
        assert me.pid == os.getpid()
    assert [(o.pid, o.purpose) for o in told] == [(holder.pid, "study run: planning")]


# ----------------------------------------------------------------------------- record mode
@pytest.fixture
def no_flock(monkeypatch):
    """This process's filesystem has no working flock (Lustre -o noflock: ENOSYS)."""

    def unsupported(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(lock, "_flock", unsupported)


def test_without_flock_a_claim_names_the_owner_and_other_processes_are_refused(tmp_path, no_flock):
    with lock.hold(tmp_path / "run", "train"):
        claim = json.loads((tmp_path / "run" / lock.CLAIM_FILE).read_text())
        assert (claim["pid"], claim["host"], claim["purpose"]) == (os.getpid(), socket.gethostname(), "train")
        assert (tmp_path / "run" / lock.LOCK_FILE).read_text() == ""  # opened, but flock failed: no record there
        refused = try_in_other_process(tmp_path / "run", SMALLSCALE_LOCK="record")
        assert refused.startswith(f"'{tmp_path / 'run'}' is in use: train running as pid {os.getpid()} on host ")
        assert lock.owner(tmp_path / "run").liveness == "this process"
    assert not (tmp_path / "run" / lock.CLAIM_FILE).exists()
    assert try_in_other_process(tmp_path / "run", SMALLSCALE_LOCK="record") == "took"


def test_without_flock_the_claim_of_a_killed_owner_on_this_host_is_taken_over_at_once(tmp_path, no_flock):
    holder = start_holder(tmp_path / "run", SMALLSCALE_LOCK="record")
    assert lock.owner(tmp_path / "run").liveness == "pid alive"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / lock.CLAIM_FILE).exists() and lock.owner(tmp_path / "run") is None
    with lock.hold(tmp_path / "run", "resume") as me:
        assert json.loads((tmp_path / "run" / lock.CLAIM_FILE).read_text())["pid"] == me.pid == os.getpid()


def test_without_flock_a_claim_from_another_host_goes_stale_only_when_its_heartbeat_stops(tmp_path, no_flock):
    claim = tmp_path / "run" / lock.CLAIM_FILE
    claim.parent.mkdir()
    claim.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": time.time() - 60, "purpose": "study worker",
                                 "command": "python -m smallscale.study.executors out seed0"}))  # fmt: skip
    with pytest.raises(lock.FolderBusy, match="study worker running as pid 4242 on host node-7"):
        with lock.hold(tmp_path / "run", "train"):
            pass
    assert "heartbeat 0 s ago" in lock.owner(tmp_path / "run").liveness
    last_beat = time.time() - lock.STALE_AFTER_S - 1
    os.utime(claim, (last_beat, last_beat))
    assert lock.owner(tmp_path / "run") is None
    with lock.hold(tmp_path / "run", "train"):
        assert json.loads(claim.read_text())["host"] == socket.gethostname()


def test_without_flock_the_heartbeat_keeps_the_claim_fresh(tmp_path, no_flock, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.02)
    with lock.hold(tmp_path / "run", "train"):
        claim = tmp_path / "run" / lock.CLAIM_FILE
        os.utime(claim, (1.0, 1.0))
        time.sleep(0.2)
        assert time.time() - claim.stat().st_mtime < 1.0


def test_an_unknown_lock_mode_is_a_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv(lock.MODE_VAR, "nfs")
    with pytest.raises(UserError, match="SMALLSCALE_LOCK='nfs' is not a lock mode; set it to auto"):
        with lock.hold(tmp_path / "run", "train"):
            pass
