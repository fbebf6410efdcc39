"""The one exception type for user mistakes.

The CLI prints a `UserError` as a single line (no traceback) and exits with status 2. Internal
invariants use `assert` instead, so a traceback always means a bug in smallscale, not in the input.
"""


class UserError(Exception):
    """A mistake in the user's input: a bad path, value, option or file. One clear sentence."""


class Stopped(Exception):
    """A run stopped on request (SIGTERM: `kill`, a scheduler's notice, a dying study) after saving a
    checkpoint at a step boundary; resuming continues it exactly. The CLI prints its one line and
    exits with status 143 (128 + SIGTERM), as a process killed by the signal would."""

    exit_code = 143
