"""Scaling-law fits: published Chinchilla numbers, exact recovery, bootstrap coverage, and `fit_table`."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.special import huber
from scipy.stats import norm

from smallscale.errors import UserError
from smallscale.study.scaling import (
    ChinchillaFit,
    bootstrap_chinchilla,
    bootstrap_power_law,
    compute_optimal_intervals,
    fit_chinchilla,
    fit_power_law,
    fit_table,
)

REPO = Path(__file__).resolve().parents[1]
EPOCH_CSV = Path(os.environ.get("SMALLSCALE_DATA_ROOT", REPO.parent / "shared" / "data")) / "scaling" / "chinchilla_epoch.csv"

# Besiroglu et al. (2024), refit of Hoffmann et al. Figure 4 data without the five highest-loss points.
EPOCH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}

TRUE_LAW = {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.35, "beta": 0.37}
TRUE_POWER = {"E": 2.0, "A": 400.0, "alpha": 0.3}


def chinchilla_grid() -> tuple[np.ndarray, np.ndarray]:
    """6 model sizes x 6 token counts, 10M-3B parameters and 300M-300B tokens."""
    N, D = np.meshgrid(np.logspace(7, 9.5, 6), np.logspace(8.5, 11.5, 6))
    return N.ravel(), D.ravel()


def true_loss(N, D):
    return ChinchillaFit(**TRUE_LAW, loss=0.0).predict(N, D)


def epoch_points() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N, D = FLOP / (6N), loss, without the five highest-loss points (as Epoch did)."""
    with EPOCH_CSV.open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["loss"]))[:-5]
    N = np.array([float(r["Model Size"]) for r in rows])
    flop = np.array([float(r["Training FLOP"]) for r in rows])
    return N, flop / (6 * N), np.array([float(r["loss"]) for r in rows])


@pytest.mark.data
def test_fitted_scale_reproduces_epoch_estimates_within_one_percent():
    N, D, L = epoch_points()
    assert len(L) == 240
    fit = fit_chinchilla(N, D, L, scale="fitted")
    for name, published in EPOCH.items():
        assert getattr(fit, name) == pytest.approx(published, rel=0.01), name


@pytest.mark.data
def test_fixed_scale_optimum_beats_epoch_point_on_its_own_objective_yet_differs_in_B():
    # Huber delta=1e-3, as both papers describe, reaches a *lower* objective than Epoch's published
    # point, so the 3% gap in B is the estimator (Epoch's numbers come from a Huber likelihood with
    # a free scale, scale="fitted"), not our optimiser stopping early.
    N, D, L = epoch_points()
    fit = fit_chinchilla(N, D, L)
    at_epoch = huber(1e-3, np.log(ChinchillaFit(**EPOCH, loss=0.0).predict(N, D)) - np.log(L)).sum()
    assert fit.loss == pytest.approx(huber(1e-3, np.log(fit.predict(N, D)) - np.log(L)).sum(), rel=1e-9)
    assert fit.loss < at_epoch
    assert (fit.E, fit.A, fit.B, fit.alpha, fit.beta) == pytest.approx((1.8172, 477.83, 2143.4, 0.3473, 0.3672), rel=1e-3)


def test_noiseless_chinchilla_is_recovered_exactly():
    N, D = chinchilla_grid()
    fit = fit_chinchilla(N, D, true_loss(N, D))
    for name, value in TRUE_LAW.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-6), name
    assert fit.loss < 1e-15


@pytest.mark.parametrize("irreducible", [True, False])
def test_noiseless_power_law_is_recovered_exactly(irreducible):
    x = np.logspace(6, 10, 20)
    E = TRUE_POWER["E"] if irreducible else 0.0
    fit = fit_power_law(x, E + TRUE_POWER["A"] / x ** TRUE_POWER["alpha"], irreducible=irreducible)
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((E, TRUE_POWER["A"], TRUE_POWER["alpha"]), rel=1e-6)
    assert fit.predict([1e8]) == pytest.approx(E + TRUE_POWER["A"] / 1e8 ** TRUE_POWER["alpha"])


