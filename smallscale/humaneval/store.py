"""Votes in SQLite (WAL): what each rater was shown, in which order, and what they answered.

Two tables. `assignments`: a comparison handed to a rater, under a random token that the vote form
carries; UNIQUE(rater, item, system pair) is what makes "never the same comparison twice" hold,
across server restarts too. `votes`: at most one per token (UNIQUE), so a retried or double POST is
recorded once. Every write is one IMMEDIATE transaction with synchronous=FULL, so a vote the server
acknowledged survives a kill or a power cut, and a half-done one leaves nothing behind.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from smallscale.errors import UserError

ANSWERS = ("a", "b", "tie", "bad")  # A (left) better, B (right) better, tie, both bad
SCHEMA_VERSION = "1"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    token TEXT PRIMARY KEY,
    rater TEXT NOT NULL,
    item_id TEXT NOT NULL,
    system_lo TEXT NOT NULL,          -- the pair, sorted: the comparison's identity
    system_hi TEXT NOT NULL,
    system_left TEXT NOT NULL,        -- shown as A
    system_right TEXT NOT NULL,       -- shown as B
    issued_at TEXT NOT NULL,          -- ISO 8601, UTC
    UNIQUE (rater, item_id, system_lo, system_hi)
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY,
    token TEXT NOT NULL UNIQUE REFERENCES assignments (token),
    rater TEXT NOT NULL,
    item_id TEXT NOT NULL,
    system_left TEXT NOT NULL,
    system_right TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ({", ".join(repr(a) for a in ANSWERS)})),
    reason TEXT NOT NULL,
    created_at TEXT NOT NULL          -- ISO 8601, UTC
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""


@dataclass(frozen=True)
class Assignment:
    token: str
    rater: str
    item_id: str
    system_left: str
    system_right: str

    @property
    def comparison(self) -> tuple[str, str, str]:
        """(item_id, system_lo, system_hi): the comparison, whatever the shown order."""
        lo, hi = sorted((self.system_left, self.system_right))
        return self.item_id, lo, hi


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit, see `transaction`)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit: acknowledged = durable
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def init_db(path: str | Path) -> str:
    """Create the database (WAL mode, schema) if needed; return its session-signing secret.

    The secret lives in the database so that raters' sessions survive a server restart.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--db {str(path)!r} is a folder; give a file path such as {str(path / 'human_eval.sqlite')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with closing(connect(path)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
            conn.executescript(SCHEMA)  # idempotent: IF NOT EXISTS / OR IGNORE
            with transaction(conn):
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('secret', ?)", (secrets.token_hex(32),))
                version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
                secret = conn.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{str(path)!r} is not a human-eval vote database ({exc}); give another --db path") from None
    if version != SCHEMA_VERSION:
        raise UserError(f"{str(path)!r} has vote schema version {version}, this smallscale writes {SCHEMA_VERSION}; use a new --db")
    return secret


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT: takes the write lock up front, so concurrent writers queue."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_ASSIGNMENT_COLUMNS = "token, rater, item_id, system_left, system_right"


def open_assignment(conn: sqlite3.Connection, rater: str) -> Assignment | None:
    """The rater's oldest comparison that was handed out but not voted on, if any."""
    row = conn.execute(
        f"SELECT {_ASSIGNMENT_COLUMNS} FROM assignments AS a WHERE rater = ? "
        "AND NOT EXISTS (SELECT 1 FROM votes AS v WHERE v.token = a.token) ORDER BY issued_at, token LIMIT 1",
        (rater,),
    ).fetchone()
    return Assignment(*row) if row else None


def seen_comparisons(conn: sqlite3.Connection, rater: str) -> set[tuple[str, str, str]]:
    """Every (item_id, system_lo, system_hi) ever handed to the rater, voted on or not."""
    rows = conn.execute("SELECT item_id, system_lo, system_hi FROM assignments WHERE rater = ?", (rater,))
    return set(rows.fetchall())


def add_assignment(conn: sqlite3.Connection, rater: str, item_id: str, system_left: str, system_right: str) -> Assignment:
    assert system_left != system_right, system_left
    lo, hi = sorted((system_left, system_right))
    token = secrets.token_urlsafe(18)
    conn.execute(
        "INSERT INTO assignments (token, rater, item_id, system_lo, system_hi, system_left, system_right, issued_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (token, rater, item_id, lo, hi, system_left, system_right, now_iso()),
    )
    return Assignment(token, rater, item_id, system_left, system_right)


def drop_assignment(conn: sqlite3.Connection, token: str) -> None:
    """Forget an unvoted assignment (its item or system is no longer served)."""
    conn.execute("DELETE FROM assignments WHERE token = ? AND token NOT IN (SELECT token FROM votes)", (token,))


RECORDED, DUPLICATE, UNKNOWN_TOKEN, OTHER_RATER = "recorded", "duplicate", "unknown token", "other rater"


def record_vote(conn: sqlite3.Connection, token: str, rater: str, answer: str, reason: str) -> str:
    """Store the vote on `token`; returns RECORDED, DUPLICATE (already voted: the first vote stands),
    UNKNOWN_TOKEN or OTHER_RATER (the token was handed to someone else; nothing stored)."""
    assert answer in ANSWERS, answer
    with transaction(conn):
        row = conn.execute(
            "SELECT rater, item_id, system_left, system_right FROM assignments WHERE token = ?", (token,)
        ).fetchone()
        if row is None:
            return UNKNOWN_TOKEN
        if row[0] != rater:
            return OTHER_RATER
        inserted = conn.execute(
            "INSERT INTO votes (token, rater, item_id, system_left, system_right, answer, reason, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (token) DO NOTHING",
            (token, *row, answer, reason, now_iso()),
        ).rowcount
    return RECORDED if inserted == 1 else DUPLICATE


def count_votes(conn: sqlite3.Connection, rater: str) -> int:
    return conn.execute("SELECT COUNT(*) FROM votes WHERE rater = ?", (rater,)).fetchone()[0]


@dataclass(frozen=True)
class Vote:
    rater: str
    item_id: str
    system_left: str
    system_right: str
    answer: str
    reason: str
    created_at: str
    token: str


def read_votes(path: str | Path) -> list[Vote]:
    """All votes in the database at `path`, oldest first; [] if it has none (or no votes table)."""
    try:
        with closing(connect(path)) as conn:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'votes'").fetchone() is None:
                return []
            rows = conn.execute(
                "SELECT rater, item_id, system_left, system_right, answer, reason, created_at, token FROM votes ORDER BY id"
            ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{str(path)!r} is not a human-eval vote database ({exc})") from None
    return [Vote(*row) for row in rows]
