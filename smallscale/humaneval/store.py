"""Votes in SQLite (WAL): who may rate, what each rater was shown, in which order, and what they answered.

Three tables. `raters`: the invited raters, each with a display name (two may share one) and the
SHA-256 of their invite token; the token itself is never stored, so the database cannot leak a
working link. `assignments`: a comparison handed to a rater, under a random token that the vote form
carries; UNIQUE(rater, item, system pair) is what makes "never the same comparison twice" hold,
across server restarts too. `votes`: at most one per token (UNIQUE), so a retried or double POST is
recorded once. Every write is one IMMEDIATE transaction with synchronous=FULL, so a vote the server
acknowledged survives a kill or a power cut, and a half-done one leaves nothing behind.

Schema version 1 (before invites) had no `raters` table: a rater was whatever name was typed in.
Opening such a database upgrades it in place (`UPGRADES`, ALTER TABLE); its votes keep rater_id NULL
and count as uninvited. In assignments and votes, `rater` is who voted as the results show it:
NAME#ID for an invited rater (unique, as the old UNIQUE constraint needs), the typed name for a
vote from before invites.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import unicodedata
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from smallscale.errors import UserError

ANSWERS = ("a", "b", "tie", "bad")  # A (left) better, B (right) better, tie, both bad
SCHEMA_VERSION = "2"
INVITE_TOKEN_BYTES = 32  # 256 random bits per invite link
MAX_NAME = 40  # characters
_NAME = re.compile(r"[^\W_][\w .'\-]*")  # a letter or digit first, then also space . _ ' -; never '#'

# Version 1, as every database starts; UPGRADES bring it to SCHEMA_VERSION.
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
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1');
"""

# schema version -> the statements that take a database from it to the next version
UPGRADES: dict[str, tuple[str, ...]] = {
    "1": (
        """CREATE TABLE raters (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,                 -- display only; two raters may share a name
            token_sha256 TEXT NOT NULL UNIQUE,  -- hex SHA-256 of the invite token
            created_at TEXT NOT NULL,           -- ISO 8601, UTC
            expires_at TEXT,                    -- NULL: the link never expires
            revoked_at TEXT                     -- NULL: not revoked
        )""",
        # NULL rater_id: handed out or cast before invites existed
        "ALTER TABLE assignments ADD COLUMN rater_id INTEGER REFERENCES raters (id)",
        "ALTER TABLE votes ADD COLUMN rater_id INTEGER REFERENCES raters (id)",
        "CREATE UNIQUE INDEX assignments_rater_id_comparison ON assignments (rater_id, item_id, system_lo, system_hi)",
        "CREATE INDEX votes_rater_id ON votes (rater_id)",
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
    ),
}


@dataclass(frozen=True)
class Rater:
    """An invited rater. `name` is for display only; `id` is who they are."""

    id: int
    name: str

    @property
    def label(self) -> str:
        """NAME#ID: how votes and results name the rater, unique even when names repeat."""
        return f"{self.name}#{self.id}"


@dataclass(frozen=True)
class RaterRecord:
    """A row of `smallscale human-eval raters`: everything about an invite except its token."""

    id: int
    name: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    n_votes: int


@dataclass(frozen=True)
class Assignment:
    token: str
    rater_id: int
    item_id: str
    system_left: str
    system_right: str

    @property
    def comparison(self) -> tuple[str, str, str]:
        """(item_id, system_lo, system_hi): the comparison, whatever the shown order."""
        lo, hi = sorted((self.system_left, self.system_right))
        return self.item_id, lo, hi


def now_iso() -> str:
    return iso(datetime.now(UTC))


