"""The rater web app through Flask's test client: blind pairs, safe rendering, votes, bad requests.
Who may vote (invites, spoofing) is tested in test_humaneval_invites.py."""

from __future__ import annotations

import random
import re
import sqlite3
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

from smallscale.humaneval import store
from smallscale.humaneval.app import create_app, draw_comparison
from smallscale.humaneval.items import load_pool
from smallscale.humaneval.loadcheck import write_synthetic_study
from smallscale.humaneval.store import read_votes

EVIL = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> & "quotes"'


def hidden(page: str, name: str) -> str | None:
    match = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)">', page)
    return match.group(1) if match else None


def invite(db: Path, name: str) -> str:
    """A new rater's invite token (the server need not run: it reads the database)."""
    with closing(store.connect(db)) as conn:
        return store.add_rater(conn, name)[1]


class Rater:
    """A newly invited rater's browser, as Flask's test client, on the page their invite link led to."""

    def __init__(self, app, name: str):
        self.client = app.test_client()
        token = invite(app.config["VOTE_DB"], name)
        response = self.client.get(f"/r/{token}", follow_redirects=True)
        assert response.status_code == 200, response.text
        self.page = response.text

    @property
    def csrf(self) -> str:
        return hidden(self.page, "csrf")

    @property
    def token(self) -> str | None:
        return hidden(self.page, "token")

    def vote(self, answer: str = "a", reason: str = "", **form):
        data = {"csrf": self.csrf, "token": self.token, "answer": answer, "reason": reason, **form}
        response = self.client.post("/vote", data={k: v for k, v in data.items() if v is not None}, follow_redirects=True)
        if response.status_code == 200:
            self.page = response.text
        return response


@pytest.fixture
def study(tmp_path: Path) -> Path:
    write_synthetic_study(tmp_path / "study", n_systems=3, n_prompts=2)  # 2 prompts x 3 pairs = 6 comparisons
    return tmp_path / "study"


@pytest.fixture
def app(study: Path):
    return create_app(load_pool([study]), study / "human_eval.sqlite")


