"""Human-eval inputs: systems are runs, items are prompts that two or more runs continued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smallscale.errors import UserError
from smallscale.humaneval.items import default_db, item_id, load_pool


def write_samples(run_dir: Path, pairs: list[tuple[str, str]]) -> None:
    path = run_dir / "eval" / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p, "continuation": c, "reference": "", "settings": {}}) for p, c in pairs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def study(tmp_path: Path) -> Path:
    runs = tmp_path / "study" / "runs"
    write_samples(runs / "small", [("p1", "s1"), ("p2", "s2"), ("only small", "s3")])
    write_samples(runs / "big", [("p2", "b2"), ("p1", "b1")])
    write_samples(runs / "wide", [("p1", "w1")])
    (runs / "untrained").mkdir()  # no eval/samples.jsonl: not a system
    return tmp_path / "study"


def test_study_dir_gives_systems_items_and_every_comparison(study):
    pool = load_pool([study])
    assert pool.systems == ("big", "small", "wide")
    assert {item.prompt for item in pool.items.values()} == {"p1", "p2"}  # "only small" has one system
    assert pool.items[item_id("p1")].continuations == {"small": "s1", "big": "b1", "wide": "w1"}
    # p1: 3 systems -> 3 pairs; p2: 2 systems -> 1 pair
    assert sorted(pool.comparisons) == sorted([
        (item_id("p1"), "big", "small"), (item_id("p1"), "big", "wide"), (item_id("p1"), "small", "wide"),
        (item_id("p2"), "big", "small"),
    ])  # fmt: skip
    assert default_db([study]) == study / "human_eval.sqlite"


def test_run_dirs_can_be_given_one_by_one(study):
    pool = load_pool([study / "runs" / "small", study / "runs" / "big"])
    assert pool.systems == ("big", "small") and len(pool.comparisons) == 2
    assert default_db([study / "runs" / "small", study / "runs" / "big"]) == Path("human_eval.sqlite")


def test_runs_with_the_same_name_are_refused(study, tmp_path):
    write_samples(tmp_path / "elsewhere" / "small", [("p1", "x")])
    with pytest.raises(UserError, match="both named 'small'"):
        load_pool([study, tmp_path / "elsewhere" / "small"])


def test_a_run_dir_without_samples_says_how_to_make_them(study):
    with pytest.raises(UserError, match="--tasks generation"):
        load_pool([study / "runs" / "untrained", study / "runs" / "small"])


def test_no_shared_prompt_is_an_error(tmp_path):
    write_samples(tmp_path / "a", [("x", "1")])
    write_samples(tmp_path / "b", [("y", "2")])
    with pytest.raises(UserError, match="no prompt continued by two"):
        load_pool([tmp_path / "a", tmp_path / "b"])


def test_a_malformed_line_is_named(tmp_path):
    write_samples(tmp_path / "a", [("x", "1")])
    (tmp_path / "b" / "eval").mkdir(parents=True)
    (tmp_path / "b" / "eval" / "samples.jsonl").write_text('{"prompt": "x", "continuation": "2"}\n{"prompt": "y"}\n')
    with pytest.raises(UserError, match=r"samples.jsonl:2 is not a JSON object"):
        load_pool([tmp_path / "a", tmp_path / "b"])
