"""One writer per folder: the lock that a study, run or dataset folder's writer holds while it writes.

Why: two processes writing one folder corrupt it without an error. Two trainers append to one
metrics.jsonl and overwrite each other's checkpoints; two `data prepare` delete each other's work
files. So every command that writes a folder (`study run` while it plans and reports, a study's run
worker for the whole train + evals of its run, `train`, `resume`, `data prepare`) holds that
folder's lock, and a second writer is told who owns it: FolderBusy, one line, e.g.
"'out/runs/seed0-2ef95956' is in use: train running as pid 1234 on host x since 10:02; wait for it
or stop it".

The lock file, FOLDER/.smallscale.lock, is created once and never deleted while its folder is in
use (deleting a lock file lets two processes lock two different files under one name). Its holder
writes {host, pid, started, purpose, command} into it, for display only; a clean release empties it.

How the lock is held, by filesystem:
- Local filesystems (ext4, xfs, tmpfs, APFS): `flock(LOCK_EX | LOCK_NB)` on the open lock file. The
  kernel releases it when the process ends, however it ends (SIGKILL and the OOM killer included),
  so a dead owner never blocks anyone: there are no stale locks, and the next process takes over
  at once. A record left by a killed owner is only a record; the lock says whether anyone is alive.
- NFS (v4, or v3 with lockd): the Linux client implements flock as a whole-file POSIX lock, which
  the server arbitrates between all hosts that mount the export. The lock ends with its process,
  or, when the owner's whole host dies, when the server's lease on that host expires (NFSv4: about
  90 s). The mount option `local_lock=flock` (or `all`) keeps locks local to each host; two hosts
  then cannot see each other's locks: use record mode (below).
- Lustre: mounted with `-o flock`, as NFS (coherent across nodes); with `-o localflock`, per node
  only: use record mode; with `-o noflock`, flock fails (ENOSYS) and record mode is used by itself.
- Record mode (SMALLSCALE_LOCK=record, or automatically where flock fails with ENOSYS, EOPNOTSUPP
  or ENOLCK): the owner hard-links a complete record to FOLDER/.smallscale.claim (link(2) is atomic
  and fails on an existing name, on NFS and Lustre too) and touches it every HEARTBEAT_S seconds
  from a daemon thread. A claim is stale, and the next process takes it over, when its owner is on
  this host and its pid is gone (at once), or is on another host and its heartbeat is older than
  STALE_AFTER_S. What real locks do better: a host cut off from the filesystem for longer than
  STALE_AFTER_S loses its claim while it still runs, host clocks must agree to within a minute, and
  two processes taking over one stale claim in the same millisecond can both win.
  Set SMALLSCALE_LOCK=record for every process that shares the folder (e.g. in the job script and
  in the login shell); a flock holder and a record holder also check each other's file, but only
  on one host.

Re-entrant within a process: a study worker holds its run's lock and calls `train`, which takes it
again; a nested `hold` of a folder the process already holds only counts (per process, not per
thread; a forked child holds nothing).

`owner(folder)` (for `study status` and the study scheduler) probes with a shared lock held for a
moment; an acquirer that meets such a probe retries for GRACE_S before it reports the folder busy,
so a probe never makes a free folder look taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from smallscale.errors import UserError
from smallscale.io import writing

LOCK_FILE = ".smallscale.lock"
CLAIM_FILE = ".smallscale.claim"
MODE_VAR = "SMALLSCALE_LOCK"  # "auto" (flock, record mode where flock is unsupported) or "record"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: a claim this old on another host is abandoned
GRACE_S = 0.25  # how long an acquirer retries past a probe's momentary shared lock
WAIT_POLL_S = 0.5
_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}


@dataclass(frozen=True)
class Owner:
    """Who holds a folder: recorded by the holder; `liveness` says how the reader knows it is alive."""

    host: str
    pid: int
    started: float  # Unix time the lock was taken
    purpose: str  # what the owner does there: "train", "study run", "data prepare", ...
    command: str
    liveness: str = ""

    def describe(self) -> str:
        if not self.pid:
            return "a process that has not recorded itself yet"
        return f"pid {self.pid} on host {self.host} since {_clock(self.started)}"


class FolderBusy(UserError):
    """Another live process holds the folder's lock."""

    def __init__(self, folder: str | Path, owner: Owner) -> None:
        self.owner = owner
        super().__init__(f"{str(folder)!r} is in use: {owner.purpose} running as {owner.describe()}; wait for it or stop it")


@dataclass
class _Held:
    pid: int  # the process that took it: a forked child inherits the memory, not the ownership
    count: int
    owner: Owner
    folder: Path
    fd: int | None  # flock mode: the locked lock file
    claim: Path | None  # record mode: our claim
    stop: threading.Event | None  # record mode: ends the heartbeat
    made: list[Path]  # folders made for the lock, deepest first: removed on release if nothing else went in


