"""Scaling-law fits with bootstrap intervals: L(N, D) = E + A/N^alpha + B/D^beta and L(x) = E + A/x^alpha.

Hand-written on numpy + scipy.optimize, not taken from a fitting library: the fitting procedure
*is* the research result (Besiroglu et al. 2024 could not reproduce Hoffmann et al.'s parameters
from the procedure the paper describes), so every choice must be visible and tested against
published numbers (tests/test_scaling.py).

Method (Hoffmann et al. 2022, App. D.2; Besiroglu et al. 2024): A = exp(a), B = exp(b), E = exp(e)
and the predicted log-loss is LSE(a - alpha log N, b - beta log D, e), so every term stays
positive. The objective is the *sum* over points (as in Besiroglu et al.'s code; a mean has the
same minimiser) of Huber_delta(log L_pred - log L), delta = 1e-3, minimised by L-BFGS-B with an
analytic gradient from the best `_N_STARTS` points of Hoffmann's grid (alpha, beta in {0, 0.5,
..., 2}; e in {-1, -0.5, ..., 1}; a, b in {0, 5, ..., 25}), all evaluated at once. A power law in
one variable is the same model with one term (and no e when `irreducible=False`).

Units: N in parameters, D in tokens, C in FLOP with C = 6 N D; losses in any positive unit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize, minimize_scalar
from scipy.special import huber, logsumexp

from smallscale.errors import UserError

_COEF_GRID = np.arange(0.0, 30.0, 5.0)  # a, b: log-coefficients
_EXP_GRID = np.arange(0.0, 2.5, 0.5)  # alpha, beta
_E_GRID = np.arange(-1.0, 1.5, 0.5)  # e = log E
_N_STARTS = 20  # best grid points optimised by a full fit
_N_EXTRA_OPTIMA = 2  # other distinct full-data optima tried on each bootstrap resample
_OPTIONS = {"maxiter": 5000, "ftol": 1e-14, "gtol": 1e-10}  # tight: the fitted-scale fit is nearly L1
_BOOT_OPTIONS = {"maxiter": 5000, "ftol": 1e-11, "gtol": 1e-7}  # params to ~1e-5, far below the spread
_MAX_SCALE_STEPS = 20  # alternations of the fitted-scale estimator (2-3 on the Chinchilla data)
_COMPUTE_DECADES = 10.0 ** np.arange(18, 25)  # C = 1e18 ... 1e24 FLOP, for `fit_table`

# ---------------------------------------------------------------- the objective (log space)
# feats is (n, m): log N (and log D), then a zero column when there is an irreducible term, so
# e = log E is a coefficient whose exponent is pinned to 0.
# theta = [coefficients (m), exponents (k)], e.g. [a, b, e, alpha, beta] (Besiroglu et al.'s order).


def _terms(theta: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Log of each additive term of the law, (..., n, m) for theta of shape (..., P)."""
    m = feats.shape[-1]
    exps = theta[..., m:]
    exps = np.concatenate([exps, np.zeros(exps.shape[:-1] + (2 * m - theta.shape[-1],))], axis=-1)
    return theta[..., None, :m] - exps[..., None, :] * feats


def _objective(theta: np.ndarray, feats: np.ndarray, logy: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber_delta(log L_pred - log L) / delta, and its gradient with respect to theta.

    Dividing by delta keeps the value near sum |residual| whatever delta is; unscaled it is ~1e-3
    and L-BFGS-B's absolute tolerances stop early. LSE and Huber are hand-rolled because scipy's
    cost 4x more per call, which was most of a bootstrap's time."""
    k = theta.size - feats.shape[1]
    terms = _terms(theta, feats)  # (n, m)
    top = terms.max(axis=1)
    expd = np.exp(terms - top[:, None])
    total = expd.sum(axis=1)
    resid = top + np.log(total) - logy  # (n,) predicted minus observed log-loss
    absr = np.abs(resid)
    value = np.where(absr <= delta, 0.5 * resid**2 / delta, absr - 0.5 * delta).sum()
    w = expd * (np.clip(resid, -delta, delta) / (delta * total))[:, None]  # d value / d term
    return float(value), np.concatenate([w.sum(axis=0), -(w[:, :k] * feats[:, :k]).sum(axis=0)])


def _best_starts(feats: np.ndarray, logy: np.ndarray, delta: float, k: int) -> np.ndarray:
    """The `_N_STARTS` grid points of lowest objective, evaluating the whole grid at once."""
    axes = [_COEF_GRID] * k + ([_E_GRID] if feats.shape[1] > k else []) + [_EXP_GRID] * k
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))  # (G, P)
    values = huber(delta, logsumexp(_terms(grid, feats), axis=-1) - logy).sum(axis=-1)  # (G,)
    return grid[np.argsort(values, kind="stable")[:_N_STARTS]]


