"""Statistics for pairwise judgements: Wilson intervals, Bradley-Terry with bootstrap, agreement.

All hand-written on numpy, each a dozen lines: the Bradley-Terry packages (choix and the like) take
neither half-win ties nor a batch of bootstrap resamples, and a dependency for Krippendorff's alpha
or Cohen's kappa would be larger than the formula. Each is tested against published examples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

Z95 = 1.959963984540054  # standard normal quantile at 0.975


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (Wilson, 1927).

    `successes` may be fractional (ties counted as half wins); the interval then treats the
    proportion as binomial, which is conservative because a half win varies less than a Bernoulli.
    """
    assert n > 0 and 0 <= successes <= n, (successes, n)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _best_shift(log_strength: np.ndarray, newton_steps: int = 8) -> np.ndarray:
    """c (..., 1) maximising the anchor's virtual ties, sum_i log sigma(s_i + c) + log sigma(-s_i - c),
    i.e. mean_i sigma(s_i + c) = 1/2. The likelihood of the real votes does not depend on c."""
    shift = np.zeros(log_strength.shape[:-1] + (1,))
    for _ in range(newton_steps):
        sig = 1.0 / (1.0 + np.exp(-(log_strength + shift)))
        step = (0.5 - sig).sum(-1, keepdims=True) / (sig * (1 - sig)).sum(-1, keepdims=True)
        shift = shift + np.clip(step, -1.0, 1.0)
    return shift


def bradley_terry(wins: np.ndarray, prior: float = 1.0, tol: float = 1e-10, max_iter: int = 20_000) -> np.ndarray:
    """Bradley-Terry log-strengths s (mean 0 over systems), P(i beats j) = 1 / (1 + exp(s_j - s_i)).

    wins: (..., k, k), wins[..., i, j] = how often i beat j, a tie counting half to each side; leading
    dimensions are independent problems (bootstrap resamples), solved together. Maximum likelihood by
    Hunter's (2004) MM iteration. `prior` adds that many virtual ties of every system against a fixed
    unit-strength anchor, so the estimate exists even when a system never wins or the comparison
    graph is disconnected, and shrinks lightly towards 0; prior=0 is the plain MLE, which needs every
    system to win and lose at least once (in a connected graph).
    """
    w = np.asarray(wins, dtype=np.float64)
    assert w.shape[-1] == w.shape[-2] and (w >= 0).all(), w.shape
    games = w + np.swapaxes(w, -1, -2)  # (..., k, k) comparisons between i and j
    total_wins = w.sum(-1) + prior / 2  # (..., k)
    strength = np.ones(w.shape[:-1])
    for _ in range(max_iter):
        pair_sums = strength[..., :, None] + strength[..., None, :]
        denom = (games / pair_sums).sum(-1) + prior / (strength + 1.0)
        new = total_wins / denom
        if prior == 0:  # no anchor: fix the scale by the geometric mean
            new = new / np.exp(np.log(new).mean(-1, keepdims=True))
        else:  # MM alone moves the common scale towards the anchor very slowly: optimise it directly
            new = new * np.exp(_best_shift(np.log(new)))
        converged = np.max(np.abs(np.log(new) - np.log(strength))) < tol
        strength = new
        if converged:
            break
    log_strength = np.log(strength)
    return log_strength - log_strength.mean(-1, keepdims=True)


def wins_matrix(first: np.ndarray, second: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """(k, k) wins from comparisons first[v] vs second[v] in which first scored score[v] (1, 0.5 or 0)."""
    wins = np.zeros((k, k))
    np.add.at(wins, (first, second), score)
    np.add.at(wins, (second, first), 1.0 - score)
    return wins


def bootstrap_bradley_terry(
    first: Sequence[int], second: Sequence[int], score: Sequence[float], k: int, n_boot: int, seed: int, prior: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Bradley-Terry scores of k systems and their bootstrap resamples over votes.

    Vote v compared systems first[v] and second[v], first scoring score[v] (1 win, 0.5 tie, 0 loss).
    Resampling the n votes with replacement is a multinomial draw over the distinct
    (first, second, score) votes, which is how it is done here. Returns (scores (k,), resampled
    scores (n_boot, k)); the 2.5 and 97.5 percentiles of the latter give the 95% interval.
    """
    votes = np.column_stack([first, second, score]).astype(np.float64)  # (n, 3)
    assert len(votes) > 0 and n_boot > 0, (len(votes), n_boot)
    cells, counts = np.unique(votes, axis=0, return_counts=True)  # distinct votes, (n_cells, 3)
    i, j, s = cells[:, 0].astype(int), cells[:, 1].astype(int), cells[:, 2]
    cell_wins = np.zeros((len(cells), k, k))
    cell_wins[np.arange(len(cells)), i, j] = s
    cell_wins[np.arange(len(cells)), j, i] = 1.0 - s
    scores = bradley_terry(wins_matrix(np.asarray(first), np.asarray(second), np.asarray(score, float), k), prior=prior)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(votes), counts / counts.sum(), size=n_boot)  # (n_boot, n_cells)
    resampled = bradley_terry((draws @ cell_wins.reshape(len(cells), k * k)).reshape(n_boot, k, k), prior=prior)
    return scores, resampled


def krippendorff_alpha_nominal(units: Iterable[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha for nominal data (Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011).

    units: per unit, the values the coders gave it (missing values left out); units with fewer than
    two values are not pairable and drop out. None when undefined (no pairable values, or only one
    value ever used, so that no disagreement is expected).
    """
    coincidences: Counter = Counter()  # (c, k) -> o_ck
    for unit in units:
        m = len(unit)
        if m < 2:
            continue
        counts = Counter(unit)
        for c, n_c in counts.items():
            for k, n_k in counts.items():
                coincidences[c, k] += n_c * (n_k - (c == k)) / (m - 1)
    marginals: Counter = Counter()  # n_c
    for (c, _), o in coincidences.items():
        marginals[c] += o
    n = sum(marginals.values())
    if n <= 1:
        return None
    observed = sum(o for (c, k), o in coincidences.items() if c != k)  # n * D_o
    expected = (n * n - sum(v * v for v in marginals.values())) / (n - 1)  # n * D_e
    return None if expected == 0 else 1.0 - observed / expected


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Cohen's (1960) kappa of two raters' labels on the same units; None when chance agreement is 1."""
    assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    counts_a, counts_b = Counter(a), Counter(b)
    chance = sum(counts_a[c] * counts_b[c] for c in counts_a) / (n * n)
    return None if chance == 1 else (observed - chance) / (1 - chance)
