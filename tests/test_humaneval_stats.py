"""Human-eval statistics against known answers: published examples, scipy, sklearn, simulated votes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

from smallscale.humaneval.stats import (
    bootstrap_bradley_terry,
    bradley_terry,
    cohen_kappa,
    krippendorff_alpha_nominal,
    wilson_interval,
    wins_matrix,
)


def columns(*coders: list) -> list[list]:
    """Reliability data (one row per coder, None = missing) -> per unit, the values given."""
    return [[v for v in unit if v is not None] for unit in zip(*coders, strict=True)]


def test_krippendorff_alpha_nominal_matches_the_published_four_coder_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers,
    # 12 units, values 1-5 with missing data; nominal alpha = 0.743.
    n = None
    a = [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n]
    b = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3]
    c = [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n]
    d = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]
    assert round(krippendorff_alpha_nominal(columns(a, b, c, d)), 3) == 0.743


def test_krippendorff_alpha_nominal_matches_the_published_binary_example():
    # Krippendorff (2011), section A: two observers, ten units, binary values; alpha = 0.095.
    a = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    b = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert round(krippendorff_alpha_nominal(columns(a, b)), 3) == 0.095


def test_krippendorff_alpha_is_one_for_perfect_agreement_and_undefined_without_variation():
    assert krippendorff_alpha_nominal([["x", "x"], ["y", "y", "y"], ["z"]]) == 1.0
    assert krippendorff_alpha_nominal([["x", "x"], ["x", "x"]]) is None  # no disagreement expected
    assert krippendorff_alpha_nominal([["x"], ["y"]]) is None  # nothing pairable


def test_cohen_kappa_matches_the_textbook_example():
    # Two raters, 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o = 0.7, p_e = 0.5, kappa = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_cohen_kappa_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = ["first", "second", "tie", "both bad"]
    a = rng.choice(labels, size=40, p=[0.4, 0.3, 0.2, 0.1])
    b = np.where(rng.random(40) < 0.6, a, rng.choice(labels, size=40))  # agree 60% of the time, else random
    assert cohen_kappa(list(a), list(b)) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def test_cohen_kappa_is_undefined_when_chance_agreement_is_certain():
    assert cohen_kappa(["tie"] * 5, ["tie"] * 5) is None


@pytest.mark.parametrize("successes,n", [(8, 10), (0, 7), (7, 7), (33, 100), (1, 2)])
def test_wilson_interval_matches_scipy(successes, n):
    expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


def simulate_votes(strengths: np.ndarray, n_votes: int, seed: int, tie_prob: float = 0.0):
    """Uniformly random pairs; i beats j with probability p_i / (p_i + p_j); some votes are ties."""
    rng = np.random.default_rng(seed)
    k = len(strengths)
    first = rng.integers(0, k, n_votes)
    second = (first + rng.integers(1, k, n_votes)) % k  # a different system, uniformly
    first_wins = rng.random(n_votes) < strengths[first] / (strengths[first] + strengths[second])
    score = np.where(rng.random(n_votes) < tie_prob, 0.5, first_wins.astype(float))
    return first, second, score


def test_bradley_terry_recovers_known_strengths_and_ratios():
    strengths = np.array([1.0, 2.0, 4.0, 8.0])
    first, second, score = simulate_votes(strengths, n_votes=8000, seed=0)
    scores = bradley_terry(wins_matrix(first, second, score, 4), prior=0)
    assert list(np.argsort(scores)) == [0, 1, 2, 3]
    ratios = np.exp(scores[1:] - scores[:-1])  # true: 2, 2, 2
    assert ratios == pytest.approx([2.0, 2.0, 2.0], rel=0.12)
    assert np.exp(scores[3] - scores[0]) == pytest.approx(8.0, rel=0.15)


def test_bradley_terry_keeps_the_order_when_ties_count_half():
    strengths = np.array([1.0, 1.5, 3.0, 6.0, 12.0])
    first, second, score = simulate_votes(strengths, n_votes=8000, seed=1, tie_prob=0.25)
    scores = bradley_terry(wins_matrix(first, second, score, 5))
    assert list(np.argsort(scores)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("prior", [0.0, 1.0])
def test_bradley_terry_is_the_maximum_likelihood_estimate(prior):
    first, second, score = simulate_votes(np.array([1.0, 3.0, 2.0]), n_votes=300, seed=2, tie_prob=0.2)
    wins = wins_matrix(first, second, score, 3)

    def neg_log_posterior(s):  # ties with a unit-strength anchor (s = 0): prior/2 wins and losses each
        diff = s[:, None] - s[None, :]
        anchor = prior / 2 * (np.logaddexp(0, -s) + np.logaddexp(0, s)).sum()
        return (wins * np.logaddexp(0, -diff)).sum() + anchor

    start = np.zeros(3)
    if prior == 0:  # only differences are identified: pin s_0 = 0
        fit = minimize(lambda free: neg_log_posterior(np.concatenate([[0.0], free])), start[1:], method="BFGS", options={"gtol": 1e-10})
        expected = np.concatenate([[0.0], fit.x])
    else:
        expected = minimize(neg_log_posterior, start, method="BFGS", options={"gtol": 1e-10}).x
    assert bradley_terry(wins, prior=prior) == pytest.approx(expected - expected.mean(), abs=1e-5)


def test_bradley_terry_prior_keeps_a_system_that_never_wins_finite():
    wins = np.array([[0, 0, 0], [5, 0, 2], [5, 3, 0]], dtype=float)  # system 0 lost all ten
    scores = bradley_terry(wins, prior=1.0)
    assert np.isfinite(scores).all() and scores[0] < scores[1] < scores[2]
    assert scores.mean() == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_interval_covers_the_truth_and_narrows_with_more_votes():
    strengths = np.array([1.0, 2.0, 4.0])
    truth = np.log(strengths) - np.log(strengths).mean()
    widths = []
    for n_votes in (300, 3000):
        first, second, score = simulate_votes(strengths, n_votes, seed=3)
        scores, resampled = bootstrap_bradley_terry(first, second, score, 3, n_boot=400, seed=0, prior=0.5)
        low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
        assert ((low <= truth) & (truth <= high)).all(), (low, truth, high)
        assert ((low <= scores) & (scores <= high)).all()
        widths.append(high - low)
    assert (widths[1] < 0.5 * widths[0]).all()  # ~ 1/sqrt(10) of the width


def test_bootstrap_is_reproducible_with_a_seed():
    first, second, score = simulate_votes(np.array([1.0, 2.0]), 50, seed=4)
    _, one = bootstrap_bradley_terry(first, second, score, 2, n_boot=50, seed=7)
    _, two = bootstrap_bradley_terry(first, second, score, 2, n_boot=50, seed=7)
    np.testing.assert_array_equal(one, two)
