"""What repeated data is worth: the data-constrained scaling law and the data "sweet spot".

Muennighoff et al. (2023), "Scaling Data-Constrained Language Models", eq. 5: training on D tokens
drawn from U unique ones, i.e. R = D/U - 1 repetitions beyond the first epoch, is worth

    D' = U + U R* (1 - exp(-R / R*))

fresh tokens: the k-th repetition is worth exp(-k/R*) of new data, and no amount of repetition is
worth more than U (1 + R*). Their fit over 400+ runs gave R* = 15.4 for data. Here the law is fitted
per model size (N fixed, so the parameter term is a constant absorbed in E):

    L(U, D) = E + B / D'^beta,

with the Chinchilla procedure of smallscale.study.scaling (Huber, delta 1e-3, on log residuals;
L-BFGS-B from the best points of a grid; log R* bounded to [log 0.1, log 1e4]) and percentile
bootstrap intervals over runs. R* is identified only by runs that repeat data (R > 0) at more than
one U; a fit whose R* sits at a bound says so (`r_star_at_bound`).

"Repetition stops paying" after 1 + R* ln(1/worth) epochs: the epoch at which one more epoch is
worth less than `worth` (default 10%) of an epoch of fresh data.

The sweet spot of a model size is the smallest data budget whose loss is within 1% (or 5%) of the
best loss the study reached for that size: from the fitted L(D) = E + B/D^beta of its single-epoch
runs, D_p = (B / ((1 + p) L_best - E))^(1/beta), with a bootstrap interval; infinite where the
fitted floor E is already above (1 + p) L_best.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

from smallscale.errors import UserError
from smallscale.study.scaling import bootstrap_power_law

_R_BOUNDS = (np.log(0.1), np.log(1e4))  # log R*
_STARTS = 12
_OPTIONS = {"maxiter": 3000, "ftol": 1e-13, "gtol": 1e-9}
_BOOT_OPTIONS = {"maxiter": 500, "ftol": 1e-10, "gtol": 1e-6}  # R* to ~1e-4 relative, far below its spread


def effective_data(unique: ArrayLike, tokens: ArrayLike, r_star: float | np.ndarray) -> np.ndarray:
    """D' = U + U R* (1 - exp(-R/R*)) with R = max(D/U - 1, 0) (Muennighoff et al. eq. 5)."""
    unique, tokens = np.asarray(unique, dtype=float), np.asarray(tokens, dtype=float)
    repeats = np.maximum(tokens / unique - 1.0, 0.0)
    return unique + unique * r_star * -np.expm1(-repeats / r_star)


def epochs_until_worthless(r_star: float, worth: float = 0.1) -> float:
    """The epoch count after which one more epoch is worth less than `worth` of fresh data."""
    return 1.0 + r_star * np.log(1.0 / worth)


@dataclass
class RepetitionFit:
    E: float
    B: float
    beta: float
    R_star: float
    loss: float  # sum of Huber(delta) of the log residuals
    r_star_at_bound: bool

    def predict(self, unique: ArrayLike, tokens: ArrayLike) -> np.ndarray:
        return self.E + self.B / effective_data(unique, tokens, self.R_star) ** self.beta


def _huber_sum(theta, log_u, repeats, logy, delta) -> tuple[float, np.ndarray]:
    """Sum of Huber_delta(log L_pred - log L) / delta and its gradient, for theta = [e, b, beta, r]
    (E = e^e, B = e^b, R* = e^r; log L_pred = logaddexp(e, b - beta log D'))."""
    e, b, beta, r = theta
    r_star = np.exp(r)
    q = np.exp(-repeats / r_star)
    g = r_star * (1.0 - q)  # D' = U (1 + g)
    log_d = log_u + np.log1p(g)
    t2 = b - beta * log_d
    pred = np.logaddexp(e, t2)
    w1, w2 = np.exp(e - pred), np.exp(t2 - pred)  # d pred / d e, d pred / d b
    dlogd_dr = (r_star * (1.0 - q) - repeats * q) / (1.0 + g)
    resid = pred - logy
    absr = np.abs(resid)
    value = np.where(absr <= delta, 0.5 * resid**2, delta * (absr - 0.5 * delta)).sum() / delta
    c = np.clip(resid, -delta, delta) / delta
    grad = np.array([(c * w1).sum(), (c * w2).sum(), -(c * w2 * log_d).sum(), -(c * w2 * beta * dlogd_dr).sum()])
    return float(value), grad


def _fit(log_u, repeats, logy, delta, starts, options=_OPTIONS) -> tuple[float, np.ndarray]:
    bounds = [(None, None), (None, None), (0.0, 3.0), _R_BOUNDS]
    best = None
    for x0 in starts:
        res = minimize(_huber_sum, x0, (log_u, repeats, logy, delta), "L-BFGS-B", jac=True, bounds=bounds, options=options)
        if np.isfinite(res.fun) and (best is None or res.fun < best[0]):
            best = (float(res.fun), res.x)
    assert best is not None, "every start diverged"
    return best[0] * delta, best[1]


