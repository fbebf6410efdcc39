"""Names that become paths, and writes that must stay inside a folder.

Study files, run configs and manifests may come from anyone (a collaborator, a download). A name
taken from them (a dataset, an eval result, a run id, a study) becomes one file or folder name, so
it must not be able to climb out of the folder it is joined to (`../..`), name an absolute path,
or hide a separator or NUL; and a folder we write into must not be a link to somewhere else.
"""

from __future__ import annotations

import re
from pathlib import Path

from smallscale.errors import UserError

# An allowlist, not a blocklist: portable file names that also need no quoting in a shell.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
NAME_RULE = "use 1-100 letters, digits, '.', '_' or '-', not starting with '.' or '-' (it becomes a file or folder name)"


def is_plain_name(name: object) -> bool:
    """Whether `name` is safe as one path component: no separator, '..', absolute path, NUL or dot name."""
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None


def check_name(name: object, what: str) -> str:
    """`name` if it is a plain name, else a UserError naming `what` (e.g. "dataset name") and the rule."""
    if not is_plain_name(name):
        raise UserError(f"{what} {name!r} is not a plain name; {NAME_RULE}")
    assert isinstance(name, str)
    return name


def check_inside(path: str | Path, root: str | Path, what: str) -> Path:
    """The resolved `path`, after checking that it lies inside `root` once links are followed."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise UserError(f"{what} {str(path)!r} resolves to {str(resolved)!r}, outside {str(base)!r}; remove the link")
    return resolved
