"""Limited data: the `unique_tokens` x `epochs` study axes, their results columns, and the report's
repetition section on a synthetic study with a planted R* (no training).

Planted: per model size, val_loss = E + B / D'^0.3 with D' Muennighoff's effective data
(smallscale.study.data_constrained.effective_data), R* = 4 for the small model and 12 for the large
one, E = 1.8 / 1.6, B = 40 / 30, times a 0.1% log-normal noise; U in {0.25, 0.5, 1, 2}M x epochs in
{1, 2, 4, 8, 16}, plus single-epoch runs at 4M and 8M unique tokens (the sweet-spot budgets).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from smallscale.errors import UserError
from smallscale.study import grid
from smallscale.study.data_constrained import effective_data, epochs_until_worthless
from smallscale.study.report import _jsonable, load_results, repetition
from smallscale.study.results import _config_columns
from tests.test_report import make_run, write_study

PLANTED = {"s": {"R_star": 4.0, "E": 1.8, "B": 40.0}, "m": {"R_star": 12.0, "E": 1.6, "B": 30.0}}
UNIQUE = (2.5e5, 5e5, 1e6, 2e6)
EPOCHS = (1, 2, 4, 8, 16)


def planted_loss(p: dict[str, float], unique: float, tokens: float, rng: np.random.Generator) -> float:
    loss = p["E"] + p["B"] / float(effective_data(unique, tokens, p["R_star"])) ** 0.3
    return loss * math.exp(rng.normal(0.0, 0.001))


def repetition_rows(planted=PLANTED, unique=UNIQUE, epochs=EPOCHS, single=(4e6, 8e6)) -> list[dict]:
    """Runs of each preset (a key of test_report.SIZES) with val_loss from its planted law."""
    rows = []
    for i, (preset, law) in enumerate(planted.items()):
        rng = np.random.default_rng(i)  # fixed noise: a 95% interval misses one draw in twenty
        points = [(u, u * e) for u in unique for e in epochs] + [(u, u) for u in single]
        for u, d in points:
            loss = planted_loss(law, u, d, rng)
            row = make_run(preset, d, token_budget=u, unique_tokens=u, epochs=d / u, steps=d / 4096, val_loss=loss,
                           val_bpb=loss / (math.log(2) * 4.0))  # fmt: skip
            row["run_id"] = f"{preset}-U{u:g}-D{d:g}"
            rows.append(row)
    return rows


def repetition_section(rows: list[dict], root: Path, n_boot: int) -> dict:
    """The section alone (write_report would also run the slow scaling-law bootstrap), as findings.json holds it."""
    found = repetition(load_results(write_study(root, rows)), n_boot, 0)
    assert [p.name for p in found.figures] == ["repetition"]
    return json.loads(json.dumps(_jsonable({"finding": found.finding_md, **found.data})))


@pytest.fixture(scope="module")
def section(tmp_path_factory) -> dict:
    return repetition_section(repetition_rows(), tmp_path_factory.mktemp("rep") / "study", n_boot=40)


@pytest.mark.parametrize("preset", ["s", "m"])
def test_the_planted_r_star_is_recovered_within_its_interval(section, preset):
    size = next(s for s in section["sizes"] if s["size"].startswith(f"{preset} "))
    fit, planted = size["fit"], PLANTED[preset]["R_star"]
    lo, hi = fit["R_star_interval"]
    assert fit["identified"] and lo <= planted <= hi
    assert fit["R_star"] == pytest.approx(planted, rel=0.3)
    assert fit["epochs_until_worthless"] == pytest.approx(1 + fit["R_star"] * math.log(10))  # one more epoch < 10% of new data
    assert fit["epochs_interval"] == pytest.approx([epochs_until_worthless(lo), epochs_until_worthless(hi)])
    assert f"R* = {fit['R_star']:.3g} (95% CI {lo:.3g}–{hi:.3g})" in section["finding"]


def test_the_sweet_spot_is_stated_per_size_with_intervals(section):
    for size in section["sizes"]:
        spot = size["sweet_spot"]
        assert spot["budgets"] == [2.5e5, 5e5, 1e6, 2e6, 4e6, 8e6]  # single-epoch runs only
        one, five = spot["within_1"], spot["within_5"]
        assert one["lo"] <= one["tokens"] <= one["hi"] and five["tokens"] < one["tokens"] < 8e6
    assert "within 1% of the best loss" in section["finding"] and "within 5% from" in section["finding"]


def test_repetition_as_good_as_fresh_data_is_flagged_not_identified(tmp_path):
    # Planted R* = 1e6: up to 4 epochs a repeated token is worth a fresh one, so the runs only bound R*
    # from below; the report must not state a number.
    rows = repetition_rows({"s": {"R_star": 1e6, "E": 1.8, "B": 40.0}}, unique=(2.5e5, 5e5, 1e6), epochs=(1, 2, 4), single=(2e6, 4e6))
    rep = repetition_section(rows, tmp_path / "fresh", n_boot=20)
    fit = rep["sizes"][0]["fit"]
    assert not fit["identified"], f"R* {fit['R_star']} (interval {fit['R_star_interval']}) claimed identified"
    assert "not identified by this study" in rep["finding"] and "repetition shows no measurable loss of value" in rep["finding"]


def test_a_study_without_repetition_or_enough_budgets_has_no_such_section(tmp_path):
    root = write_study(tmp_path / "plain", [make_run(p, d) for p in ("s", "m") for d in (2e6, 8e6, 32e6)])
    assert repetition(load_results(root), 2, 0) is None


# ----------------------------------------------------------------------------- the study axes
def repetition_study(path: Path, dataset: Path, **fields) -> Path:
    spec = {"name": "rep", "datasets": {"syn": {"path": str(dataset)}},
            "base": {"model": {"preset": "cpu-500k", "seq_len": 64, "n_layer": 1, "d_model": 32, "n_head": 2},
                     "train": {"global_batch_tokens": 1024, "micro_batch": 16}},
            "grid": {"unique_tokens": [2048, 4096], "epochs": [1, 2.5]}, **fields}  # fmt: skip
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def test_unique_tokens_and_epochs_set_the_budget_and_the_training_tokens(tmp_path, tiny_dataset):
    runs = grid.expand(grid.load_study(repetition_study(tmp_path / "s.yaml", tiny_dataset)), tmp_path, {"syn": 512})
    got = sorted((r.axes["unique_tokens"], r.axes["epochs"], r.config["data"]["token_budget"], r.config["train"]["tokens"]) for r in runs)
    assert got == [(2048, 1, 2048, 2048), (2048, 2.5, 2048, 5120), (4096, 1, 4096, 4096), (4096, 2.5, 4096, 10240)]


def test_derive_overrides_the_repetition_pair(tmp_path, tiny_dataset):
    study = repetition_study(tmp_path / "s.yaml", tiny_dataset, derive={"train.tokens": "min(unique_tokens * epochs, 4096)"})
    runs = grid.expand(grid.load_study(study), tmp_path, {"syn": 512})
    # (4096 unique, 2.5 epochs) derives the very config of (4096, 1): one run
    assert sorted((r.config["data"]["token_budget"], r.config["train"]["tokens"]) for r in runs) == [(2048, 2048), (2048, 4096), (4096, 4096)]


@pytest.mark.parametrize("axes", [{"unique_tokens": [2048]}, {"unique_tokens": [2048.5], "epochs": [2]}, {"unique_tokens": [2048], "epochs": [0]}])
def test_the_repetition_pair_needs_both_axes_with_positive_values(tmp_path, tiny_dataset, axes):
    study = repetition_study(tmp_path / "s.yaml", tiny_dataset, grid=axes)
    with pytest.raises(UserError, match="unique_tokens=.* and epochs=.* go together"):
        grid.expand(grid.load_study(study), tmp_path, {"syn": 512})


def test_results_have_a_unique_tokens_column():
    config = {"data": {"token_budget": 4096}, "train": {"tokens": 10240}}
    columns = _config_columns(config, "syn", Path("/nonexistent"), {"splits": {"train": {"tokens": 99999}}})
    assert columns["unique_tokens"] == columns["token_budget"] == 4096 and columns["train_tokens"] == 10240
    whole = _config_columns({"train": {"tokens": 10}}, "syn", Path("/nonexistent"), {"splits": {"train": {"tokens": 99999}}})
    assert whole["unique_tokens"] == 99999  # no budget: the whole training split