_held: dict[Path, _Held] = {}
_registry = threading.Lock()


@contextlib.contextmanager
def hold(
    folder: str | Path, purpose: str, *, wait: bool = False, on_wait: Callable[[Owner], None] | None = None
) -> Iterator[Owner]:
    """Own `folder` (created if missing) for the duration of the block; FolderBusy if another process
    does, or with `wait`, poll until it is free (calling `on_wait(owner)` each time the owner changes)."""
    folder = Path(folder)
    made = list(itertools.takewhile(lambda p: not p.exists(), [folder, *folder.parents]))
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _registry:
        held = _held.get(key)
        if held is not None and held.pid == os.getpid():
            held.count += 1
        else:
            held = None
    if held is None:
        held = _acquire_waiting(folder, purpose, made, wait, on_wait)
        with _registry:
            _held[key] = held
    try:
        yield held.owner
    finally:
        with _registry:
            held.count -= 1
            last = held.count == 0
            if last:
                del _held[key]
        if last:
            _release(held)


def owner(folder: str | Path) -> Owner | None:
    """The live owner of `folder`, or None when nobody holds it (a killed owner holds nothing)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    with _registry:
        held = _held.get(folder.resolve())
        if held is not None and held.pid == os.getpid():
            return replace(held.owner, liveness="this process")
    claimed = _live_claim(folder)
    if claimed is not None:
        return claimed
    return _flock_holder(folder)


# ----------------------------------------------------------------------------- acquiring
def _acquire_waiting(
    folder: Path, purpose: str, made: list[Path], wait: bool, on_wait: Callable[[Owner], None] | None
) -> _Held:
    told: Owner | None = None
    while True:
        try:
            return _acquire(folder, purpose, made)
        except FolderBusy as busy:
            if not wait:
                raise
            if on_wait is not None and (told is None or (told.host, told.pid) != (busy.owner.host, busy.owner.pid)):
                on_wait(busy.owner)
            told = busy.owner
            time.sleep(WAIT_POLL_S)


def _acquire(folder: Path, purpose: str, made: list[Path]) -> _Held:
    me = Owner(host=socket.gethostname(), pid=os.getpid(), started=time.time(), purpose=purpose, command=_command_line())
    fd = None if _mode() == "record" else _lock_file(folder)
    if fd is None:
        return _take_claim(folder, me, made)
    claimed = _live_claim(folder)  # a record-mode holder (SMALLSCALE_LOCK=record set for it, not for us)
    if claimed is not None:
        os.close(fd)
        raise FolderBusy(folder, claimed)
    try:
        with writing(folder / LOCK_FILE):  # a full disk: the first write of any command, named
            os.ftruncate(fd, 0)
            os.pwrite(fd, _encode(me), 0)
            os.fsync(fd)  # on NFS, what makes the record visible to other hosts while we keep the file open
    except OSError:
        os.close(fd)  # and with it the lock
        raise
    return _Held(os.getpid(), 1, me, folder, fd, None, None, made)


def _mode() -> str:
    mode = os.environ.get(MODE_VAR, "auto")
    if mode not in ("auto", "record"):
        raise UserError(f"{MODE_VAR}={mode!r} is not a lock mode; set it to auto (flock) or record (see smallscale/lock.py)")
    return mode


def _lock_file(folder: Path) -> int | None:
    """The locked, open FOLDER/.smallscale.lock; None where this filesystem has no working flock."""
    path = folder / LOCK_FILE
    deadline = time.monotonic() + GRACE_S
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by an owner that had created it: make it again
            folder.mkdir(parents=True, exist_ok=True)
            continue
        try:
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _flock_holder(folder) if time.monotonic() >= deadline else None
            if holder is not None:
                raise FolderBusy(folder, holder) from None
            time.sleep(0.02)  # a probe's moment, or an owner that has just let go: try again
            continue
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK:
                return None
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its owner removed the file while we waited for it: lock the one there now


def _flock(fd: int, operation: int) -> None:
    """fcntl.flock, one place for the tests to make fail like a filesystem without locks."""
    fcntl.flock(fd, operation)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _flock_holder(folder: Path) -> Owner | None:
    """Probe the lock file with a momentary shared lock: its holder's record, or None if unlocked."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _record_of_holder(fd)
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                return None
            raise
        _flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _record_of_holder(fd: int) -> Owner:
    """The record a holder writes right after it locks; wait a moment for one that just locked."""
    for _ in range(10):
        found = _decode(os.pread(fd, 1 << 16, 0))
        if found is not None:
            return replace(found, liveness="lock held")
        time.sleep(0.02)
    return _unknown_owner()