def db_rows(study: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(study / "human_eval.sqlite") as conn:
        return conn.execute(sql).fetchall()


def test_model_output_is_shown_as_escaped_text_under_a_strict_csp(tmp_path):
    write_synthetic_study(tmp_path, n_systems=2, n_prompts=1)
    samples = tmp_path / "runs" / "run-01" / "eval" / "samples.jsonl"
    samples.write_text(samples.read_text().replace("run-01 continues prompt 0 (0)", EVIL.replace('"', '\\"')))
    app = create_app(load_pool([tmp_path]), tmp_path / "human_eval.sqlite")
    rater = Rater(app, "alice")
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;&lt;img src=x onerror=&#34;window.__xss = 2&#34;&gt; &amp;" in rater.page
    assert "<script>window" not in rater.page and "<img" not in rater.page
    csp = app.test_client().get("/").headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp


def test_a_vote_is_stored_with_rater_item_shown_order_answer_reason_and_time(app, study):
    rater = Rater(app, "alice")
    assert "0 of 6" in rater.page
    token = rater.token
    response = rater.vote("b", reason="  more\tcoherent  ")
    assert response.status_code == 200 and "1 of 6" in rater.page
    (vote,) = read_votes(study / "human_eval.sqlite")
    left, right = db_rows(study, f"SELECT system_left, system_right FROM assignments WHERE token = '{token}'")[0]
    assert (vote.rater, vote.rater_id, vote.token, vote.system_left, vote.system_right) == ("alice#1", 1, token, left, right)
    assert (vote.answer, vote.reason) == ("b", "more coherent")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", vote.created_at)
    assert db_rows(study, "PRAGMA journal_mode") == [("wal",)]


def test_a_retried_post_is_recorded_once_and_the_first_answer_stands(app, study):
    rater = Rater(app, "alice")
    form = {"csrf": rater.csrf, "token": rater.token, "reason": ""}
    for answer in ("a", "a", "tie"):
        assert rater.client.post("/vote", data={**form, "answer": answer}).status_code == 303
    assert [v.answer for v in read_votes(study / "human_eval.sqlite")] == ["a"]


def test_a_rater_gets_every_comparison_once_then_a_done_page(app, study):
    rater = Rater(app, "alice")
    seen = []
    for _ in range(6):
        seen.append(db_rows(study, f"SELECT item_id, system_lo, system_hi FROM assignments WHERE token = '{rater.token}'")[0])
        rater.vote("tie")
    assert len(set(seen)) == 6 and rater.token is None
    assert "judged all 6 comparisons" in rater.page
    assert len(read_votes(study / "human_eval.sqlite")) == 6


def test_reloading_shows_the_same_comparison_until_it_is_answered(app):
    rater = Rater(app, "alice")
    first = rater.token
    assert hidden(rater.client.get("/rate").text, "token") == first
    rater.vote("a")
    assert rater.token != first


def test_sides_are_random_and_draws_are_uniform_over_unseen_comparisons(app):
    firsts = Counter()
    for i in range(40):
        rater = Rater(app, f"r{i}")
        firsts[re.search(r'id="text-a">(run-\d\d)', rater.page).group(1)] += 1
    assert len(firsts) == 3  # every system was shown on the left to someone
    comparisons = [(f"item{i}", "x", "y") for i in range(6)]
    seen = set(comparisons[:2])
    rng = random.Random(0)
    counts = Counter(draw_comparison(comparisons, seen, rng) for _ in range(4000))
    assert set(counts) == set(comparisons[2:])
    assert all(abs(n - 1000) < 120 for n in counts.values()), counts  # ~3.5 binomial sd
    assert draw_comparison(comparisons, set(comparisons), rng) is None


def test_a_restarted_server_continues_where_the_rater_left_off(app, study):
    rater = Rater(app, "alice")
    rater.vote("a")
    rater.vote("b")
    open_token = rater.token
    restarted = create_app(load_pool([study]), study / "human_eval.sqlite")
    rater.client.application = restarted  # same browser (cookie), new server process state
    page = rater.client.get("/rate").text
    assert hidden(page, "token") == open_token and "2 of 6" in page
    rater.page = page
    rater.vote("tie")
    assert len(read_votes(study / "human_eval.sqlite")) == 3


@pytest.mark.parametrize(
    "change,status,message",
    [
        ({"csrf": "forged"}, 403, "security token"),
        ({"csrf": None}, 403, "security token"),
        ({"answer": "left"}, 400, "not one of a, b, tie, bad"),
        ({"answer": None}, 400, "no &#39;answer&#39; field"),
        ({"token": None}, 400, "no &#39;token&#39; field"),
        ({"token": "nonsense"}, 400, "unknown to the server"),
        ({"reason": "x" * 281}, 400, "at most 280"),
        ({"reason": "bell\x07"}, 400, "control characters"),
    ],
)
def test_malformed_votes_get_a_4xx_that_says_why(app, study, change, status, message):
    rater = Rater(app, "alice")
    form = {"csrf": rater.csrf, "token": rater.token, "answer": "a", "reason": "", **change}
    response = rater.client.post("/vote", data={k: v for k, v in form.items() if v is not None})
    assert response.status_code == status and message in response.text
    assert read_votes(study / "human_eval.sqlite") == []


def test_cross_site_posts_are_refused(app, study):
    rater = Rater(app, "alice")
    form = {"csrf": rater.csrf, "token": rater.token, "answer": "a"}
    assert rater.client.post("/vote", data=form, headers={"Origin": "http://evil.example"}).status_code == 403
    assert rater.client.post("/vote", data=form, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert rater.client.post("/vote", data=form, headers={"Origin": "http://localhost"}).status_code == 303  # same origin
    assert len(read_votes(study / "human_eval.sqlite")) == 1


def test_a_local_server_answers_only_to_local_host_names(app, study):
    client = app.test_client()
    assert client.get("/static/app.css", headers={"Host": "127.0.0.1:8080"}).status_code == 200
    assert client.get("/static/app.css", headers={"Host": "[::1]:8080"}).status_code == 200
    response = client.get("/static/app.css", headers={"Host": "rebound.example:8080"})  # DNS rebinding
    assert response.status_code == 400 and "unexpected Host" in response.text
    assert create_app(load_pool([study]), study / "human_eval.sqlite", allowed_hosts=None).test_client().get(
        "/static/app.css", headers={"Host": "rebound.example"}
    ).status_code == 200


def test_a_token_is_only_good_for_the_rater_it_was_given_to(app, study):
    alice, bob = Rater(app, "alice"), Rater(app, "bob")
    response = bob.client.post("/vote", data={"csrf": bob.csrf, "token": alice.token, "answer": "a"})
    assert response.status_code == 403 and "another rater" in response.text
    assert read_votes(study / "human_eval.sqlite") == []


def test_other_bad_requests_are_4xx_not_500(app):
    client = Rater(app, "alice").client
    csrf = hidden(client.get("/rate").text, "csrf")
    assert client.get("/vote").status_code == 405
    assert client.get("/no-such-page").status_code == 404
    assert client.get("/static/../app.py").status_code == 404
    assert client.post("/vote", data={"csrf": csrf, "reason": "x" * 100_000}).status_code == 413
    assert client.post("/vote", data=b"\xff\xfe", content_type="application/octet-stream").status_code == 403
    assert client.get("/r/" + "x" * 5000).status_code == 403


def test_static_assets_are_served_by_the_app(app):
    client = app.test_client()
    js = client.get("/static/app.js")
    assert js.status_code == 200 and js.mimetype == "text/javascript" and "keydown" in js.text
    assert client.get("/static/app.css").mimetype == "text/css"
