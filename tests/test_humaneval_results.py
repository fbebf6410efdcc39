"""Human-eval results: hand-counted votes -> win rates, BT order, agreement; files; the study-report hooks."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import pytest
from sklearn.metrics import cohen_kappa_score
from typer.testing import CliRunner

from smallscale.errors import UserError
from smallscale.humaneval import store
from smallscale.humaneval.cli import humaneval_app
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


def write_votes(db: Path, votes=VOTES) -> None:
    store.init_db(db)
    with closing(store.connect(db)) as conn:
        for rater, item, left, right, answer in votes:
            with store.transaction(conn):
                token = store.add_assignment(conn, rater, item, left, right).token
            assert store.record_vote(conn, token, rater, answer, "") == store.RECORDED


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
    assert "8 votes from 2 rater(s) on 2 prompt(s)" in markdown
    assert "| A | 6 | 0.67 [" in markdown and "Krippendorff's α (nominal): 0.696" in markdown
    assert "Cohen's κ (r1 vs r2): 0.667 on 4 shared comparisons" in markdown
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