def test_compute_optimal_spends_all_compute_and_matches_brute_force():
    law = ChinchillaFit(**EPOCH, loss=0.0)
    C = np.array([1e18, 1e21, 1e24])
    n_opt, d_opt = law.compute_optimal(C)
    np.testing.assert_allclose(6 * n_opt * d_opt, C, rtol=1e-12)
    N = np.logspace(5, 15, 400_001)  # steps of 0.006%
    for c, n_star in zip(C, n_opt):
        brute = N[np.argmin(law.predict(N, c / (6 * N)))]
        assert brute == pytest.approx(n_star, rel=1e-4)
    # Epoch's law puts ~20 tokens per parameter at Chinchilla's own budget (5.8e23 FLOP).
    assert law.tokens_per_param(5.76e23) == pytest.approx(20.0, rel=0.1)


def _coverage(fits: list[tuple[dict, dict[str, tuple[float, float]]]], truth: dict, level: float):
    """Fraction of intervals that cover the truth (pooled over parameters), and per parameter the
    median interval width over the width the spread of estimates across datasets implies."""
    covered = np.mean([lo <= truth[k] <= hi for _, iv in fits for k, (lo, hi) in iv.items()])
    z = 2 * norm.ppf(0.5 + level / 2)
    ratios = {k: np.median([iv[k][1] - iv[k][0] for _, iv in fits]) / (z * np.std([e[k] for e, _ in fits])) for k in truth}
    return covered, ratios


def assert_nominal(covered: float, ratios: dict[str, float]) -> None:
    # Reporting the 95% interval as the 80% one makes widths 1.5x; the 60% one, 0.66x: both fail.
    print(f"coverage {covered:.3f}; width ratios " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))  # pytest -s
    assert 0.7 <= covered <= 0.9
    for name, ratio in ratios.items():
        assert 0.75 < ratio < 1.35, (name, ratio)


def test_chinchilla_bootstrap_covers_truth_at_nominal_rate():
    # 30 datasets of 36 runs with 1% log-normal noise; 80% intervals from 40 resamples each.
    # Measured: coverage 0.81; widths 0.99-1.28x what the spread across datasets implies.
    rng = np.random.default_rng(123)
    N, D = chinchilla_grid()
    fits = []
    for seed in range(30):
        L = true_loss(N, D) * np.exp(0.01 * rng.standard_normal(N.size))
        boot = bootstrap_chinchilla(N, D, L, n_boot=40, level=0.8, seed=seed)
        fits.append((boot.estimate, {k: boot.interval(k) for k in TRUE_LAW}))
    assert_nominal(*_coverage(fits, TRUE_LAW, 0.8))


def test_power_law_bootstrap_covers_truth_at_nominal_rate():
    # 30 datasets of 40 runs, 1% noise, 80% intervals. Measured: coverage 0.79; widths 0.90-1.06x.
    rng = np.random.default_rng(7)
    x = np.logspace(6, 10, 40)
    y = TRUE_POWER["E"] + TRUE_POWER["A"] / x ** TRUE_POWER["alpha"]
    fits = []
    for seed in range(30):
        boot = bootstrap_power_law(x, y * np.exp(0.01 * rng.standard_normal(x.size)), n_boot=40, level=0.8, seed=seed)
        fits.append((boot.estimate, {k: boot.interval(k) for k in TRUE_POWER}))
    assert_nominal(*_coverage(fits, TRUE_POWER, 0.8))


def test_bootstrap_is_seeded_and_its_intervals_bracket_the_estimate():
    rng = np.random.default_rng(0)
    N, D = chinchilla_grid()
    L = true_loss(N, D) * np.exp(0.01 * rng.standard_normal(N.size))
    a = bootstrap_chinchilla(N, D, L, n_boot=20, seed=3)
    b = bootstrap_chinchilla(N, D, L, n_boot=20, seed=3)
    assert a.as_dict() == b.as_dict()
    for name, row in a.as_dict().items():
        assert row["lo"] < row["estimate"] < row["hi"], name
    C = np.array([1e20, 1e23])
    co = compute_optimal_intervals(a, C)
    np.testing.assert_allclose(6 * co["N_opt_estimate"] * co["D_opt_estimate"], C)
    assert np.all(co["N_opt_lo"] < co["N_opt_estimate"]) and np.all(co["N_opt_estimate"] < co["N_opt_hi"])
    np.testing.assert_allclose(co["tokens_per_param_estimate"], co["D_opt_estimate"] / co["N_opt_estimate"])


