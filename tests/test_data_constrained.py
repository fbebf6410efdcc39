"""The data-constrained law (Muennighoff et al. 2023): effective data, and R* recovered from a planted study."""

from __future__ import annotations

import numpy as np
import pytest

from smallscale.errors import UserError
from smallscale.study.data_constrained import (
    bootstrap_repetition,
    effective_data,
    epochs_until_worthless,
    fit_repetition,
    sweet_spot,
)


def test_effective_data_matches_the_paper_formula_and_limits():
    assert effective_data(100.0, 100.0, 15.4) == pytest.approx(100.0)  # one epoch: no repetition
    assert effective_data(100.0, 50.0, 15.4) == pytest.approx(100.0)  # less than one epoch counts as U here
    four_epochs = effective_data(100.0, 400.0, 15.4)
    assert four_epochs == pytest.approx(100 + 100 * 15.4 * (1 - np.exp(-3 / 15.4)))
    assert 0.9 * 400 < four_epochs < 400  # "up to 4 epochs is almost as good as new data": 93%
    assert effective_data(100.0, 1e9, 15.4) == pytest.approx(100 * (1 + 15.4), rel=1e-6)  # the ceiling U (1 + R*)


def planted_study(r_star: float, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    unique = np.repeat([2e5, 4e5, 8e5, 1.6e6], 5)
    epochs = np.tile([1, 2, 4, 8, 16], 4)
    tokens = unique * epochs
    loss = 1.8 + 40.0 / effective_data(unique, tokens, r_star) ** 0.3
    return unique, tokens, loss * np.exp(rng.normal(0.0, noise, loss.size))


@pytest.mark.parametrize("r_star", [3.0, 15.4])
def test_a_planted_r_star_is_recovered_within_its_interval(r_star):
    unique, tokens, loss = planted_study(r_star, noise=0.002)
    boot = bootstrap_repetition(unique, tokens, loss, n_boot=40, seed=1)
    lo, hi = boot.interval("R_star")
    print(f"planted R* {r_star}: fitted {boot.fit.R_star:.2f} [{lo:.2f}, {hi:.2f}], E {boot.fit.E:.3f}, beta {boot.fit.beta:.3f}")
    assert lo <= r_star <= hi
    assert boot.fit.R_star == pytest.approx(r_star, rel=0.35)
    assert not boot.fit.r_star_at_bound


def test_the_fit_reproduces_noise_free_data():
    unique, tokens, loss = planted_study(6.0, noise=0.0)
    fit = fit_repetition(unique, tokens, loss)
    assert fit.R_star == pytest.approx(6.0, rel=0.02) and fit.beta == pytest.approx(0.3, rel=0.02)
    np.testing.assert_allclose(fit.predict(unique, tokens), loss, rtol=1e-4)


def test_repetition_stops_paying_after_r_star_ln10_more_epochs():
    assert epochs_until_worthless(15.4) == pytest.approx(1 + 15.4 * np.log(10))


def test_a_study_without_repeated_data_cannot_fit_r_star():
    with pytest.raises(UserError, match="no run repeats its data"):
        fit_repetition([1e5, 2e5, 4e5, 8e5, 1.6e6], [1e5, 2e5, 4e5, 8e5, 1.6e6], [3.0, 2.8, 2.6, 2.5, 2.4])


def test_the_sweet_spot_is_where_the_fitted_curve_comes_within_one_percent_of_the_best_loss():
    tokens = np.array([1e4, 3e4, 1e5, 3e5, 1e6, 3e6])
    loss = 2.0 + 30.0 / tokens**0.4
    spot = sweet_spot(tokens, loss, within=0.01, n_boot=50)
    expected = (30.0 / (1.01 * loss.min() - 2.0)) ** (1 / 0.4)
    assert spot["tokens"] == pytest.approx(expected, rel=0.02)
    assert spot["lo"] <= spot["tokens"] <= spot["hi"] and spot["tokens"] < tokens.max()