def iso(moment: datetime) -> str:
    """One fixed ISO 8601 form in UTC, so that timestamps compare correctly as strings in SQL."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def valid_rater_name(raw: str) -> str:
    """The name, NFC-normalised with runs of whitespace collapsed; ValueError saying what is wrong."""
    name = " ".join(unicodedata.normalize("NFC", raw).split())
    if not name:
        raise ValueError("the rater name is empty; give a name such as 'Ada'")
    if len(name) > MAX_NAME:
        raise ValueError(f"the rater name has {len(name)} characters; use at most {MAX_NAME}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"rater name {name!r}: use letters, digits, spaces and . _ ' - only, starting with a letter or digit")
    return name


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit, see `transaction`)."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit: acknowledged = durable
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def init_db(path: str | Path) -> str:
    """Create the database (WAL mode, schema) or upgrade an older one; return its session-signing secret.

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
            with transaction(conn):  # one writer upgrades; a concurrent opener then finds it done
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('secret', ?)", (secrets.token_hex(32),))
                version = schema_version(conn)
                while version in UPGRADES:
                    for statement in UPGRADES[version]:
                        conn.execute(statement)
                    version = schema_version(conn)
                secret = conn.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{str(path)!r} is not a human-eval vote database ({exc}); give another --db path") from None
    if version != SCHEMA_VERSION:
        raise UserError(f"{str(path)!r} has vote schema version {version}, this smallscale writes {SCHEMA_VERSION}; use a new --db")
    return secret


def schema_version(conn: sqlite3.Connection) -> str:
    return conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]


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


def add_rater(conn: sqlite3.Connection, name: str, expires_at: datetime | None = None) -> tuple[Rater, str]:
    """Invite a rater: (the rater, their secret token). Only the token's hash is stored, so the
    caller must hand the token on now; nobody can recover it later."""
    token = secrets.token_urlsafe(INVITE_TOKEN_BYTES)
    with transaction(conn):
        rater_id = conn.execute(
            "INSERT INTO raters (name, token_sha256, created_at, expires_at) VALUES (?, ?, ?, ?)",
            (name, token_hash(token), now_iso(), iso(expires_at) if expires_at is not None else None),
        ).lastrowid
    return Rater(rater_id, name), token


_ACTIVE = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"


def rater_for_token(conn: sqlite3.Connection, token: str) -> Rater | None:
    """The rater invited with `token`, if the invite is neither revoked nor expired."""
    row = conn.execute(f"SELECT id, name FROM raters WHERE token_sha256 = ? AND {_ACTIVE}", (token_hash(token), now_iso())).fetchone()
    return Rater(*row) if row else None


def active_rater(conn: sqlite3.Connection, rater_id: int) -> Rater | None:
    """The rater with this id, if their invite is neither revoked nor expired."""
    row = conn.execute(f"SELECT id, name FROM raters WHERE id = ? AND {_ACTIVE}", (rater_id, now_iso())).fetchone()
    return Rater(*row) if row else None


