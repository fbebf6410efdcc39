"""Human-eval results: hand-counted votes -> win rates, BT order, agreement; files; the study-report hooks;
only invited raters count, and databases from before invites still load."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from sklearn.metrics import cohen_kappa_score
from typer.testing import CliRunner

from smallscale.errors import UserError
from smallscale.humaneval import store
from smallscale.humaneval.cli import humaneval_app
from smallscale.humaneval.app import create_app
from smallscale.humaneval.items import load_pool
from smallscale.humaneval.loadcheck import write_synthetic_study
from smallscale.humaneval.results import load_summary, summarize, summary_markdown
from smallscale.humaneval.stats import wilson_interval

# (rater, item, left, right, answer): two raters on the same four comparisons of systems A, B, C.
VOTES = [
    ("r1", "item1", "A", "B", "a"),    # A beats B
    ("r1", "item1", "B", "C", "b"),    # C beats B
    ("r1", "item2", "A", "C", "tie"),
    ("r1", "item2", "A", "B", "bad"),
    ("r2", "item1", "B", "A", "b"),    # A beats B: agrees with r1 although shown the other way round
    ("r2", "item1", "B", "C", "a"),    # B beats C: disagrees
    ("r2", "item2", "C", "A", "tie"),
    ("r2", "item2", "B", "A", "bad"),
]  # fmt: skip


def write_votes(db: Path, votes=VOTES) -> dict[str, store.Rater]:
    """Invite one rater per distinct name in `votes` and record their votes; name -> rater."""
    store.init_db(db)
    raters: dict[str, store.Rater] = {}
    with closing(store.connect(db)) as conn:
        for name, item, left, right, answer in votes:
            if name not in raters:
                raters[name] = store.add_rater(conn, name)[0]
            with store.transaction(conn):
                token = store.add_assignment(conn, raters[name], item, left, right).token
            assert store.record_vote(conn, token, raters[name].id, answer, "") == store.RECORDED
    return raters


# The vote database as smallscale wrote it before rater invites (schema version 1), verbatim.
SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE assignments (
    token TEXT PRIMARY KEY, rater TEXT NOT NULL, item_id TEXT NOT NULL, system_lo TEXT NOT NULL,
    system_hi TEXT NOT NULL, system_left TEXT NOT NULL, system_right TEXT NOT NULL, issued_at TEXT NOT NULL,
    UNIQUE (rater, item_id, system_lo, system_hi)
);
CREATE TABLE votes (
    id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE REFERENCES assignments (token), rater TEXT NOT NULL,
    item_id TEXT NOT NULL, system_left TEXT NOT NULL, system_right TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('a', 'b', 'tie', 'bad')), reason TEXT NOT NULL, created_at TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('schema_version', '1'), ('secret', 'old-secret');
"""
# Typed names before invites: "r1" answers unlike invited r1, "sock" is anyone at all.
LEGACY_VOTES = [
    ("r1", "item1", "A", "B", "b"),
    ("r1", "item1", "B", "C", "tie"),
    ("sock", "item1", "A", "B", "b"),
    ("sock", "item2", "A", "C", "a"),
    ("sock", "item2", "A", "B", "a"),
]  # fmt: skip


def write_v1_database(db: Path, votes=LEGACY_VOTES) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executescript(SCHEMA_V1)
        for i, (rater, item, left, right, answer) in enumerate(votes):
            lo, hi = sorted((left, right))
            row = (f"old{i}", rater, item, lo, hi, left, right, "2025-01-01T00:00:00.000+00:00")
            conn.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            conn.execute(
                "INSERT INTO votes (token, rater, item_id, system_left, system_right, answer, reason, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, '', ?)", (f"old{i}", rater, item, left, right, answer, row[-1]),
            )  # fmt: skip


@pytest.fixture
def study(tmp_path: Path) -> Path:
    write_votes(tmp_path / "human_eval.sqlite")
    return tmp_path