def _optima(starts, feats, logy, delta, options=_OPTIONS) -> list[tuple[float, np.ndarray]]:
    """(sum of Huber, theta) from L-BFGS-B at each start, best first.

    The optimiser sees centred features, log x - mean: with log N ~ 20 +- 2, a and alpha are
    otherwise nearly collinear and L-BFGS-B stalls (the fitted-scale fit of the Chinchilla data
    stopped with B 3% off). Centring is the reparametrisation a' = a - alpha * mean, undone on return."""
    m, k = feats.shape[1], starts.shape[1] - feats.shape[1]
    mean = np.concatenate([feats[:, :k].mean(axis=0), np.zeros(m - k)])

    def shift(theta: np.ndarray, sign: float) -> np.ndarray:
        return np.concatenate([theta[:m] + sign * np.pad(theta[m:], (0, m - k)) * mean, theta[m:]])

    found = []
    for x0 in starts:
        res = minimize(_objective, shift(x0, -1.0), (feats - mean, logy, delta), "L-BFGS-B", jac=True, options=options)
        if np.isfinite(res.fun):
            found.append((float(res.fun) * delta, shift(res.x, 1.0)))
    assert found, "every start diverged"
    return sorted(found, key=lambda pair: pair[0])


def _huber_scale(resid: np.ndarray, delta: float) -> float:
    """Maximum-likelihood scale s of a Huber density for these residuals:
    argmin_s sum Huber_delta(resid / s) + n log s (the normalising constant is free of s)."""
    nll = lambda log_s: huber(delta, resid / np.exp(log_s)).sum() + resid.size * log_s  # noqa: E731
    return float(np.exp(minimize_scalar(nll, bounds=(-50.0, 5.0), method="bounded", options={"xatol": 1e-9}).x))


def _fit_fitted_scale(starts, feats, logy, delta) -> tuple[float, np.ndarray]:
    """Jointly fit theta and the scale s of Huber_delta(resid / s) by alternating the s-step with a
    theta-step, which is a fixed-scale fit at threshold delta * s (coordinate descent on the
    likelihood, so it never goes uphill)."""
    loss, theta = _optima(starts, feats, logy, delta)[0]
    for _ in range(_MAX_SCALE_STEPS):
        resid = logsumexp(_terms(theta, feats), axis=1) - logy
        threshold = delta * _huber_scale(resid, delta)
        loss, new = _optima(np.vstack([theta, starts[:_N_EXTRA_OPTIMA]]), feats, logy, threshold)[0]
        if np.allclose(new, theta, rtol=1e-9, atol=1e-12):
            break
        theta = new
    return loss, new


