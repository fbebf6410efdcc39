"""Only invited raters vote, each as themselves: per-rater links from `human-eval invite`, stored as
hashes; a typed name, a shared display name, a forged, revoked or expired link grants nothing."""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smallscale.errors import UserError
from smallscale.humaneval import store
from smallscale.humaneval.app import create_app
from smallscale.humaneval.cli import humaneval_app
from smallscale.humaneval.items import load_pool
from smallscale.humaneval.loadcheck import write_synthetic_study
from smallscale.humaneval.store import read_votes

ASK_OWNER = "ask the study owner for a link"
LINK = re.compile(r"http://127\.0\.0\.1:8123/r/([A-Za-z0-9_-]+)")


def hidden(page: str, name: str) -> str | None:
    match = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)">', page)
    return match.group(1) if match else None


@pytest.fixture
def study(tmp_path: Path) -> Path:
    write_synthetic_study(tmp_path / "study", n_systems=3, n_prompts=2)  # 6 comparisons
    return tmp_path / "study"


@pytest.fixture
def db(study: Path) -> Path:
    return study / "human_eval.sqlite"


@pytest.fixture
def app(study: Path, db: Path):
    return create_app(load_pool([study]), db)


def invite(db: Path, name: str, expires_at: datetime | None = None) -> tuple[store.Rater, str]:
    with closing(store.connect(db)) as conn:
        return store.add_rater(conn, name, expires_at)


def joined(app, token: str):
    """A browser that opened the invite link `token`, and the page it landed on."""
    client = app.test_client()
    page = client.get(f"/r/{token}", follow_redirects=True)
    assert page.status_code == 200, page.text
    return client, page.text


def vote(client, page: str, token: str | None = None, answer: str = "a"):
    form = {"csrf": hidden(page, "csrf") or "", "token": token or hidden(page, "token") or "", "answer": answer}
    return client.post("/vote", data=form)


def assignments(db: Path) -> list[tuple]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT token, rater, rater_id FROM assignments").fetchall()


def test_a_typed_name_grants_no_voting(app, db):
    client = app.test_client()
    page = client.get("/", follow_redirects=True)  # before invites: the name form
    client.post("/start", data={"csrf": hidden(page.text, "csrf") or "", "name": "alice"})
    rate = client.get("/rate", follow_redirects=True)
    assert rate.status_code == 403 and ASK_OWNER in rate.text and hidden(rate.text, "token") is None
    response = vote(client, page.text, token="anything")
    assert response.status_code == 403
    assert read_votes(db) == [] and assignments(db) == []


def test_inventing_a_new_name_per_vote_stuffs_no_votes_in(app, db):
    for name in ("sock1", "sock2", "sock3"):  # the old way to stuff votes: a new name each time
        client = app.test_client()
        page = client.get("/", follow_redirects=True).text
        client.post("/start", data={"csrf": hidden(page, "csrf") or "", "name": name})
        rate = client.get("/rate", follow_redirects=True).text
        vote(client, rate)
    assert read_votes(db) == []


def test_a_rater_with_the_same_display_name_neither_sees_nor_votes_on_anothers_comparison(app, db):
    alice, alice_token = invite(db, "alice")
    impostor, impostor_token = invite(db, "alice")
    alice_client, alice_page = joined(app, alice_token)
    impostor_client, impostor_page = joined(app, impostor_token)
    open_token = hidden(alice_page, "token")
    assert hidden(impostor_page, "token") != open_token and open_token not in impostor_page
    response = vote(impostor_client, impostor_page, token=open_token)
    assert response.status_code == 403 and "another rater" in response.text
    assert read_votes(db) == []
    assert vote(alice_client, alice_page).status_code == 303  # alice's comparison is still hers to answer
    ((rater, rater_id),) = [(v.rater, v.rater_id) for v in read_votes(db)]
    assert (rater, rater_id) == (f"alice#{alice.id}", alice.id) and impostor.id != alice.id


def test_a_session_without_an_invite_cannot_vote_with_a_stolen_comparison_token(app, db):
    _, alice_token = invite(db, "alice")
    _, alice_page = joined(app, alice_token)
    stranger = app.test_client()
    with stranger.session_transaction() as session:  # a cookie from before invites: a typed name, a valid CSRF token
        session.update(rater="alice", csrf="stranger-csrf")
    page = stranger.get("/rate")
    assert page.status_code == 403 and ASK_OWNER in page.text and hidden(page.text, "token") is None
    form = {"csrf": "stranger-csrf", "token": hidden(alice_page, "token"), "answer": "a"}
    response = stranger.post("/vote", data=form)
    assert response.status_code == 403 and ASK_OWNER in response.text
    assert read_votes(db) == []


def test_the_link_binds_the_session_and_redirects_so_the_token_leaves_the_address_bar(app, db):
    _, token = invite(db, "alice")
    client = app.test_client()
    response = client.get(f"/r/{token}")
    assert response.status_code == 303 and response.headers["Location"] == "/rate"
    page = client.get("/rate")
    assert page.status_code == 200 and token not in page.text and "alice" in page.text
    assert client.get("/").headers["Location"] == "/rate"


