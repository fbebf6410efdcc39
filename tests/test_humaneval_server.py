"""The real server in a subprocess: concurrent raters lose and duplicate nothing; a kill loses no
acknowledged vote and a restart continues."""

from __future__ import annotations

import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smallscale.errors import UserError
from smallscale.humaneval.cli import humaneval_app
from smallscale.humaneval.loadcheck import (
    RaterClient,
    invite_raters,
    run_load,
    start_server,
    write_synthetic_study,
)
from smallscale.humaneval.store import read_votes

pytestmark = pytest.mark.slow


@pytest.fixture
def study(tmp_path: Path) -> Path:
    write_synthetic_study(tmp_path / "study", n_systems=4, n_prompts=10)  # 10 x 6 pairs = 60 comparisons per rater
    return tmp_path / "study"


def comparison(vote) -> tuple[str, str, str]:
    return (vote.item_id, *sorted((vote.system_left, vote.system_right)))


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except Exception:
        proc.kill()
        raise


def test_a_server_started_in_the_background_stops_cleanly_on_sigterm(study):
    # a script's background job inherits SIGINT ignored, and Python then leaves Ctrl-C ignored:
    # such a server kept running after SIGINT and could only be killed (a CI rehearsal hung on it)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc, _ = start_server([study], study / "human_eval.sqlite", threads=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None  # ignored, as its parent asked
    stop(proc)
    assert proc.returncode == 0


def test_concurrent_votes_are_neither_lost_nor_duplicated(study):
    db = study / "human_eval.sqlite"
    invites = invite_raters(db, [f"rater{r}" for r in range(8)])
    proc, url = start_server([study], db, threads=8)
    try:
        load = run_load(url, invites, votes_per_rater=50, resubmit_every=5)  # 80 votes posted twice
    finally:
        stop(proc)
    assert load["errors"] == {} and load["votes_acknowledged"] == 400
    votes = read_votes(db)
    assert len(votes) == 400 and len({v.token for v in votes}) == 400
    for rater_id, tokens in load["tokens"].items():
        mine = [v for v in votes if v.rater_id == rater_id]
        assert sorted(v.token for v in mine) == sorted(tokens)
        assert len({comparison(v) for v in mine}) == 50  # no comparison twice
    assert proc.returncode == 0


def test_a_killed_server_keeps_every_acknowledged_vote_and_a_restart_continues(study):
    db = study / "human_eval.sqlite"
    invites = invite_raters(db, [f"rater{r}" for r in range(4)])
    proc, url = start_server([study], db, threads=4)
    result: dict = {}
    voting = threading.Thread(target=lambda: result.update(run_load(url, invites, votes_per_rater=60, resubmit_every=0)))
    voting.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(read_votes(db)) < 40:
        time.sleep(0.02)
    proc.kill()  # SIGKILL while votes are in flight
    proc.wait()
    voting.join()
    assert result["errors"], "the kill should have interrupted the raters"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {v.token for v in read_votes(db)}
    acknowledged = {t for tokens in result["tokens"].values() for t in tokens}
    assert acknowledged <= stored and len(stored) - len(acknowledged) <= 4  # at most one unacknowledged per rater

    proc, url = start_server([study], db)
    rater_id, invite_token = next(iter(invites.items()))
    try:
        rater = RaterClient(url)
        rater.join(invite_token)  # the same link again, in a new browser
        before = {comparison(v) for v in read_votes(db) if v.rater_id == rater_id}
        rater.vote("tie")
    finally:
        stop(proc)
    votes = read_votes(db)
    assert len(votes) == len(stored) + 1
    new = votes[-1]
    assert new.rater_id == rater_id and comparison(new) not in before


def test_serve_reports_a_busy_port_and_a_folder_without_runs_in_one_line(study, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(humaneval_app, ["serve", str(study), "--port", str(port)])
    assert isinstance(result.exception, UserError) and f"cannot listen on 127.0.0.1:{port}" in str(result.exception)
    result = CliRunner().invoke(humaneval_app, ["serve", str(tmp_path / "study" / "runs")])
    assert isinstance(result.exception, UserError) and "neither runs/ nor eval/samples.jsonl" in str(result.exception)