def test_counts_win_rates_and_bradley_terry_order(study):
    summary = summarize(store.read_votes(study / "human_eval.sqlite"), n_boot=200, seed=0)
    assert (summary["n_votes"], summary["n_raters"], summary["n_items"], summary["n_comparisons"]) == (8, 2, 2, 4)
    rows = {r["system"]: r for r in summary["systems"]}
    assert [(rows[s]["won"], rows[s]["lost"], rows[s]["tie"], rows[s]["both_bad"]) for s in "ABC"] == [
        (2, 0, 2, 2), (1, 3, 0, 2), (1, 1, 2, 0)
    ]  # fmt: skip
    assert [rows[s]["win_rate"] for s in "ABC"] == pytest.approx([4 / 6, 2 / 6, 2 / 4])
    assert rows["A"]["win_rate_ci95"] == pytest.approx(list(wilson_interval(4, 6)))
    assert [r["system"] for r in summary["systems"]] == ["A", "C", "B"]  # by BT score
    for r in summary["systems"]:
        assert r["bt_ci95"][0] <= r["bt_score"] <= r["bt_ci95"][1]
    assert sum(r["bt_score"] for r in summary["systems"]) == pytest.approx(0.0, abs=1e-9)
    assert summary["answers"] == {"a": 2, "b": 2, "tie": 2, "bad": 2}


def test_agreement_is_computed_on_order_free_answers(study):
    agreement = summarize(store.read_votes(study / "human_eval.sqlite"), n_boot=10)["agreement"]
    # per comparison (r1, r2): (first, first), (second, first), (tie, tie), (both bad, both bad)
    r1, r2 = ["first", "second", "tie", "both bad"], ["first", "first", "tie", "both bad"]
    assert agreement["cohen_kappa"] == pytest.approx(cohen_kappa_score(r1, r2)) == pytest.approx(2 / 3)
    # coincidences: n = 8 values, 2 disagreeing; marginals first 3, second 1, tie 2, both bad 2
    assert agreement["krippendorff_alpha"] == pytest.approx(1 - 2 / ((64 - 9 - 1 - 4 - 4) / 7))
    assert agreement["n_comparisons_multiply_rated"] == 4


def test_study_report_hooks(study, tmp_path):
    summary = load_summary(study)
    markdown = summary_markdown(summary)
    assert "8 votes from 2 invited rater(s) on 2 prompt(s)" in markdown
    assert "| A | 6 | 0.67 [" in markdown and "Krippendorff's α (nominal): 0.696" in markdown
    assert "Cohen's κ (r1#1 vs r2#2): 0.667 on 4 shared comparisons" in markdown
    assert load_summary(tmp_path / "no-study") is None
    store.init_db(tmp_path / "empty" / "human_eval.sqlite")
    assert load_summary(tmp_path / "empty") is None