# ----------------------------------------------------------------------------- record mode
def _take_claim(folder: Path, me: Owner, made: list[Path]) -> _Held:
    claim = folder / CLAIM_FILE
    draft = folder / f"{CLAIM_FILE}.{me.host}.{me.pid}.tmp"
    try:
        with writing(claim):
            draft.write_bytes(_encode(me))
        for _ in range(3):
            try:
                os.link(draft, claim)  # atomic, complete from its first moment, and fails if a claim exists
            except FileExistsError:
                found = _read_claim(claim)
                if found is not None and _claim_alive(found, claim):
                    raise FolderBusy(folder, found) from None
                if found is not None:
                    _break_claim(claim, found, me)
                continue
            holder = _flock_holder(folder)  # a flock-mode holder on this host (mixed settings)
            if holder is not None:
                claim.unlink(missing_ok=True)
                raise FolderBusy(folder, holder)
            stop = threading.Event()
            threading.Thread(target=_heartbeat, args=(claim, stop), daemon=True, name="smallscale-lock-heartbeat").start()
            return _Held(os.getpid(), 1, me, folder, None, claim, stop, made)
        raise FolderBusy(folder, _read_claim(claim) or _unknown_owner())
    finally:
        draft.unlink(missing_ok=True)


def _live_claim(folder: Path) -> Owner | None:
    claim = folder / CLAIM_FILE
    found = _read_claim(claim)
    if found is None or not _claim_alive(found, claim):
        return None
    if found.host == socket.gethostname():
        return replace(found, liveness="pid alive")
    with contextlib.suppress(FileNotFoundError):
        age_s = time.time() - claim.stat().st_mtime
        return replace(found, liveness=f"heartbeat {age_s:.0f} s ago; a process on another host cannot be checked directly")
    return None


def _read_claim(claim: Path) -> Owner | None:
    try:
        return _decode(claim.read_bytes())
    except FileNotFoundError:
        return None


def _claim_alive(found: Owner, claim: Path) -> bool:
    """On this host: is the pid alive. On another: has the owner touched the claim recently."""
    if found.host == socket.gethostname():
        return _pid_alive(found.pid)
    try:
        return time.time() - claim.stat().st_mtime < STALE_AFTER_S
    except FileNotFoundError:
        return False


def _break_claim(claim: Path, stale: Owner, me: Owner) -> None:
    """Move a stale claim aside; if what moved was a fresh claim (taken over meanwhile), put it back."""
    aside = claim.with_name(f"{CLAIM_FILE}.stale.{me.host}.{me.pid}")
    try:
        os.rename(claim, aside)
    except FileNotFoundError:
        return
    moved = _read_claim(aside)
    if moved is not None and (moved.host, moved.pid, moved.started) != (stale.host, stale.pid, stale.started):
        with contextlib.suppress(FileExistsError):
            os.link(aside, claim)
    aside.unlink(missing_ok=True)


def _heartbeat(claim: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(claim)


# ----------------------------------------------------------------------------- releasing
def _release(held: _Held) -> None:
    removable = bool(held.made) and _holds_only_locks(held.folder)
    if held.claim is not None:
        assert held.stop is not None
        held.stop.set()
        mine = _read_claim(held.claim)
        if mine is not None and (mine.host, mine.pid, mine.started) == (held.owner.host, held.owner.pid, held.owner.started):
            held.claim.unlink(missing_ok=True)
    if held.fd is not None:
        if removable:
            (held.folder / LOCK_FILE).unlink(missing_ok=True)  # still locked: a waiter re-checks the file
        else:
            os.ftruncate(held.fd, 0)
        os.close(held.fd)
    if removable:
        for folder in held.made:
            try:
                folder.rmdir()
            except OSError:  # someone wrote into it meanwhile: it stays, and so do its parents
                break


def _holds_only_locks(folder: Path) -> bool:
    try:
        return set(os.listdir(folder)) <= {LOCK_FILE, CLAIM_FILE}
    except FileNotFoundError:  # removed by someone else while we held it
        return False


# ----------------------------------------------------------------------------- records
def _encode(owner: Owner) -> bytes:
    fields = asdict(owner)
    del fields["liveness"]
    return (json.dumps(fields) + "\n").encode()


def _decode(data: bytes) -> Owner | None:
    """The record, or None for an empty or half-written file."""
    try:
        fields = json.loads(data)
        return Owner(**fields)
    except (ValueError, TypeError):
        return None


def _unknown_owner() -> Owner:
    return Owner(host="?", pid=0, started=0.0, purpose="another process", command="", liveness="lock held")


def _command_line() -> str:
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500] if sys.argv else ""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _clock(t: float) -> str:
    """Local wall time: '10:02' today, else '2025-01-31 10:02'."""
    same_day = time.strftime("%Y-%m-%d", time.localtime(t)) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", time.localtime(t))