def revoke_rater(conn: sqlite3.Connection, rater_id: int) -> RaterRecord | None:
    """Revoke a rater's invite (their link and sessions stop working; votes already cast stay);
    the rater as now stored, or None if there is no such rater."""
    with transaction(conn):
        conn.execute("UPDATE raters SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now_iso(), rater_id))
    return next((r for r in list_raters(conn) if r.id == rater_id), None)


def list_raters(conn: sqlite3.Connection) -> list[RaterRecord]:
    rows = conn.execute(
        "SELECT r.id, r.name, r.created_at, r.expires_at, r.revoked_at, "
        "(SELECT COUNT(*) FROM votes AS v WHERE v.rater_id = r.id) FROM raters AS r ORDER BY r.id"
    )
    return [RaterRecord(*row) for row in rows.fetchall()]


_ASSIGNMENT_COLUMNS = "token, rater_id, item_id, system_left, system_right"


def open_assignment(conn: sqlite3.Connection, rater_id: int) -> Assignment | None:
    """The rater's oldest comparison that was handed out but not voted on, if any."""
    row = conn.execute(
        f"SELECT {_ASSIGNMENT_COLUMNS} FROM assignments AS a WHERE rater_id = ? "
        "AND NOT EXISTS (SELECT 1 FROM votes AS v WHERE v.token = a.token) ORDER BY issued_at, token LIMIT 1",
        (rater_id,),
    ).fetchone()
    return Assignment(*row) if row else None


def seen_comparisons(conn: sqlite3.Connection, rater_id: int) -> set[tuple[str, str, str]]:
    """Every (item_id, system_lo, system_hi) ever handed to the rater, voted on or not."""
    rows = conn.execute("SELECT item_id, system_lo, system_hi FROM assignments WHERE rater_id = ?", (rater_id,))
    return set(rows.fetchall())


def add_assignment(conn: sqlite3.Connection, rater: Rater, item_id: str, system_left: str, system_right: str) -> Assignment:
    assert system_left != system_right, system_left
    lo, hi = sorted((system_left, system_right))
    token = secrets.token_urlsafe(18)
    conn.execute(
        "INSERT INTO assignments (token, rater, rater_id, item_id, system_lo, system_hi, system_left, system_right, issued_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (token, rater.label, rater.id, item_id, lo, hi, system_left, system_right, now_iso()),
    )
    return Assignment(token, rater.id, item_id, system_left, system_right)


def drop_assignment(conn: sqlite3.Connection, token: str) -> None:
    """Forget an unvoted assignment (its item or system is no longer served)."""
    conn.execute("DELETE FROM assignments WHERE token = ? AND token NOT IN (SELECT token FROM votes)", (token,))


RECORDED, DUPLICATE, UNKNOWN_TOKEN, OTHER_RATER = "recorded", "duplicate", "unknown token", "other rater"


def record_vote(conn: sqlite3.Connection, token: str, rater_id: int, answer: str, reason: str) -> str:
    """Store the vote on `token`; returns RECORDED, DUPLICATE (already voted: the first vote stands),
    UNKNOWN_TOKEN or OTHER_RATER (the token was handed to someone else; nothing stored)."""
    assert answer in ANSWERS, answer
    with transaction(conn):
        row = conn.execute(
            "SELECT rater_id, rater, item_id, system_left, system_right FROM assignments WHERE token = ?", (token,)
        ).fetchone()
        if row is None:
            return UNKNOWN_TOKEN
        if row[0] != rater_id:  # a NULL rater_id (from before invites) matches no invited rater
            return OTHER_RATER
        inserted = conn.execute(
            "INSERT INTO votes (token, rater_id, rater, item_id, system_left, system_right, answer, reason, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (token) DO NOTHING",
            (token, *row, answer, reason, now_iso()),
        ).rowcount
    return RECORDED if inserted == 1 else DUPLICATE


def count_votes(conn: sqlite3.Connection, rater_id: int) -> int:
    return conn.execute("SELECT COUNT(*) FROM votes WHERE rater_id = ?", (rater_id,)).fetchone()[0]


@dataclass(frozen=True)
class Vote:
    rater: str  # NAME#ID for an invited rater, the typed name for a vote from before invites
    item_id: str
    system_left: str
    system_right: str
    answer: str
    reason: str
    created_at: str
    token: str
    rater_id: int | None  # None: cast before invites, by whoever typed `rater`; unverified

    @property
    def invited(self) -> bool:
        return self.rater_id is not None


def read_votes(path: str | Path) -> list[Vote]:
    """All votes in the database at `path`, oldest first; [] if it has none (or no votes table).

    Reads a version-1 database (before invites) as it is, without upgrading it: its votes have no rater id.
    """
    try:
        with closing(connect(path)) as conn:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'votes'").fetchone() is None:
                return []
            columns = {row[1] for row in conn.execute("PRAGMA table_info(votes)")}
            rater_id = "rater_id" if "rater_id" in columns else "NULL"
            rows = conn.execute(
                f"SELECT rater, item_id, system_left, system_right, answer, reason, created_at, token, {rater_id} FROM votes ORDER BY id"
            ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{str(path)!r} is not a human-eval vote database ({exc})") from None
    return [Vote(*row) for row in rows]