def test_results_command_prints_and_writes_json_markdown_html_and_plot(study):
    result = CliRunner().invoke(humaneval_app, ["results", str(study), "--n-boot", "100", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "| C | 4 | 0.50 [" in result.output
    out = study / "human_eval"
    assert sorted(p.name for p in out.iterdir()) == ["results.html", "results.json", "results.md", "results.png"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"n_votes": 8' in (out / "results.json").read_text() and '"seed": 3' in (out / "results.json").read_text()
    assert "<td>A</td>" in (out / "results.html").read_text()
    other = study / "elsewhere"
    result = CliRunner().invoke(humaneval_app, ["results", str(study / "human_eval.sqlite"), "--out", str(other), "--n-boot", "50"])
    assert result.exit_code == 0 and (other / "results.json").is_file()


def test_results_without_votes_is_a_user_error(tmp_path):
    result = CliRunner().invoke(humaneval_app, ["results", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "human-eval serve" in str(result.exception)
    store.init_db(tmp_path / "human_eval.sqlite")
    result = CliRunner().invoke(humaneval_app, ["results", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "no votes yet" in str(result.exception)
    (tmp_path / "not.sqlite").write_text("hello, I am not a database" * 100)
    result = CliRunner().invoke(humaneval_app, ["results", str(tmp_path / "not.sqlite")])
    assert isinstance(result.exception, UserError) and "not a human-eval vote database" in str(result.exception)


def test_html_output_escapes_system_names(tmp_path):
    write_votes(tmp_path / "human_eval.sqlite", [("r", "i", "<b>x</b>", "y", "a")])
    result = CliRunner().invoke(humaneval_app, ["results", str(tmp_path), "--n-boot", "20"])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "human_eval" / "results.html").read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html


def test_agreement_and_win_rates_count_only_invited_raters(tmp_path):
    db = tmp_path / "human_eval.sqlite"
    write_v1_database(db)
    write_votes(db)  # upgrades the database, then the invited raters r1 and r2 vote as in VOTES
    votes = store.read_votes(db)
    assert len(votes) == 13 and sum(v.rater_id is None for v in votes) == 5
    summary = summarize(votes, n_boot=10)
    invited_only = summarize([v for v in votes if v.rater_id is not None], n_boot=10)
    assert summary["agreement"] == invited_only["agreement"]
    assert summary["agreement"]["krippendorff_alpha"] == pytest.approx(1 - 2 / ((64 - 9 - 1 - 4 - 4) / 7))
    assert [p["raters"] for p in summary["agreement"]["kappa_pairs"]] == [["r1#1", "r2#2"]]
    assert (summary["n_votes"], summary["n_raters"], summary["n_votes_uninvited"]) == (8, 2, 5)
    assert summary["systems"] == invited_only["systems"]
    assert "5 vote(s) from before rater invites (no rater id: whoever typed a name) are left out of every number" in summary_markdown(summary)


def test_uninvited_votes_can_count_in_win_rates_but_never_in_agreement(tmp_path):
    db = tmp_path / "human_eval.sqlite"
    write_v1_database(db)
    write_votes(db)
    summary = summarize(store.read_votes(db), n_boot=10, include_uninvited=True)
    assert (summary["n_votes"], summary["n_raters"], summary["n_votes_uninvited"]) == (13, 2, 5)
    assert {r["system"]: r["won"] for r in summary["systems"]} == {"A": 2 + 2, "B": 1 + 2, "C": 1}
    assert summary["agreement"]["krippendorff_alpha"] == pytest.approx(1 - 2 / ((64 - 9 - 1 - 4 - 4) / 7))
    markdown = summary_markdown(summary)
    assert "13 votes (5 from before invites) from 2 invited rater(s)" in markdown
    assert "counted in win rates and Bradley-Terry scores but left out of agreement" in markdown


def test_two_invited_raters_who_share_a_name_are_two_raters(tmp_path):
    db = tmp_path / "human_eval.sqlite"
    store.init_db(db)
    with closing(store.connect(db)) as conn:
        twins = [store.add_rater(conn, "sam")[0] for _ in range(2)]
        for rater, answers in zip(twins, (["a", "b", "tie"], ["a", "a", "tie"]), strict=True):
            for item, answer in zip(("i1", "i2", "i3"), answers, strict=True):
                with store.transaction(conn):
                    token = store.add_assignment(conn, rater, item, "A", "B").token
                store.record_vote(conn, token, rater.id, answer, "")
    summary = summarize(store.read_votes(db), n_boot=10)
    assert summary["n_raters"] == 2
    assert summary["agreement"]["kappa_pairs"][0]["raters"] == ["sam#1", "sam#2"]
    assert summary["agreement"]["n_comparisons_multiply_rated"] == 3


def test_a_database_from_before_invites_loads_as_it_is_and_upgrades_in_place(tmp_path):
    db = tmp_path / "human_eval.sqlite"
    write_v1_database(db)
    old = store.read_votes(db)  # not upgraded by reading
    assert [(v.rater, v.rater_id) for v in old] == [(r, None) for r, *_ in LEGACY_VOTES]
    result = CliRunner().invoke(humaneval_app, ["results", str(tmp_path), "--n-boot", "10"])
    assert isinstance(result.exception, UserError) and "all from before rater invites" in str(result.exception)
    result = CliRunner().invoke(humaneval_app, ["results", str(tmp_path), "--n-boot", "10", "--include-uninvited"])
    assert result.exit_code == 0 and "5 votes (5 from before invites) from 0 invited rater(s)" in result.output

    study = tmp_path / "study"
    write_synthetic_study(study, n_systems=2, n_prompts=1)
    app = create_app(load_pool([study]), db)  # what `serve` does: the database is upgraded in place
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
        assert "rater_id" in {row[1] for row in conn.execute("PRAGMA table_info(votes)")}
        # the typed name "alice" already had this study's only comparison: no obstacle for invited alice
        conn.execute("INSERT INTO assignments VALUES ('typed', 'alice', ?, 'run-00', 'run-01', 'run-00', 'run-01', '2025', NULL)",
                     (next(iter(load_pool([study]).items)),))  # fmt: skip
        conn.commit()
    assert [(v.token, v.rater, v.rater_id) for v in store.read_votes(db)] == [(v.token, v.rater, None) for v in old]
    with closing(store.connect(db)) as conn:
        token = store.add_rater(conn, "alice")[1]
    client = app.test_client()
    page = client.get(f"/r/{token}", follow_redirects=True).text
    form = {"csrf": _hidden(page, "csrf"), "token": _hidden(page, "token"), "answer": "a"}
    assert client.post("/vote", data=form).status_code == 303
    assert [(v.rater, v.rater_id) for v in store.read_votes(db)][-1] == ("alice#1", 1)


def _hidden(page: str, name: str) -> str:
    return page.split(f'name="{name}" value="', 1)[1].split('"', 1)[0]
