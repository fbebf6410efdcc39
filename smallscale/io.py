"""Atomic file writes: a killed process never leaves a half-written file that looks complete.

And full disks: a write that fails for want of space (`no_space`) names its file (`writing`), so
the command can say in one line which file could not be written (`no_space_message`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

# A write fails with one of these when the disk, the user's quota or the process's file size limit
# (RLIMIT_FSIZE) is full; the same command succeeds once there is room.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# How Rust's std::io::Error shows an OS error: safetensors and tokenizers raise their own exception
# types, with only this text to tell a full disk from other failures.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def no_space(exc: BaseException) -> OSError | None:
    """The no-space OSError behind `exc` (itself, or one it was raised from or while handling, as
    torch.save's RuntimeError is when its file's write fails; rebuilt from the message of a Rust
    I/O error), or None if `exc` is not about space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            if current.errno in NO_SPACE_ERRNOS:
                return current
        elif (found := _RUST_OS_ERROR.search(str(current))) and int(found[1]) in NO_SPACE_ERRNOS:
            return OSError(int(found[1]), os.strerror(int(found[1])))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Raise a no-space failure of the block as OSError(errno, strerror, `path`): the OSError of a
    write() names no file, and the savers of torch, safetensors and tokenizers raise other types.
    An error already named by an inner `writing` keeps its name."""
    try:
        yield
    except Exception as exc:
        full = no_space(exc)
        if full is None or (full is exc and full.filename is not None):
            raise
        raise OSError(full.errno, full.strerror, str(path)) from exc


def no_space_message(exc: BaseException, then: str = "run the same command again") -> str | None:
    """One line for a failure for want of space (None for any other): the file and what to do."""
    full = no_space(exc)
    if full is None:
        return None
    where = os.fsdecode(full.filename) if full.filename is not None else "a file"
    return f"no space left writing {where} ({full.strerror}); free space and {then}"


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file for the block to write that appears at `path` whole or not at all: a unique
    temp file next to it (two writers never share one), flushed and fsynced, then renamed over
    `path`; deleted if the block fails. A full disk inside the block names `path` (`writing`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions open() would
        with writing(path), os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