def revoked(db: Path) -> str:
    rater, token = invite(db, "revoked")
    with closing(store.connect(db)) as conn:
        store.revoke_rater(conn, rater.id)
    return token


@pytest.mark.parametrize(
    "make_token",
    [
        lambda db: secrets.token_urlsafe(store.INVITE_TOKEN_BYTES),  # forged
        lambda db: invite(db, "late", expires_at=datetime.now(UTC) - timedelta(seconds=1))[1],  # expired
        revoked,
    ],
    ids=["forged", "expired", "revoked"],
)
def test_a_forged_expired_or_revoked_link_gets_403_and_no_session(app, db, make_token):
    token = make_token(db)
    client = app.test_client()
    response = client.get(f"/r/{token}")
    assert response.status_code == 403 and "not valid" in response.text
    assert client.get("/rate").status_code == 403


@pytest.mark.parametrize("end", ["revoke", "expire"])
def test_revoking_or_expiring_an_invite_ends_the_raters_open_session(app, db, end):
    rater, token = invite(db, "alice")
    client, page = joined(app, token)
    with closing(store.connect(db)) as conn:
        if end == "revoke":
            store.revoke_rater(conn, rater.id)
        else:  # as if the link's time had run out
            conn.execute("UPDATE raters SET expires_at = ? WHERE id = ?", (store.now_iso(), rater.id))
    assert client.get("/rate").status_code == 403
    response = vote(client, page)
    assert response.status_code == 403 and ASK_OWNER in response.text
    assert read_votes(db) == []


def test_invite_prints_one_working_link_and_stores_only_its_hash(app, study, db):
    result = CliRunner().invoke(humaneval_app, ["invite", "Ada Lovelace", str(study), "--port", "8123"])
    assert result.exit_code == 0, result.output
    (token,) = LINK.findall(result.output)
    assert result.output.count(token) == 1 and len(token) >= 22  # >= 128 random bits, base64url
    client, page = joined(app, token)
    assert '<b id="rater">Ada Lovelace</b>' in page and hidden(page, "token") is not None
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # the database, its WAL too
    assert token.encode() not in stored
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT name, token_sha256 FROM raters").fetchall() == [
            ("Ada Lovelace", hashlib.sha256(token.encode()).hexdigest())
        ]


def test_raters_lists_without_tokens_and_revoke_stops_the_link(app, study, db):
    runner = CliRunner()
    token = LINK.findall(runner.invoke(humaneval_app, ["invite", "alice", str(study), "--port", "8123"]).output)[0]
    in_a_week = {f"{datetime.now(UTC) + timedelta(days=7):%Y-%m-%d}"}
    runner.invoke(humaneval_app, ["invite", "bob", "--db", str(db), "--port", "8123", "--days", "7"])
    in_a_week.add(f"{datetime.now(UTC) + timedelta(days=7):%Y-%m-%d}")
    listing = runner.invoke(humaneval_app, ["raters", str(study)])
    assert listing.exit_code == 0, listing.output
    rows = [line.split() for line in listing.output.splitlines()[1:]]
    assert [r[:4] for r in rows] == [["1", "alice", "0", "active"], ["2", "bob", "0", "active"]]
    assert rows[0][-1] == "never" and rows[1][-3] in in_a_week
    assert token not in listing.output and hashlib.sha256(token.encode()).hexdigest() not in listing.output
    revoke = runner.invoke(humaneval_app, ["revoke", "1", str(study)])
    assert revoke.exit_code == 0 and "revoked rater 1 (alice)" in revoke.output
    assert "1  alice      0  revoked" in runner.invoke(humaneval_app, ["raters", "--db", str(db)]).output
    assert app.test_client().get(f"/r/{token}").status_code == 403


@pytest.mark.parametrize(
    "args,message",
    [
        (["invite", "<script>"], "use letters, digits"),
        (["invite", "x" * 41], "at most 40"),
        (["invite", "   "], "empty"),
        (["invite", "ok#1"], "use letters, digits"),  # '#' is reserved for NAME#ID
        (["invite", "alice", "--days", "0"], "--days must be >= 1"),
        (["invite", "alice", "--port", "0"], "is not a TCP port"),
        (["revoke", "7"], "there is no rater 7"),
    ],
)
def test_invite_and_revoke_mistakes_are_one_line_user_errors(db, app, args, message):
    result = CliRunner().invoke(humaneval_app, [*args, "--db", str(db)])
    assert isinstance(result.exception, UserError) and message in str(result.exception)
    assert "\n" not in str(result.exception)


def test_raters_without_a_database_is_a_user_error(tmp_path):
    result = CliRunner().invoke(humaneval_app, ["raters", "--db", str(tmp_path / "none.sqlite")])
    assert isinstance(result.exception, UserError) and "no vote database" in str(result.exception)
    assert not (tmp_path / "none.sqlite").exists()


def test_display_names_are_normalised_and_validated():
    assert store.valid_rater_name("  José  o'Brien-2 ") == "José o'Brien-2"
    for bad in ("", "x" * 41, "<script>", "_hidden", "a\x00b", "a#1"):
        with pytest.raises(ValueError):
            store.valid_rater_name(bad)