def _grid_starts(log_u, repeats, logy, delta) -> np.ndarray:
    """The `_STARTS` best points of a grid over (e, b, beta, r)."""
    axes = [np.linspace(-1.0, 1.5, 6), np.arange(0.0, 30.0, 5.0), np.array([0.1, 0.25, 0.5, 1.0]), np.log([1, 3, 10, 30, 100, 1000])]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 4)
    values = np.array([_huber_sum(t, log_u, repeats, logy, delta)[0] for t in grid])
    return grid[np.argsort(values, kind="stable")[:_STARTS]]


def _prepare(unique: ArrayLike, tokens: ArrayLike, loss: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, d, y = (np.asarray(a, dtype=float).ravel() for a in (unique, tokens, loss))
    if not (u.size == d.size == y.size):
        raise UserError(f"unique tokens, tokens and losses need equal lengths, got {u.size}, {d.size}, {y.size}")
    if u.size < 5:
        raise UserError(f"a data-constrained fit needs at least 5 runs, got {u.size}")
    if not (np.all(u > 0) and np.all(d > 0) and np.all(y > 0) and np.all(np.isfinite(np.concatenate([u, d, y])))):
        raise UserError("unique tokens, tokens and losses must be positive and finite")
    repeats = np.maximum(d / u - 1.0, 0.0)
    if not np.any(repeats > 0.01):
        raise UserError("no run repeats its data (tokens > unique tokens): R* cannot be fitted")
    return np.log(u), repeats, np.log(y)


def fit_repetition(unique: ArrayLike, tokens: ArrayLike, loss: ArrayLike, *, delta: float = 1e-3) -> RepetitionFit:
    """Fit L = E + B / D'^beta with D' the effective data of `unique` tokens trained for `tokens`."""
    log_u, repeats, logy = _prepare(unique, tokens, loss)
    value, theta = _fit(log_u, repeats, logy, delta, _grid_starts(log_u, repeats, logy, delta))
    return _as_fit(theta, value)


def _as_fit(theta: np.ndarray, value: float) -> RepetitionFit:
    e, b, beta, r = (float(t) for t in theta)
    at_bound = min(abs(r - _R_BOUNDS[0]), abs(r - _R_BOUNDS[1])) < 1e-3
    return RepetitionFit(E=float(np.exp(e)), B=float(np.exp(b)), beta=beta, R_star=float(np.exp(r)), loss=value,
                         r_star_at_bound=at_bound)  # fmt: skip


@dataclass
class RepetitionBootstrap:
    fit: RepetitionFit
    samples: dict[str, np.ndarray]  # E, B, beta, R_star over the resamples
    level: float

    def interval(self, name: str) -> tuple[float, float]:
        lo, hi = np.quantile(self.samples[name], [(1 - self.level) / 2, (1 + self.level) / 2])
        return float(lo), float(hi)


def bootstrap_repetition(
    unique: ArrayLike, tokens: ArrayLike, loss: ArrayLike, *, n_boot: int = 200, level: float = 0.95, seed: int = 0,
    delta: float = 1e-3,
) -> RepetitionBootstrap:  # fmt: skip
    """The full-data fit and percentile intervals from resampling runs with replacement (each
    resample starts from the full-data optimum and the grid's best points)."""
    if n_boot < 1 or not 0 < level < 1:
        raise UserError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    log_u, repeats, logy = _prepare(unique, tokens, loss)
    starts = _grid_starts(log_u, repeats, logy, delta)
    value, theta = _fit(log_u, repeats, logy, delta, starts)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_boot):
        idx = rng.integers(0, logy.size, size=logy.size)
        if not np.any(repeats[idx] > 0.01):  # a resample without repetition says nothing about R*
            continue
        rows.append(_as_fit(_fit(log_u[idx], repeats[idx], logy[idx], delta, [theta], _BOOT_OPTIONS)[1], 0.0))
    names = ("E", "B", "beta", "R_star")
    samples = {n: np.array([getattr(r, n) for r in rows]) for n in names}
    return RepetitionBootstrap(_as_fit(theta, value), samples, level)


def sweet_spot(
    tokens: ArrayLike, loss: ArrayLike, within: float = 0.01, *, n_boot: int = 200, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """The smallest data budget whose fitted loss is within `within` of the best observed loss
    (single-epoch runs of one model size): estimate and percentile interval (module docstring)."""
    d, y = np.asarray(tokens, dtype=float), np.asarray(loss, dtype=float)
    if d.size < 3:
        raise UserError(f"a sweet spot needs at least 3 data budgets, got {d.size}")
    target = (1.0 + within) * float(y.min())
    boot = bootstrap_power_law(d, y, n_boot=n_boot, level=level, seed=seed)

    def budget(E, A, alpha):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            gap = target - np.asarray(E)
            return np.where(gap > 0, (np.asarray(A) / gap) ** (1.0 / np.asarray(alpha)), np.inf)

    estimate = float(budget(boot.estimate["E"], boot.estimate["A"], boot.estimate["alpha"]))
    spread = budget(boot.samples["E"], boot.samples["A"], boot.samples["alpha"])
    lo, hi = np.quantile(spread, [(1 - level) / 2, (1 + level) / 2])
    return {"within": within, "target_loss": target, "tokens": estimate, "lo": float(lo), "hi": float(hi),
            "best_observed_tokens": float(d[int(np.argmin(y))])}  # fmt: skip