def _prepare(columns: list[ArrayLike], names: list[str], irreducible: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate (x..., y); return feats (n, m) and log y (n,)."""
    arrays = [np.asarray(c, dtype=float).ravel() for c in columns]
    if len({a.size for a in arrays}) != 1:
        raise UserError(f"{', '.join(names)} must have the same length, got {[a.size for a in arrays]}.")
    for name, a in zip(names, arrays):
        if not np.all(np.isfinite(a) & (a > 0)):
            raise UserError(f"{name} must be finite and positive; found {float(a[~(np.isfinite(a) & (a > 0))][0])}.")
    n_params = 2 * (len(arrays) - 1) + irreducible
    if arrays[0].size < n_params:
        raise UserError(f"A fit with {n_params} parameters needs at least {n_params} points, got {arrays[0].size}.")
    logx = np.log(np.column_stack(arrays[:-1]))
    return (np.column_stack([logx, np.zeros(len(logx))]) if irreducible else logx), np.log(arrays[-1])


# ---------------------------------------------------------------- fits


@dataclass(frozen=True)
class PowerLawFit:
    """L(x) = E + A / x**alpha; `loss` is the final objective (sum of Huber on log residuals)."""

    E: float
    A: float
    alpha: float
    loss: float

    def predict(self, x: ArrayLike) -> np.ndarray:
        return self.E + self.A / np.asarray(x, dtype=float) ** self.alpha

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N**alpha + B / D**beta; `loss` is the final objective."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    loss: float

    def predict(self, N: ArrayLike, D: ArrayLike) -> np.ndarray:
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def compute_optimal(self, C: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """N*(C), D*(C) minimising predict(N, D) subject to 6 N D = C (C in FLOP)."""
        return _compute_optimal(np.asarray(C, dtype=float), self.A, self.B, self.alpha, self.beta)

    def tokens_per_param(self, C: ArrayLike) -> np.ndarray:
        n_opt, d_opt = self.compute_optimal(C)
        return d_opt / n_opt

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _compute_optimal(C, A, B, alpha, beta) -> tuple[np.ndarray, np.ndarray]:
    """Closed form (Hoffmann et al. eq. 4): G = (alpha A / (beta B))^(1/(alpha+beta)),
    N* = G (C/6)^(beta/(alpha+beta)), D* = C / (6 N*). Broadcasts over parameters and C."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # degenerate bootstrap fits give inf/0
        G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
        n_opt = G * (C / 6.0) ** (beta / (alpha + beta))
        return n_opt, C / (6.0 * n_opt)


def _power_law_params(theta: np.ndarray) -> dict[str, float]:
    """[a, e, alpha] or [a, alpha] -> E, A, alpha."""
    E = float(np.exp(theta[1])) if theta.size == 3 else 0.0
    return {"E": E, "A": float(np.exp(theta[0])), "alpha": float(theta[-1])}


def _chinchilla_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(t) for t in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def fit_power_law(x: ArrayLike, y: ArrayLike, *, irreducible: bool = True, delta: float = 1e-3) -> PowerLawFit:
    """Fit L(x) = E + A / x**alpha (E = 0 when irreducible=False) by the Chinchilla procedure."""
    feats, logy = _prepare([x, y], ["x", "y"], irreducible)
    loss, theta = _optima(_best_starts(feats, logy, delta, 1), feats, logy, delta)[0]
    return PowerLawFit(**_power_law_params(theta), loss=loss)


def fit_chinchilla(
    N: ArrayLike, D: ArrayLike, L: ArrayLike, *,
    delta: float = 1e-3, inits: str = "hoffmann", scale: Literal["fixed", "fitted"] = "fixed",
) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta as in Hoffmann et al. (2022) App. D.2 (module doc).

    scale="fixed" minimises sum Huber_delta(resid), the procedure both papers describe.
    scale="fitted" maximises the likelihood of a Huber density with a free scale s,
    sum Huber_delta(resid / s) + n log s, which is what Besiroglu et al.'s code ran for their
    published estimates. s comes out ~ delta * mean|resid| ~ 5e-6, so the effective threshold
    delta * s ~ 5e-9 makes it a least-absolute-deviation fit; `loss` is the Huber sum there."""
    if inits != "hoffmann":
        raise UserError(f"Unknown initialisation grid {inits!r}; the only one is 'hoffmann'.")
    if scale not in ("fixed", "fitted"):
        raise UserError(f"Unknown scale {scale!r}; use 'fixed' or 'fitted'.")
    feats, logy = _prepare([N, D, L], ["N", "D", "L"], True)
    starts = _best_starts(feats, logy, delta, 2)
    if scale == "fixed":
        loss, theta = _optima(starts, feats, logy, delta)[0]
    else:
        loss, theta = _fit_fitted_scale(starts, feats, logy, delta)
    return ChinchillaFit(**_chinchilla_params(theta), loss=loss)


# ---------------------------------------------------------------- bootstrap


@dataclass
class Bootstrap:
    """Full-data estimates and, per parameter, its estimates on each of the resamples."""

    estimate: dict[str, float]
    samples: dict[str, np.ndarray]
    level: float

    def interval(self, name: str) -> tuple[float, float]:
        """Percentile interval: the (1-level)/2 and (1+level)/2 quantiles of the resampled estimates."""
        lo, hi = np.quantile(self.samples[name], [(1 - self.level) / 2, (1 + self.level) / 2])
        return float(lo), float(hi)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: dict(zip(("estimate", "lo", "hi"), (v, *self.interval(k)))) for k, v in self.estimate.items()}


def _bootstrap(feats, logy, delta, k, n_boot, level, seed, to_params) -> Bootstrap:
    """Resample points with replacement. Each resample is fitted from the full-data optimum and up
    to `_N_EXTRA_OPTIMA` other distinct, competitive (objective within 2x) local optima of the
    full-data grid search: warm starts that cover the basins that matter, 4-5x cheaper per start
    than grid points. Optima on far plateaus (a term switched off) are not worth a start."""
    if not 0 < level < 1:
        raise UserError(f"Interval level must be between 0 and 1 (e.g. 0.95), got {level}.")
    if n_boot < 1:
        raise UserError(f"The bootstrap needs at least one resample, got n_boot={n_boot}.")
    optima = _optima(_best_starts(feats, logy, delta, k), feats, logy, delta)
    best_loss, best = optima[0]
    starts = [best]
    for loss, theta in optima[1:]:
        distinct = all(np.abs(theta - s).max() > 1e-3 for s in starts)
        if len(starts) <= _N_EXTRA_OPTIMA and loss <= 2 * best_loss and distinct:
            starts.append(theta)
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_boot):
        idx = rng.integers(0, logy.size, size=logy.size)
        rows.append(to_params(_optima(np.array(starts), feats[idx], logy[idx], delta, _BOOT_OPTIONS)[0][1]))
    estimate = to_params(best)
    return Bootstrap(estimate, {name: np.array([r[name] for r in rows]) for name in estimate}, level)


def bootstrap_chinchilla(
    N: ArrayLike, D: ArrayLike, L: ArrayLike, *, n_boot: int = 200, level: float = 0.95, seed: int = 0, delta: float = 1e-3
) -> Bootstrap:
    """Percentile-bootstrap intervals for E, A, B, alpha, beta of the (fixed-scale) Chinchilla fit."""
    feats, logy = _prepare([N, D, L], ["N", "D", "L"], True)
    return _bootstrap(feats, logy, delta, 2, n_boot, level, seed, _chinchilla_params)


def bootstrap_power_law(
    x: ArrayLike, y: ArrayLike, *, n_boot: int = 200, level: float = 0.95, seed: int = 0, irreducible: bool = True
) -> Bootstrap:
    """Percentile-bootstrap intervals for A, alpha (and E when irreducible) of the power-law fit."""
    feats, logy = _prepare([x, y], ["x", "y"], irreducible)

    def to_params(theta: np.ndarray) -> dict[str, float]:
        return {k: v for k, v in _power_law_params(theta).items() if irreducible or k != "E"}

    return _bootstrap(feats, logy, 1e-3, 1, n_boot, level, seed, to_params)


def compute_optimal_intervals(boot: Bootstrap, C: ArrayLike) -> dict[str, np.ndarray]:
    """N*, D* and D*/N* at each compute C (FLOP): the full-data estimate and percentile lo/hi over
    the bootstrap's parameter samples. Keys: C and {N_opt, D_opt, tokens_per_param}_{estimate, lo, hi}."""
    C = np.asarray(C, dtype=float).ravel()
    est, s = boot.estimate, boot.samples
    n_est, d_est = _compute_optimal(C, est["A"], est["B"], est["alpha"], est["beta"])
    n_smp, d_smp = _compute_optimal(C[None], *(s[k][:, None] for k in ("A", "B", "alpha", "beta")))  # (n_boot, |C|)
    out = {"C": C}
    for name, value, spread in [
        ("N_opt", n_est, n_smp), ("D_opt", d_est, d_smp), ("tokens_per_param", d_est / n_est, d_smp / n_smp)
    ]:
        out[f"{name}_estimate"] = value
        out[f"{name}_lo"], out[f"{name}_hi"] = np.quantile(spread, [(1 - boot.level) / 2, (1 + boot.level) / 2], axis=0)
    return out


# ---------------------------------------------------------------- tables (the `smallscale fit` command)


def _read_table(path: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV or Parquet file by name (pyarrow is a core dependency; pandas is not)."""
    import pyarrow.csv
    import pyarrow.parquet

    if not path.is_file():
        raise UserError(f"Table {path} does not exist; pass a CSV or Parquet file.")
    readers = {".csv": pyarrow.csv.read_csv, ".parquet": pyarrow.parquet.read_table, ".pq": pyarrow.parquet.read_table}
    if path.suffix.lower() not in readers:
        raise UserError(f"Cannot read {path.name}: use a .csv or .parquet file.")
    table = readers[path.suffix.lower()](path)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _column(table: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in table:
        raise UserError(f"Column {name!r} not found; available columns: {', '.join(table)}.")
    try:
        values = np.asarray(table[name], dtype=float)
    except (TypeError, ValueError):
        raise UserError(f"Column {name!r} must be numeric.") from None
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"Column {name!r} must be finite and positive; row {row} holds {float(values[row])}.")
    return values


def fit_table(
    path: str | Path, *, form: Literal["chinchilla", "n", "d"], n_col: str | None, d_col: str | None, loss_col: str,
    flop_col: str | None = None, drop_highest: int = 0, n_boot: int = 0, level: float = 0.95, seed: int = 0,
    scale: Literal["fixed", "fitted"] = "fixed",
) -> dict:
    """Fit a scaling law to a table of runs; return a JSON-serialisable summary.

    form "chinchilla" fits L(N, D); "n" and "d" fit L(N) or L(D) = E + A / x**alpha. D (tokens)
    comes from d_col, or is FLOP / (6 N) when only flop_col is given. The `drop_highest` rows of
    highest loss are removed first (Besiroglu et al. drop 5). With n_boot > 0, percentile
    intervals at `level` come from that many resamples, including for compute-optimal N*, D*.
    `scale` (chinchilla only): "fixed" is the Huber(delta) objective as the papers state it;
    "fitted" is Epoch's estimator (Huber likelihood with a free scale), which reproduces their
    published numbers; intervals always come from the fixed-scale bootstrap."""
    if form not in ("chinchilla", "n", "d"):
        raise UserError(f"Unknown form {form!r}; use 'chinchilla', 'n' or 'd'.")
    table = _read_table(Path(path))
    loss = _column(table, loss_col)
    needs_n = form != "d" or d_col is None  # L(N), L(N, D), or D = FLOP / (6 N)
    if needs_n and n_col is None:
        raise UserError(f"Form {form!r} needs the model-size column (n_col).")
    if form != "n" and d_col is None and flop_col is None:
        raise UserError(f"Form {form!r} needs a token column (d_col) or a FLOP column (flop_col).")
    N = _column(table, n_col) if needs_n else None
    D = None if form == "n" else _column(table, d_col) if d_col is not None else _column(table, flop_col) / (6.0 * N)
    if not 0 <= drop_highest < loss.size:
        raise UserError(f"drop_highest must be between 0 and {loss.size - 1} for {loss.size} rows, got {drop_highest}.")
    keep = np.sort(np.argsort(loss, kind="stable")[: loss.size - drop_highest])
    boot = None
    if form == "chinchilla":
        fit = fit_chinchilla(N[keep], D[keep], loss[keep], scale=scale)
        if n_boot:
            boot = bootstrap_chinchilla(N[keep], D[keep], loss[keep], n_boot=n_boot, level=level, seed=seed)
    else:
        x = (N if form == "n" else D)[keep]
        fit = fit_power_law(x, loss[keep])
        if n_boot:
            boot = bootstrap_power_law(x, loss[keep], n_boot=n_boot, level=level, seed=seed)
    params = fit.as_dict()
    out: dict = {"form": form, "n_points": int(keep.size), "dropped": drop_highest, "objective": params.pop("loss"),
                 "scale": scale if form == "chinchilla" else None}
    out |= {"params": params, "level": level if boot else None}
    out["intervals"] = {name: list(boot.interval(name)) for name in boot.estimate} if boot else None
    if isinstance(fit, ChinchillaFit):
        if boot:
            columns = compute_optimal_intervals(boot, _COMPUTE_DECADES)
        else:
            n_opt, d_opt = fit.compute_optimal(_COMPUTE_DECADES)
            columns = {"C": _COMPUTE_DECADES, "N_opt_estimate": n_opt, "D_opt_estimate": d_opt}
            columns["tokens_per_param_estimate"] = d_opt / n_opt
        out["compute_optimal"] = [{k: float(v[i]) for k, v in columns.items()} for i in range(_COMPUTE_DECADES.size)]
    return out