def write_runs(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def runs_csv(tmp_path: Path) -> Path:
    """Noiseless Chinchilla runs (params, FLOP, loss) plus two diverged runs with huge loss."""
    N, D = chinchilla_grid()
    rows = [{"params": n, "flops": 6 * n * d, "loss": l} for n, d, l in zip(N, D, true_loss(N, D))]
    rows += [{"params": 1e8, "flops": 6e18, "loss": 9.0}, {"params": 1e9, "flops": 6e19, "loss": 8.0}]
    return write_runs(tmp_path / "runs.csv", rows)


def test_fit_table_derives_tokens_from_flop_and_drops_diverged_runs(runs_csv):
    out = fit_table(runs_csv, form="chinchilla", n_col="params", d_col=None, loss_col="loss", flop_col="flops", drop_highest=2)
    json.dumps(out)
    assert out["n_points"] == 36 and out["intervals"] is None
    for name, value in TRUE_LAW.items():
        assert out["params"][name] == pytest.approx(value, rel=1e-5), name
    assert [row["C"] for row in out["compute_optimal"]] == pytest.approx([10.0**e for e in range(18, 25)])
    n_opt, d_opt = ChinchillaFit(**TRUE_LAW, loss=0.0).compute_optimal(1e21)
    assert out["compute_optimal"][3]["N_opt_estimate"] == pytest.approx(float(n_opt), rel=1e-4)


def test_fit_table_power_law_in_n_with_bootstrap_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.logspace(6, 10, 20)
    y = (TRUE_POWER["E"] + TRUE_POWER["A"] / x ** TRUE_POWER["alpha"]) * np.exp(0.01 * np.random.default_rng(1).standard_normal(20))
    pq.write_table(pa.table({"n": x, "loss": y}), tmp_path / "runs.parquet")
    out = fit_table(tmp_path / "runs.parquet", form="n", n_col="n", d_col=None, loss_col="loss", n_boot=30, level=0.9)
    json.dumps(out)
    assert set(out["params"]) == {"E", "A", "alpha"} and "compute_optimal" not in out
    lo, hi = out["intervals"]["alpha"]
    assert lo < out["params"]["alpha"] < hi and hi - lo < 0.2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"path": "missing.csv"}, "does not exist"),
        ({"loss_col": "val_loss"}, "available columns: params, flops, loss"),
        ({"drop_highest": 38}, "drop_highest must be between 0 and 37"),
        ({"flop_col": None}, "needs a token column"),
        ({"form": "n", "n_col": None}, "needs the model-size column"),
        ({"n_boot": 5, "level": 95}, "between 0 and 1"),
    ],
)
def test_fit_table_user_errors(runs_csv, change, message):
    kwargs = {"path": runs_csv, "form": "chinchilla", "n_col": "params", "d_col": None, "loss_col": "loss", "flop_col": "flops"}
    kwargs.update(change)
    kwargs["path"] = runs_csv.parent / kwargs["path"]  # an absolute runs_csv stays as it is
    with pytest.raises(UserError, match=message):
        fit_table(**kwargs)


def test_fit_table_rejects_too_few_and_non_positive_points(tmp_path):
    few = write_runs(tmp_path / "few.csv", [{"n": 1e6 * (i + 1), "d": 1e9, "loss": 3.0 - i / 10} for i in range(4)])
    with pytest.raises(UserError, match="5 parameters needs at least 5 points, got 4"):
        fit_table(few, form="chinchilla", n_col="n", d_col="d", loss_col="loss")
    bad = write_runs(tmp_path / "bad.csv", [{"n": 1e6 * (i + 1), "loss": 3.0 - i} for i in range(5)])
    with pytest.raises(UserError, match="'loss' must be finite and positive; row 3 holds 0.0"):
        fit_table(bad, form="n", n_col="n", d_col=None, loss_col="loss")
    with pytest.raises(UserError, match="use a .csv or .parquet"):
        fit_table(bad.rename(tmp_path / "bad.tsv"), form="n", n_col="n", d_col=None, loss_col="loss")


def test_fits_reject_non_positive_and_mismatched_inputs():
    with pytest.raises(UserError, match="L must be finite and positive; found 0.0"):
        fit_chinchilla([1e8] * 6, [1e9] * 6, [3.0, 2.9, 2.8, 0.0, 2.6, 2.5])
    with pytest.raises(UserError, match="x, y must have the same length, got \\[3, 2\\]"):
        fit_power_law([1.0, 2.0, 3.0], [3.0, 2.0])
    with pytest.raises(UserError, match="scale 'free'"):
        fit_chinchilla([1e8] * 6, [1e9] * 6, [3.0] * 6, scale="free")
