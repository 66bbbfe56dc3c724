"""Scaling-law fits: Chinchilla approaches 2 and 3, Kaplan power laws, bootstrap intervals, compute-optimal frontier.

Pure numpy/scipy, no Ray or torch, so notebooks and unit tests import it in milliseconds (matplotlib is imported
only inside ``ScalingFit.plot``).

Units throughout: N = parameters, D = training tokens, C = training FLOPs with C = 6 N D, loss = cross-entropy in
nats per token.

Approach 3 (Hoffmann et al. 2022, as replicated by Besiroglu et al. 2024, arXiv:2404.10102) fits

    L(N, D) = E + A / N^alpha + B / D^beta

in log-sum-exp form with parameters x = (a, b, e, alpha, beta), a = log A, b = log B, e = log E:

    log L_hat = LSE(a - alpha log N, b - beta log D, e)
    objective = sum_i Huber_delta(log L_hat_i - log L_i),  delta = 1e-3

minimised from every point of a grid of initialisations (Besiroglu's 5,400-point grid by default), keeping the
best. The analytic gradient is vectorised over starts: a batched BFGS advances all starts together and scipy's
L-BFGS-B polishes the best end points (``optimizer="scipy"`` runs L-BFGS-B from every start instead, the literal
procedure, several times slower). Bootstrap refits are batched the same way.

    fit = fit_chinchilla(n, d, loss, n_bootstrap=200, seed=0)
    loss, lo, hi = fit.predict(7e10, 1.4e12)
    n_opt, d_opt, loss_opt = fit.frontier(5.8e23)
    fit.plot("out/")
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D: forward + backward FLOPs per parameter per training token
CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")  # column order of ScalingFit.bootstrap_params
KAPLAN_PARAMS = {"kaplan_n": ("N_c", "alpha_N", "E"), "kaplan_c": ("C_c", "alpha_C", "E")}

# What a fit's diagnostics (ScalingFit.warnings) take as signs that the runs do not pin the law down.
PLAUSIBLE_EXPONENTS = (0.02, 2.0)
"""Where language-model exponents land: Chinchilla's alpha, beta 0.28-0.37 (Hoffmann et al., Besiroglu et al.),
Kaplan's 0.05-0.1, this project's 20-trial CPU sweep 0.54 and 1.0. An exponent outside means the fit traded it
against E, A or B: the runs do not identify it."""
MIN_SPAN = 10.0
"""An exponent is read off how loss changes across N (or D): a variable spanning less than a decade barely moves
the loss, so its exponent rests on noise."""
MIN_RUNS = 10
"""Five parameters from fewer runs than this: the bootstrap intervals and any extrapolation are fragile."""
LONG_EXTRAPOLATION = 10.0
"""Compute beyond this multiple of the largest run's is a long extrapolation: this project's own 10x benchmark
missed by 2.4-20 % (README, scaling-law extrapolation)."""


# --------------------------------------------------------------------------------------------------------------
# Starting grids
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitGrid:
    """L-BFGS-B starting points for approach 3: the Cartesian product of these values.

    ``a``, ``b``, ``e`` are log A, log B, log E; ``alpha``, ``beta`` the exponents.
    """

    alpha: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    beta: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    e: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
    a: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    b: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)

    def points(self) -> np.ndarray:
        """All starts as an array of shape (n_starts, 5), columns (a, b, e, alpha, beta)."""
        return np.array(list(product(self.a, self.b, self.e, self.alpha, self.beta)), dtype=float)

    def __len__(self) -> int:
        return len(self.a) * len(self.b) * len(self.e) * len(self.alpha) * len(self.beta)


BESIROGLU_GRID = InitGrid()  # 5,400 starts, the grid of Besiroglu et al. 2024
SMALL_GRID = InitGrid(  # 72 starts around where language-model fits land; for sweeps and tests
    alpha=(0.25, 0.5),
    beta=(0.25, 0.5),
    e=(0.0, 0.5, 1.0),
    a=(2.5, 5.0, 10.0),
    b=(2.5, 5.0),
)


# --------------------------------------------------------------------------------------------------------------
# Input checks (user-facing: one line naming the problem and the fix)
# --------------------------------------------------------------------------------------------------------------


def _as_columns(columns: dict[str, Any], *, min_points: int, what: str) -> list[np.ndarray]:
    arrays = {}
    for name, values in columns.items():
        arr = np.asarray(values, dtype=float)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        arrays[name] = arr
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        got = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise ValueError(f"{what}: inputs have mismatched lengths ({got}); pass one value per training run")
    for name, arr in arrays.items():
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(
                f"{what}: {name} has {bad.size} NaN/inf value(s) at rows {bad[:5].tolist()}; "
                "drop those runs (unfinished or diverged trials) before fitting"
            )
        bad = np.flatnonzero(arr <= 0)
        if bad.size:
            raise ValueError(
                f"{what}: {name} must be > 0 but row {int(bad[0])} is {arr[bad[0]]:g} ({bad.size} such row(s)); "
                "fix or drop those runs — the fit works in log space"
            )
    n_points = next(iter(lengths.values()))
    if n_points < min_points:
        raise ValueError(
            f"{what} needs at least {min_points} points (one per fitted parameter), got {n_points}; "
            "add more runs to the sweep"
        )
    return list(arrays.values())


# --------------------------------------------------------------------------------------------------------------
# The log-sum-exp Huber objective and its optimisers, shared by approach 3 and the Kaplan forms
# --------------------------------------------------------------------------------------------------------------
#
# A parameter row x = (c_1..c_k, [e], p_1..p_k) predicts  ln L_hat = LSE_j(c_j - p_j ln x_j [, e]).
# Approach 3: k = 2, x = (a, b, e, alpha, beta) over (ln N, ln D). Kaplan: k = 1 over ln N or ln C.
# Everything is vectorised over K parameter rows at once, each row optionally with its own data (a bootstrap
# resample), so thousands of starts cost a few large numpy operations instead of thousands of Python loops.

Optimizer = Literal["batched", "scipy"]
_LBFGSB_OPTIONS = {"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12}  # the Huber objective is ~1e-3 in size
_SCREENING = {"maxiter": 200, "gtol": 1e-6, "ftol": 1e-10}  # loose: multistart end points get polished anyway


def _objective(
    X: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float, has_const: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Huber objectives (K,) and gradients (K, P) for rows X (K, P); log_x (K|1, k, n), log_loss (K|1, n)."""
    k = log_x.shape[1]
    terms = [X[:, j, None] - X[:, k + has_const + j, None] * log_x[:, j] for j in range(k)]  # each (K, n)
    if has_const:
        terms.append(X[:, k, None])  # (K, 1), broadcasts
    top = terms[0]
    for t in terms[1:]:
        top = np.maximum(top, t)
    w = [np.exp(t - top) for t in terms]  # softmax numerators: d LSE / d term_j = w_j / s
    s = w[0] + w[1] if len(w) > 1 else w[0]
    for extra in w[2:]:
        s = s + extra
    r = top + np.log(s) - log_loss  # residuals in ln L, (K, n)
    r_clip = np.clip(r, -delta, delta)  # Huber'(r)
    f = np.einsum("kn,kn->k", r_clip, r - 0.5 * r_clip)  # = 0.5 r² inside delta, delta(|r| - delta/2) outside
    dr = r_clip / s
    grad = np.empty_like(X)
    for j in range(k):
        g_j = w[j] * dr
        grad[:, j] = g_j.sum(axis=1)
        shared = log_x.shape[0] == 1
        grad[:, k + has_const + j] = -(g_j @ log_x[0, j] if shared else np.einsum("kn,kn->k", g_j, log_x[:, j]))
    if has_const:
        grad[:, k] = np.einsum("kn,kn->k", np.broadcast_to(w[k], dr.shape), dr)
    return f, grad


def _bfgs(
    X0: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float, has_const: bool,
    maxiter: int = 500, gtol: float = 1e-9, ftol: float = 1e-13,
) -> tuple[np.ndarray, np.ndarray]:
    """BFGS with Armijo backtracking, run on all rows of X0 at once; rows stop independently.

    A row stops when its largest gradient component is below gtol, its objective improves by less than
    ftol·|f| in a step, or its line search fails (a kink of the Huber loss it cannot descend further).
    Tolerances are relative to |f| because the Huber objective is tiny (~delta × n × |residual|).
    """
    K, P = X0.shape
    per_row = log_x.shape[0] > 1
    def data(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (log_x[rows], log_loss[rows]) if per_row else (log_x, log_loss)

    X = X0.astype(float).copy()
    F, G = _objective(X, log_x, log_loss, delta, has_const)
    H = np.tile(np.eye(P), (K, 1, 1))
    fresh = np.ones(K, dtype=bool)  # H is still the identity: scale the first step, rescale H after it
    active = np.flatnonzero(np.isfinite(F) & np.all(np.isfinite(G), axis=1))
    F[~np.isfinite(F)] = np.inf
    for _ in range(maxiter):
        if active.size == 0:
            break
        x, f, g, h = X[active], F[active], G[active], H[active]
        step = -np.einsum("kij,kj->ki", h, g)
        slope = np.einsum("ki,ki->k", g, step)
        uphill = ~(slope < 0)
        if uphill.any():  # the curvature estimate went bad: restart that row from steepest descent
            h[uphill] = np.eye(P)
            fresh[active[uphill]] = True
            step[uphill] = -g[uphill]
            slope[uphill] = -np.einsum("ki,ki->k", g[uphill], g[uphill])
        # like L-BFGS-B: an unscaled step starts at unit length and backtracks from there
        t = np.where(fresh[active], 1.0 / np.maximum(np.linalg.norm(step, axis=1), 1e-300), 1.0)
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        moved = np.zeros(active.size, dtype=bool)
        todo = np.arange(active.size)
        for _ in range(60):
            xt = x[todo] + t[todo, None] * step[todo]
            ft, gt = _objective(xt, *data(active[todo]), delta, has_const)
            ok = np.isfinite(ft) & (ft <= f[todo] + 1e-4 * t[todo] * slope[todo])
            done = todo[ok]
            x_new[done], f_new[done], g_new[done], moved[done] = xt[ok], ft[ok], gt[ok], True
            todo = todo[~ok]
            if todo.size == 0:
                break
            t[todo] *= 0.5
        s, y = x_new - x, g_new - g
        sy = np.einsum("ki,ki->k", s, y)
        update = moved & (sy > 1e-16 * np.linalg.norm(s, axis=1) * np.linalg.norm(y, axis=1))
        if update.any():
            su, yu, rho = s[update], y[update], 1.0 / sy[update]
            hu = h[update]
            first = fresh[active[update]]
            if first.any():  # Nocedal & Wright eq. 6.20: scale the identity by s·y / y·y before the first update
                hu[first] = np.eye(P) * (sy[update][first] / np.einsum("ki,ki->k", yu[first], yu[first]))[:, None, None]
            v = np.eye(P) - rho[:, None, None] * np.einsum("ki,kj->kij", su, yu)
            h[update] = np.einsum("kij,kjl,kml->kim", v, hu, v) + rho[:, None, None] * np.einsum("ki,kj->kij", su, su)
            fresh[active[update]] = False
        X[active], F[active], G[active], H[active] = x_new, f_new, g_new, h
        stalled = ((f - f_new) <= ftol * np.abs(f_new)) & ~fresh[active]
        converged = ~moved | stalled | (np.abs(g_new).max(axis=1) <= gtol)
        active = active[~converged]
    return X, F


def _lbfgsb(
    x0: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float, has_const: bool
) -> tuple[np.ndarray, float]:
    """scipy's L-BFGS-B from one start, on one data set (log_x (1, k, n), log_loss (1, n))."""
    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = _objective(x[None, :], log_x, log_loss, delta, has_const)
        return float(f[0]), g[0]

    res = minimize(fun, x0, jac=True, method="L-BFGS-B", options=_LBFGSB_OPTIONS)
    return res.x, float(res.fun) if np.isfinite(res.fun) else math.inf


def _chunks(n_rows: int, n_points: int, n_terms: int) -> list[slice]:
    size = max(1, 4_000_000 // max(1, n_points * n_terms))  # rows × points × terms ≲ 4M floats (32 MB)
    return [slice(i, min(i + size, n_rows)) for i in range(0, n_rows, size)]


def _fit_multistart(
    starts: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float, has_const: bool,
    optimizer: Optimizer, n_polish: int = 3,
) -> tuple[np.ndarray, float]:
    """Minimise from every start and keep the best row.

    "scipy": L-BFGS-B from every start (the reference; ~5 ms a start). "batched": vectorised BFGS from every
    start, then L-BFGS-B from the ``n_polish`` best distinct end points, so the answer is an L-BFGS-B optimum.
    """
    log_x, log_loss = log_x[None], log_loss[None]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if optimizer == "scipy":
            ends = [_lbfgsb(x0, log_x, log_loss, delta, has_const) for x0 in starts]
            X = np.array([x for x, _ in ends])
            F = np.array([f for _, f in ends])
        elif optimizer == "batched":
            X, F = np.empty_like(starts, dtype=float), np.empty(len(starts))
            for part in _chunks(len(starts), log_x.shape[2], log_x.shape[1] + has_const):
                X[part], F[part] = _bfgs(starts[part], log_x, log_loss, delta, has_const, **_SCREENING)
            order = [i for i in np.argsort(F) if np.isfinite(F[i])]
            picked: list[int] = []
            for i in order:
                if len(picked) == n_polish:
                    break
                if all(np.max(np.abs(X[i] - X[j])) > 1e-6 for j in picked):
                    picked.append(i)
            for i in picked:
                X[i], F[i] = _lbfgsb(X[i], log_x, log_loss, delta, has_const)
        else:
            raise ValueError(f"optimizer must be 'batched' or 'scipy', got {optimizer!r}")
    F = np.where(np.isfinite(F), F, np.inf)
    best = int(np.argmin(F))
    if not np.isfinite(F[best]):
        raise ValueError("scaling fit failed from every starting point; check the data for outliers or widen the grid")
    return X[best], float(F[best])


def _fit_resamples(
    starts: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float, has_const: bool,
    optimizer: Optimizer, n_resamples: int, seed: int,
) -> np.ndarray:
    """Bootstrap: refit on ``n_resamples`` resamples of the points drawn with replacement (``seed`` fixes the draws)
    from each of ``starts``; returns the best parameter row per resample, shape (n_resamples, P)."""
    n_points = log_loss.shape[0]
    idx = np.random.default_rng(seed).integers(0, n_points, size=(n_resamples, n_points))
    return _fit_datasets(starts, log_x, log_loss[idx], idx, delta, has_const, optimizer)


def _fit_datasets(
    starts: np.ndarray, log_x: np.ndarray, log_losses: np.ndarray, idx: np.ndarray, delta: float, has_const: bool,
    optimizer: Optimizer,
) -> np.ndarray:
    """Refit many data sets from each of ``starts``: data set r is the points ``idx[r]`` of log_x (k, n) with the
    log losses ``log_losses[r]`` (a bootstrap resample, or the same points with simulated losses). Returns the
    best parameter row per data set, shape (n_sets, P)."""
    n_sets, n_points = idx.shape
    out = np.empty((n_sets, starts.shape[1]))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if optimizer == "scipy":
            for r in range(n_sets):
                lx, ll = log_x[None, :, idx[r]], log_losses[None, r]
                ends = [_lbfgsb(x0, lx, ll, delta, has_const) for x0 in starts]
                out[r] = min(ends, key=lambda e: e[1])[0]
            return out
        n_starts, n_terms = len(starts), log_x.shape[0] + has_const
        per_chunk = max(1, _chunks(n_sets * n_starts, n_points, n_terms)[0].stop // n_starts)
        for first in range(0, n_sets, per_chunk):
            sets = np.arange(first, min(first + per_chunk, n_sets))
            sample = np.repeat(idx[sets], n_starts, axis=0)  # row = (data set, start), data-set-major
            lx = np.stack([log_x[j][sample] for j in range(log_x.shape[0])], axis=1)
            ll = np.repeat(log_losses[sets], n_starts, axis=0)
            X, F = _bfgs(np.tile(starts, (len(sets), 1)), lx, ll, delta, has_const)
            F = np.where(np.isfinite(F), F, np.inf).reshape(len(sets), n_starts)
            out[sets] = X.reshape(len(sets), n_starts, -1)[np.arange(len(sets)), np.argmin(F, axis=1)]
    return out


def _tails(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The (lo, hi) percentile interval at `level` along axis 0 of bootstrap `samples`. A resample whose fit
    overflowed (Kaplan's X_c = exp(k/alpha) with alpha near 0, a prediction from it) is infinite; where such samples
    reach a tail, that end of the interval is infinite (unbounded), not NaN."""
    tail = 100.0 * (1.0 - level) / 2.0
    with np.errstate(invalid="ignore"):  # interpolating between two infinite samples: inf - inf
        lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
    if np.isnan(lo).any() or np.isnan(hi).any():
        lo_n, hi_n = np.percentile(samples, [tail, 100.0 - tail], axis=0, method="nearest")
        no_nan_input = ~np.isnan(samples).any(axis=0)
        lo = np.where(np.isnan(lo) & no_nan_input, lo_n, lo)
        hi = np.where(np.isnan(hi) & no_nan_input, hi_n, hi)
    return lo, hi


def _percentile_ci(samples: np.ndarray, names: Sequence[str], level: float) -> dict[str, tuple[float, float]]:
    lo, hi = _tails(samples, level)
    return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(names)}


def _json_float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --------------------------------------------------------------------------------------------------------------
# Residual diagnostics
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Residuals:
    """Per-point residuals in log space: log L_predicted - log L_observed (≈ relative error of the prediction)."""

    log_residuals: np.ndarray = field(repr=False)
    rmse: float
    max_abs: float
    mean: float  # bias: > 0 means the law over-predicts loss on average

    @classmethod
    def of(cls, log_residuals: np.ndarray) -> "Residuals":
        r = np.asarray(log_residuals, dtype=float)
        return cls(r, float(np.sqrt(np.mean(r * r))), float(np.max(np.abs(r))), float(np.mean(r)))

    def to_dict(self) -> dict[str, float]:
        return {"rmse": self.rmse, "max_abs": self.max_abs, "mean": self.mean, "n_points": int(self.log_residuals.size)}


@dataclass(frozen=True)
class RerunCheck:
    """How far the prediction at (n, d) moves when the sweep is run again: the fitted law taken as exact, each run's
    final loss redrawn with relative noise ``noise`` (the spread between seeds), the law refitted, and the refit's
    prediction compared with the law's own. A parametric bootstrap of the sweep's design: it measures what the
    per-run noise alone does to an extrapolation, not whether the law's form is right."""

    n: float
    d: float
    noise: float  # standard deviation of ln L per run (≈ relative standard deviation of the loss)
    tolerance: float  # an |error| counted as "within" (the benchmark's goal: 0.02)
    errors: np.ndarray = field(repr=False)  # (simulations,) (refit - law) / law at (n, d); inf: the refit ran off

    @property
    def median_abs_error(self) -> float:
        return float(np.median(np.abs(self.errors)))

    @property
    def p90_abs_error(self) -> float:
        return float(np.percentile(np.abs(self.errors), 90))

    @property
    def within(self) -> float:
        """The fraction of simulated sweeps whose prediction lands within ``tolerance`` of the law's."""
        return float(np.mean(np.abs(self.errors) <= self.tolerance))

    def to_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "d": self.d, "noise": self.noise, "simulations": int(self.errors.size),
                "median_abs_error": self.median_abs_error, "p90_abs_error": self.p90_abs_error,
                "mean_error": float(np.mean(self.errors)), "tolerance": self.tolerance, "within": self.within}


@dataclass(frozen=True)
class SeedSpread:
    """What one-seed sweeps of a design predict at (n, d): runs with the same N and D are one point trained at
    several seeds, and each resample keeps one of them per point, drawn at random, and refits. Unlike
    `RerunCheck` it assumes neither the law nor a noise model: the seeds' own losses (outliers and all) are what
    varies, so it shows how far a sweep at one seed could have landed from another."""

    n: float
    d: float
    pooled: float  # the prediction of the fit on every run
    predictions: np.ndarray = field(repr=False)  # (resamples,) each one-seed sweep's prediction; inf: it ran off
    runs: np.ndarray = field(repr=False)  # (resamples, points) the fitted run each resample kept per point
    seeds: np.ndarray = field(repr=False)  # (points,) runs (seeds) per point

    @property
    def median(self) -> float:
        return float(np.median(self.predictions))

    def interval(self, level: float = 0.9) -> tuple[float, float]:
        """The central ``level`` range of the one-seed sweeps' predictions."""
        lo, hi = np.percentile(self.predictions, [50 * (1 - level), 50 * (1 + level)])
        return float(lo), float(hi)

    @property
    def spread(self) -> float:
        """Median |prediction / median - 1|: how far a one-seed sweep typically lands from the middle."""
        return float(np.median(np.abs(self.predictions / self.median - 1)))

    def within(self, value: float, tolerance: float = 0.02) -> float:
        """The fraction of one-seed sweeps predicting within ``tolerance`` of ``value`` (e.g. the loss a run
        at (n, d) went on to reach)."""
        return float(np.mean(np.abs(self.predictions / value - 1) <= tolerance))

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval()
        return {"n": self.n, "d": self.d, "pooled": self.pooled, "resamples": int(self.predictions.size),
                "points": int(self.seeds.size), "replicated_points": int((self.seeds > 1).sum()),
                "median": self.median, "interval_90": [lo, hi], "spread": self.spread,
                "predictions": self.predictions.tolist()}


# --------------------------------------------------------------------------------------------------------------
# Approach 3: the parametric law L(N, D) = E + A/N^alpha + B/D^beta
# --------------------------------------------------------------------------------------------------------------


def _natural(x: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta) rows → (E, A, B, alpha, beta) rows."""
    x = np.atleast_2d(x)
    return np.column_stack([np.exp(x[:, 2]), np.exp(x[:, 0]), np.exp(x[:, 1]), x[:, 3], x[:, 4]])


def _log_form(params: np.ndarray) -> np.ndarray:
    """(E, A, B, alpha, beta) → (a, b, e, alpha, beta), the inverse of `_natural` for one row."""
    e, a, b, alpha, beta = params
    return np.array([math.log(a), math.log(b), math.log(e), alpha, beta])


def _chinchilla_loss(params: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """L for parameter rows (E, A, B, alpha, beta) of shape (k, 5) against points of any shape → (k, *shape)."""
    p = np.atleast_2d(params)
    extra = (slice(None),) + (None,) * np.ndim(n)
    e, a, b, alpha, beta = (p[:, i][extra] for i in range(5))
    return e + a / np.power(n, alpha) + b / np.power(d, beta)


def compute_optimal(compute: Any, A: float, B: float, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal (N_opt, D_opt) for compute C in FLOPs under C = 6 N D (Hoffmann et al. eq. 4).

    N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)). E does not move the optimum. Only a law whose loss falls with both
    N and D (alpha, beta > 0) has one: otherwise the best use of compute is an ever smaller model or fewer tokens.
    """
    from app.errors import FitError

    for name, value in (("alpha", alpha), ("beta", beta)):
        if not value > 0:
            grows = "parameters" if name == "alpha" else "tokens"
            raise FitError(f"no compute-optimal size: the fit has {name}={value:.3g} (loss does not fall with more "
                           f"{grows} in these runs); fit runs that span a wider range of sizes and token budgets")
    c6 = np.asarray(compute, dtype=float) / FLOPS_PER_PARAM_TOKEN
    g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return g * c6 ** (beta / (alpha + beta)), c6 ** (alpha / (alpha + beta)) / g


def _scalar_or_array(x: np.ndarray) -> Any:
    return float(x) if np.ndim(x) == 0 else x


@dataclass
class ScalingFit:
    """An approach-3 fit: point estimates, bootstrap intervals, and the data it was fitted on.

    ``params`` holds E, A, B, alpha, beta (L in nats, N in parameters, D in tokens); ``ci`` maps each to its
    percentile interval at ``ci_level``, empty when the fit has no bootstrap.
    """

    form: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_points: int
    ci_level: float = 0.95
    huber_delta: float = HUBER_DELTA
    objective: float = math.nan  # best Huber objective value
    n_starts: int = 0
    n: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    d: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    loss: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    bootstrap_params: np.ndarray | None = field(default=None, repr=False)  # (n_resamples, 5) in CHINCHILLA_PARAMS order
    n_column: str | None = None  # the results-table column N was read from (fit.json "columns"), when known

    @property
    def param_vector(self) -> np.ndarray:
        return np.array([self.params[k] for k in CHINCHILLA_PARAMS])

    @property
    def se(self) -> dict[str, float]:
        """Bootstrap standard errors (std of the resampled estimates); empty without a bootstrap."""
        if self.bootstrap_params is None:
            return {}
        with np.errstate(over="ignore"):  # a resample that ran off to A ~ 1e200 has an infinite spread: inf, said so
            std = self.bootstrap_params.std(axis=0, ddof=1)
        return {k: float(s) for k, s in zip(CHINCHILLA_PARAMS, std)}

    # ---- predictions -----------------------------------------------------------------------------------------
    def predict(self, n: Any, d: Any) -> tuple[Any, Any, Any]:
        """Predicted loss at N parameters, D tokens, with the bootstrap percentile interval (lo, hi).

        Scalars in → floats out; arrays broadcast. Without bootstrap samples lo and hi are NaN (no interval).
        """
        n, d = np.broadcast_arrays(np.asarray(n, dtype=float), np.asarray(d, dtype=float))
        if np.any(n <= 0) or np.any(d <= 0):
            raise ValueError("predict: N (parameters) and D (tokens) must be > 0")
        loss = _chinchilla_loss(self.param_vector, n, d)[0]
        if self.bootstrap_params is None or len(self.bootstrap_params) < 2:
            lo = hi = np.full_like(loss, np.nan)
        else:
            lo, hi = _tails(_chinchilla_loss(self.bootstrap_params, n, d), self.ci_level)
        return _scalar_or_array(loss), _scalar_or_array(lo), _scalar_or_array(hi)

    def frontier(self, compute: Any) -> tuple[Any, Any, Any]:
        """Compute-optimal (N_opt, D_opt, loss) for C FLOPs, with C = 6 N_opt D_opt."""
        p = self.params
        n_opt, d_opt = compute_optimal(compute, p["A"], p["B"], p["alpha"], p["beta"])
        loss = _chinchilla_loss(self.param_vector, n_opt, d_opt)[0]
        return _scalar_or_array(n_opt), _scalar_or_array(d_opt), _scalar_or_array(loss)

    def frontier_exponents(self) -> dict[str, Any]:
        """N_opt ∝ C^a, D_opt ∝ C^b: a = beta/(alpha+beta), b = alpha/(alpha+beta); CIs from the bootstrap."""
        alpha, beta = self.params["alpha"], self.params["beta"]
        out: dict[str, Any] = {"a": beta / (alpha + beta), "b": alpha / (alpha + beta)}
        if self.bootstrap_params is not None and len(self.bootstrap_params) >= 2:
            al, be = self.bootstrap_params[:, 3], self.bootstrap_params[:, 4]
            samples = np.column_stack([be / (al + be), al / (al + be)])
            ci = _percentile_ci(samples, ["a", "b"], self.ci_level)
            out["a_ci"], out["b_ci"] = ci["a"], ci["b"]
        return out

    def residuals(self, n: Any = None, d: Any = None, loss: Any = None) -> Residuals:
        """Residual diagnostics on the fitted data, or on held-out points when n, d, loss are given."""
        if n is None:
            n, d, loss = self.n, self.d, self.loss
        else:
            n, d, loss = _as_columns({"N": n, "D": d, "loss": loss}, min_points=1, what="residuals")
        pred = _chinchilla_loss(self.param_vector, n, d)[0]
        return Residuals.of(np.log(pred) - np.log(loss))

    # ---- diagnostics -----------------------------------------------------------------------------------------
    @property
    def warnings(self) -> list[str]:
        """Plain-language signs that the runs do not pin the law down (empty when none, or without data): an
        exponent outside PLAUSIBLE_EXPONENTS, N or D spanning less than MIN_SPAN, fewer than MIN_RUNS runs."""
        if not self.n.size:
            return []
        out = []
        lo, hi = PLAUSIBLE_EXPONENTS
        for name, var in (("alpha", "N"), ("beta", "D")):
            value = self.params[name]
            if not lo <= value <= hi:
                out.append(f"{name} = {value:.3g} is outside {lo:g}-{hi:g}, where language-model exponents land: "
                           f"these runs do not identify it, so predictions away from them mean little; add runs "
                           f"spread over more {'model sizes' if var == 'N' else 'token budgets'}")
        for var, values, what in (("N", self.n, "smaller or larger models"), ("D", self.d, "shorter or longer runs")):
            span = float(values.max() / values.min())
            if span < MIN_SPAN:
                out.append(f"{var} spans only {span:.2g}x ({values.min():.3g} to {values.max():.3g}); its exponent "
                           f"needs a decade or more: add {what}")
        if self.n_points < MIN_RUNS:
            out.append(f"{self.n_points} runs for 5 parameters: intervals and extrapolations are fragile; "
                       f"{MIN_RUNS} or more runs spread over N and D are better")
        return out

    def rerun_check(self, n: float, d: float, *, noise: float, simulations: int = 200, seed: int = 0,
                    tolerance: float = 0.02, grid: InitGrid | None = None) -> RerunCheck:
        """If this law were exact and every fitted run were trained again with per-run loss noise ``noise`` (the
        relative standard deviation seeds give, e.g. 0.007), how far would the refit predict (n, d) from here?

        Each of ``simulations`` sweeps draws ln L_i = ln L(N_i, D_i) + noise · z_i at the fitted runs' N and D
        (z = ``numpy.random.default_rng(seed).standard_normal((simulations, runs))``) and refits from this fit's
        optimum plus ``grid`` (default SMALL_GRID, so other basins stay reachable; on scaling_b1k's 17 runs the
        5,400-start grid gave the same errors, 60× slower). A wide spread says the sweep's design cannot pin the
        prediction down at this noise: more seeds per point (noise / sqrt(k) for k seeds) or runs spread further in
        N and D are the remedies; re-check with those.
        """
        self._require_runs("rerun_check")
        if not (math.isfinite(noise) and 0 < noise < 1):
            raise ValueError(f"noise must be in (0, 1): the relative standard deviation of a run's final loss "
                             f"between seeds (e.g. 0.007), got {noise:g}")
        if simulations < 2:
            raise ValueError(f"simulations must be >= 2, got {simulations}")
        if not (n > 0 and d > 0):
            raise ValueError(f"rerun_check: N and D must be > 0, got N={n:g}, D={d:g}")
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {tolerance:g}")
        exact = np.log(_chinchilla_loss(self.param_vector, self.n, self.d)[0])
        draws = exact + noise * np.random.default_rng(seed).standard_normal((simulations, exact.size))
        predicted = self._refit_predict(draws, np.broadcast_to(np.arange(exact.size), draws.shape), n, d, grid)
        law = float(_chinchilla_loss(self.param_vector, float(n), float(d))[0])
        return RerunCheck(float(n), float(d), float(noise), float(tolerance), (predicted - law) / law)

    def seed_spread(self, n: float, d: float, *, resamples: int = 200, seed: int = 0,
                    grid: InitGrid | None = None) -> SeedSpread:
        """How far apart would one-seed sweeps of this design predict (n, d)? Runs with the same N and D are one
        point at several seeds; each of ``resamples`` sweeps keeps one run per point, uniformly at random
        (``numpy.random.default_rng(seed)``), and is refitted from this fit's optimum plus ``grid`` (default
        SMALL_GRID), batched like the bootstrap. Points with a single run are in every resample as they are.

        Needs a sweep trained at several seeds (e.g. ``seeds: [0, 1, 2]`` in its grid) and fitted on all of them.
        Where `rerun_check` asks what Gaussian noise of a given size would do if the law were exact, this asks
        the data: on scaling_b1k at 3 seeds, 90 % of one-seed sweeps predicted its 10× run (2.476) at 2.38–2.88.
        """
        self._require_runs("seed_spread")
        if resamples < 2:
            raise ValueError(f"resamples must be >= 2, got {resamples}")
        if not (n > 0 and d > 0):
            raise ValueError(f"seed_spread: N and D must be > 0, got N={n:g}, D={d:g}")
        _, point = np.unique(np.column_stack([self.n, self.d]), axis=0, return_inverse=True)
        point = point.ravel()
        members = [np.flatnonzero(point == p) for p in range(point.max() + 1)]
        seeds = np.array([m.size for m in members])
        if seeds.max() < 2:
            raise ValueError(f"seed_spread: each of the {seeds.size} points (N, D) has one run; it needs points "
                             "trained at several seeds (a sweep's grid seeds: [0, 1, 2]), fitted together")
        pick = np.random.default_rng(seed).random((resamples, seeds.size))
        runs = np.column_stack([m[(pick[:, j] * m.size).astype(int)] for j, m in enumerate(members)])
        predicted = self._refit_predict(np.log(self.loss)[runs], runs, n, d, grid)
        pooled = float(_chinchilla_loss(self.param_vector, float(n), float(d))[0])
        return SeedSpread(float(n), float(d), pooled, predicted, runs, seeds)

    def _require_runs(self, what: str) -> None:
        if not self.n.size:
            raise ValueError(f"{what} needs the fitted runs (N, D, loss): a fit from fit_chinchilla or from a "
                             "fit.json written by `python -m app fit`, not the published constants")

    def _refit_predict(self, log_losses: np.ndarray, idx: np.ndarray, n: float, d: float,
                       grid: InitGrid | None) -> np.ndarray:
        """Refit each data set r (the fitted runs ``idx[r]`` with log losses ``log_losses[r]``) from this fit's
        optimum plus ``grid`` (default SMALL_GRID), batched like the bootstrap, and predict (n, d) with each:
        shape (sets,). A refit that runs off (A or B overflows) predicts inf."""
        starts = np.vstack([_log_form(self.param_vector)[None, :], (grid or SMALL_GRID).points()])
        log_x = np.vstack([np.log(self.n), np.log(self.d)])
        with np.errstate(over="ignore", invalid="ignore"):
            refits = _natural(_fit_datasets(starts, log_x, log_losses, idx, self.huber_delta, True, "batched"))
            predicted = _chinchilla_loss(refits, float(n), float(d))
        return np.where(np.isnan(predicted), np.inf, predicted)  # NaN: inf / inf from a runaway

    def extrapolation(self, compute: float) -> float:
        """How many times the largest fitted run's compute (6ND) `compute` is; NaN without data."""
        if not self.n.size:
            return math.nan
        return float(compute) / float((FLOPS_PER_PARAM_TOKEN * self.n * self.d).max())

    # ---- serialisation ---------------------------------------------------------------------------------------
    def to_json(self, predictions: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
        """A JSON-ready dict (keys form, params, ci, n_points, predictions, ...); NaN becomes None.

        ``predictions`` lists (N, D) points to predict at; each lands as {n, d, loss, lo, hi}.
        """
        preds = []
        for n_val, d_val in predictions:
            loss, lo, hi = self.predict(n_val, d_val)
            preds.append(
                {"n": float(n_val), "d": float(d_val), "loss": loss, "lo": _json_float(lo), "hi": _json_float(hi)}
            )
        exps = self.frontier_exponents()
        return {
            "form": self.form,
            "params": {k: float(v) for k, v in self.params.items()},
            "ci": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()},
            "se": self.se,
            "ci_level": self.ci_level,
            "n_points": self.n_points,
            "predictions": preds,
            "frontier_exponents": {k: (list(v) if isinstance(v, tuple) else v) for k, v in exps.items()},
            "residuals": self.residuals().to_dict() if self.n.size else None,
            "huber_delta": self.huber_delta,
            "objective": _json_float(self.objective),
            "n_starts": self.n_starts,
            "n_resamples": 0 if self.bootstrap_params is None else int(len(self.bootstrap_params)),
            "warnings": self.warnings,
            "data": {"n": self.n.tolist(), "d": self.d.tolist(), "loss": self.loss.tolist()},
            "bootstrap_params": None if self.bootstrap_params is None else self.bootstrap_params.tolist(),
            **({"columns": {"n": self.n_column}} if self.n_column else {}),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "ScalingFit":
        """Rebuild a fit from ``to_json()`` output (predictions are recomputed, not read back)."""
        data = obj.get("data") or {}
        boot = obj.get("bootstrap_params")
        return cls(
            form=obj["form"],
            params={k: float(v) for k, v in obj["params"].items()},
            ci={k: (float(v[0]), float(v[1])) for k, v in obj.get("ci", {}).items()},
            n_points=int(obj["n_points"]),
            ci_level=float(obj.get("ci_level", 0.95)),
            huber_delta=float(obj.get("huber_delta", HUBER_DELTA)),
            objective=math.nan if obj.get("objective") is None else float(obj["objective"]),
            n_starts=int(obj.get("n_starts", 0)),
            n=np.asarray(data.get("n", []), dtype=float),
            d=np.asarray(data.get("d", []), dtype=float),
            loss=np.asarray(data.get("loss", []), dtype=float),
            bootstrap_params=None if boot is None else np.asarray(boot, dtype=float).reshape(-1, 5),
            n_column=(obj.get("columns") or {}).get("n"),
        )

    # ---- plots -----------------------------------------------------------------------------------------------
    def plot(self, out_dir: str | Path, *, rel_tol: float = 0.2) -> list[Path]:
        """Write loss_vs_compute.png, isoflop.png and residuals.png into out_dir; return their paths.

        IsoFLOP groups are points whose compute 6ND agrees within ``rel_tol`` (see ``group_by_compute``).
        """
        return _plot_fit(self, Path(out_dir), rel_tol=rel_tol)


# Besiroglu et al. 2024 (arXiv:2404.10102), their approach-3 refit of the Chinchilla runs: the default law of
# `python -m app plan` when no fit of your own is given (it describes Chinchilla's data and tokenizer, not yours).
BESIROGLU_2024 = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def published_fit() -> ScalingFit:
    """The Besiroglu et al. 2024 refit of Chinchilla as a ScalingFit (point estimates only: no interval, no data)."""
    return ScalingFit(form="chinchilla", params=dict(BESIROGLU_2024), ci={}, n_points=240)


def fit_chinchilla(
    n: Any,
    d: Any,
    loss: Any,
    *,
    grid: InitGrid = BESIROGLU_GRID,
    huber_delta: float = HUBER_DELTA,
    n_bootstrap: int = 0,
    seed: int = 0,
    ci_level: float = 0.95,
    bootstrap_grid: InitGrid | None = None,
    optimizer: Optimizer = "batched",
) -> ScalingFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (approach 3) to runs with N parameters, D tokens and final loss.

    The objective is minimised from every start of ``grid`` and the lowest Huber objective wins. ``optimizer``:
    "batched" (default) advances all starts together with a vectorised BFGS, then polishes the best distinct end
    points with scipy's L-BFGS-B — the full 5,400-start grid takes seconds; "scipy" runs L-BFGS-B from every start
    (the literal Hoffmann/Besiroglu procedure, ~5 ms a start).

    With ``n_bootstrap`` > 0 the points are resampled with replacement that many times (``seed`` fixes the draws)
    and refitted, each resample starting from the full-data optimum (plus ``bootstrap_grid`` if given: slower, but
    safer when the loss surface has several basins); ``ci`` holds percentile intervals at ``ci_level``.
    """
    n, d, loss = _as_columns({"N": n, "D": d, "loss": loss}, min_points=5, what="approach 3 (L = E + A/N^α + B/D^β)")
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}; e.g. 0.95 for 95% intervals")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    log_x = np.vstack([np.log(n), np.log(d)])
    log_loss = np.log(loss)
    best_x, best_f = _fit_multistart(grid.points(), log_x, log_loss, huber_delta, True, optimizer)

    boot = None
    ci: dict[str, tuple[float, float]] = {}
    if n_bootstrap:
        extra = bootstrap_grid.points() if bootstrap_grid is not None else np.empty((0, 5))
        starts = np.vstack([best_x[None, :], extra])
        boot = _natural(_fit_resamples(starts, log_x, log_loss, huber_delta, True, optimizer, n_bootstrap, seed))
        ci = _percentile_ci(boot, CHINCHILLA_PARAMS, ci_level)

    params = dict(zip(CHINCHILLA_PARAMS, (float(v) for v in _natural(best_x)[0])))
    return ScalingFit(
        form="chinchilla",
        params=params,
        ci=ci,
        n_points=len(loss),
        ci_level=ci_level,
        huber_delta=huber_delta,
        objective=best_f,
        n_starts=len(grid),
        n=n,
        d=d,
        loss=loss,
        bootstrap_params=boot,
    )


# --------------------------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP parabolas
# --------------------------------------------------------------------------------------------------------------


def group_by_compute(compute: Any, rel_tol: float = 0.2) -> np.ndarray:
    """Label each run with an IsoFLOP group: sorted by C, a new group starts when C exceeds the group's first C by
    more than a factor (1 + rel_tol). Labels are 0, 1, ... in increasing compute."""
    if rel_tol <= 0:
        raise ValueError(f"rel_tol must be > 0, got {rel_tol}; e.g. 0.2 groups budgets within 20%")
    log_c = np.log(np.asarray(compute, dtype=float))
    order = np.argsort(log_c, kind="stable")
    labels = np.empty(len(log_c), dtype=int)
    group, start = -1, -math.inf
    for i in order:
        if log_c[i] - start > math.log1p(rel_tol):
            group, start = group + 1, log_c[i]
        labels[i] = group
    return labels


@dataclass(frozen=True)
class IsoFlopBudget:
    """One IsoFLOP group: its compute (geometric mean, FLOPs) and the parabola's minimum."""

    compute: float
    n_opt: float
    d_opt: float
    loss_opt: float
    n_points: int
    coefficients: tuple[float, float, float]  # loss = c2 u^2 + c1 u + c0 with u = ln N


@dataclass
class IsoFlopFit:
    """Approach 2: N_opt = n_coef · C^a and D_opt = d_coef · C^b fitted across IsoFLOP budgets (C in FLOPs)."""

    a: float
    b: float
    n_coef: float
    d_coef: float
    budgets: list[IsoFlopBudget]
    skipped: list[tuple[float, str]]  # (compute, why) for groups without a usable minimum
    rel_tol: float

    def n_opt(self, compute: Any) -> Any:
        return _scalar_or_array(self.n_coef * np.asarray(compute, dtype=float) ** self.a)

    def d_opt(self, compute: Any) -> Any:
        return _scalar_or_array(self.d_coef * np.asarray(compute, dtype=float) ** self.b)

    def to_json(self) -> dict[str, Any]:
        return {
            "form": "isoflop",
            "params": {"a": self.a, "b": self.b, "n_coef": self.n_coef, "d_coef": self.d_coef},
            "n_points": sum(b.n_points for b in self.budgets),
            "budgets": [
                {"compute": b.compute, "n_opt": b.n_opt, "d_opt": b.d_opt, "loss_opt": b.loss_opt,
                 "n_points": b.n_points}
                for b in self.budgets
            ],
            "skipped": [{"compute": c, "why": why} for c, why in self.skipped],
            "rel_tol": self.rel_tol,
        }


def fit_isoflop(
    n: Any, d: Any, loss: Any, *, compute: Any = None, rel_tol: float = 0.2, min_points_per_budget: int = 3
) -> IsoFlopFit:
    """Approach 2: per IsoFLOP budget fit a parabola of loss in ln N, take its minimum N_opt(C), D_opt = C/(6 N_opt),
    then regress ln N_opt and ln D_opt on ln C.

    ``compute`` defaults to 6 N D. Groups with fewer than ``min_points_per_budget`` distinct sizes, a parabola that
    opens downward, or a minimum outside the sizes tried (an extrapolation) are skipped and listed in ``skipped``.
    """
    what = "approach 2 (IsoFLOP parabolas)"
    n, d, loss = _as_columns({"N": n, "D": d, "loss": loss}, min_points=2 * min_points_per_budget, what=what)
    if compute is None:
        c = FLOPS_PER_PARAM_TOKEN * n * d
    else:
        c = _as_columns({"C": compute, "N": n}, min_points=1, what=what)[0]
    labels = group_by_compute(c, rel_tol)
    budgets: list[IsoFlopBudget] = []
    skipped: list[tuple[float, str]] = []
    for g in range(labels.max() + 1):
        mask = labels == g
        c_g = float(np.exp(np.mean(np.log(c[mask]))))
        u = np.log(n[mask])
        if np.unique(u).size < min_points_per_budget:
            skipped.append((c_g, f"{np.unique(u).size} distinct sizes < {min_points_per_budget}"))
            continue
        center = u.mean()  # centring keeps the 3x3 least-squares problem well conditioned
        c2, c1, c0 = np.polyfit(u - center, loss[mask], 2)
        if c2 <= 0:
            skipped.append((c_g, "parabola opens downward (no minimum)"))
            continue
        u_opt = center - c1 / (2.0 * c2)
        if not u.min() <= u_opt <= u.max():
            skipped.append((c_g, "minimum outside the sizes tried (extrapolation)"))
            continue
        n_opt = float(np.exp(u_opt))
        loss_opt = float(c0 - c1 * c1 / (4.0 * c2))
        budgets.append(
            IsoFlopBudget(c_g, n_opt, c_g / (FLOPS_PER_PARAM_TOKEN * n_opt), loss_opt, int(mask.sum()),
                          (float(c2), float(c1 - 2 * c2 * center), float(c0 - c1 * center + c2 * center**2)))
        )
    if len(budgets) < 2:
        reasons = "; ".join(f"C={c_:.3g}: {why}" for c_, why in skipped) or "all points share one budget"
        raise ValueError(
            f"{what} needs at least 2 budgets with an interior minimum, got {len(budgets)} ({reasons}); "
            "sweep several sizes around the optimum at 2+ compute budgets, or adjust rel_tol"
        )
    log_c = np.log([b.compute for b in budgets])
    a, log_nc = np.polyfit(log_c, np.log([b.n_opt for b in budgets]), 1)
    b_exp, log_dc = np.polyfit(log_c, np.log([b.d_opt for b in budgets]), 1)
    return IsoFlopFit(float(a), float(b_exp), float(np.exp(log_nc)), float(np.exp(log_dc)), budgets, skipped, rel_tol)


# --------------------------------------------------------------------------------------------------------------
# Kaplan et al. 2020 forms: L(N) = (N_c/N)^alpha_N and L(C) = (C_c/C)^alpha_C
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PowerLawFit:
    """A one-variable power law L(X) = (X_c / X)^alpha [+ E], fitted in log space with the Huber objective.

    ``form`` "kaplan_n": X = parameters N, params N_c, alpha_N, E. ``form`` "kaplan_c": X = compute C in FLOPs,
    params C_c, alpha_C, E. E is 0 when fitted without an irreducible term.
    """

    form: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n_points: int
    ci_level: float = 0.95
    x: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    loss: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    bootstrap_params: np.ndarray | None = field(default=None, repr=False)  # (n_resamples, 3) in KAPLAN_PARAMS order

    def predict(self, x: Any) -> tuple[Any, Any, Any]:
        """Predicted loss at X with the bootstrap interval (NaN without a bootstrap)."""
        x = np.asarray(x, dtype=float)
        p = np.array([[self.params[name] for name in KAPLAN_PARAMS[self.form]]])
        loss = _power_loss(p, x)[0]
        if self.bootstrap_params is None or len(self.bootstrap_params) < 2:
            lo = hi = np.full_like(loss, np.nan)
        else:
            lo, hi = _tails(_power_loss(self.bootstrap_params, x), self.ci_level)
        return _scalar_or_array(loss), _scalar_or_array(lo), _scalar_or_array(hi)

    def residuals(self) -> Residuals:
        return Residuals.of(np.log(self.predict(self.x)[0]) - np.log(self.loss))

    def to_json(self) -> dict[str, Any]:
        return {
            "form": self.form,
            "params": dict(self.params),
            "ci": {k: list(v) for k, v in self.ci.items()},
            "ci_level": self.ci_level,
            "n_points": self.n_points,
            "predictions": [],
            "residuals": self.residuals().to_dict() if self.x.size else None,
        }


def _power_loss(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    p = np.atleast_2d(params)
    extra = (slice(None),) + (None,) * np.ndim(x)
    x_c, alpha, e = (p[:, i][extra] for i in range(3))
    return e + np.power(x_c / x, alpha)


def _pareto_front(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of runs no cheaper run beats: the lower envelope of loss against x."""
    order = np.argsort(x, kind="stable")
    keep, best = [], math.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


def _fit_power_law(
    form: str, x: np.ndarray, loss: np.ndarray, irreducible: bool, n_bootstrap: int, seed: int, ci_level: float
) -> PowerLawFit:
    log_x = np.log(x)[None, :]
    log_loss = np.log(loss)
    slope, intercept = np.polyfit(log_x[0], log_loss, 1)  # ln L = alpha ln X_c - alpha ln X: exact for E = 0
    if irreducible:
        # x = (k, e, alpha) with ln L = LSE(k - alpha ln X, e); k = alpha ln X_c
        starts = np.array([[k, e, al] for k in (intercept, 0.0, 2.5, 5.0, 10.0) for e in (-1.0, 0.0, 0.5, 1.0)
                           for al in (max(-slope, 0.01), 0.1, 0.3, 0.6)])
    else:
        starts = np.array([[intercept, -slope]])  # x = (k, alpha)

    def to_natural(v: np.ndarray) -> np.ndarray:
        k, alpha = v[0], v[-1]
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x_c = np.exp(k / alpha)
            e = np.exp(v[1]) if irreducible else 0.0
        return np.array([x_c, alpha, e])

    names = KAPLAN_PARAMS[form]
    best_x, _ = _fit_multistart(starts, log_x, log_loss, HUBER_DELTA, irreducible, "batched")
    boot, ci = None, {}
    if n_bootstrap:
        raw = _fit_resamples(best_x[None, :], log_x, log_loss, HUBER_DELTA, irreducible, "batched", n_bootstrap, seed)
        boot = np.array([to_natural(row) for row in raw])
        ci = _percentile_ci(boot, names, ci_level)
        if not irreducible:
            ci.pop("E")
    return PowerLawFit(form, dict(zip(names, map(float, to_natural(best_x)))), ci, len(loss), ci_level, x, loss, boot)


def fit_kaplan_n(
    n: Any, loss: Any, *, irreducible: bool = False, best_per_size: bool = True,
    n_bootstrap: int = 0, seed: int = 0, ci_level: float = 0.95,
) -> PowerLawFit:
    """Kaplan's L(N) = (N_c/N)^alpha_N (+ E with ``irreducible=True``).

    Kaplan fits models trained to convergence, so with ``best_per_size`` only the lowest loss per distinct N is
    kept (the best-trained run of each size). The fit minimises the Huber objective on ln L (like approach 3).
    """
    n, loss = _as_columns({"N": n, "loss": loss}, min_points=3 if irreducible else 2, what="Kaplan L(N)")
    if best_per_size:
        sizes = np.unique(n)
        keep = np.array([np.flatnonzero(n == s)[np.argmin(loss[n == s])] for s in sizes])
        n, loss = n[keep], loss[keep]
    _as_columns({"N": n}, min_points=3 if irreducible else 2, what="Kaplan L(N) (distinct sizes)")
    return _fit_power_law("kaplan_n", n, loss, irreducible, n_bootstrap, seed, ci_level)


def fit_kaplan_c(
    compute: Any, loss: Any, *, irreducible: bool = False, envelope: bool = True,
    n_bootstrap: int = 0, seed: int = 0, ci_level: float = 0.95,
) -> PowerLawFit:
    """Kaplan's L(C) = (C_c/C)^alpha_C (+ E with ``irreducible=True``), C in FLOPs.

    Kaplan's L(C) is the compute-efficient frontier, so with ``envelope`` only runs on the lower envelope (no run
    with less compute reached a lower loss) are fitted.
    """
    c, loss = _as_columns({"C": compute, "loss": loss}, min_points=3 if irreducible else 2, what="Kaplan L(C)")
    if envelope:
        keep = _pareto_front(c, loss)
        c, loss = c[keep], loss[keep]
    _as_columns({"C": c}, min_points=3 if irreducible else 2, what="Kaplan L(C) (runs on the envelope)")
    return _fit_power_law("kaplan_c", c, loss, irreducible, n_bootstrap, seed, ci_level)


# --------------------------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily; Figure objects render with Agg and never touch pyplot's global state)
# --------------------------------------------------------------------------------------------------------------


def _plot_fit(fit: ScalingFit, out_dir: Path, *, rel_tol: float) -> list[Path]:
    if fit.n.size == 0:
        raise ValueError("plot needs the fitted data; this fit was loaded without it (fit.json lacks 'data')")
    from matplotlib import cm
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    n, d, loss = fit.n, fit.d, fit.loss
    c = FLOPS_PER_PARAM_TOKEN * n * d
    p = fit.params
    title = f"L = {p['E']:.3g} + {p['A']:.3g}/N^{p['alpha']:.3f} + {p['B']:.3g}/D^{p['beta']:.3f}"
    paths = []

    # 1. Loss against compute, runs coloured by size, with the fitted compute-optimal frontier.
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    sc = ax.scatter(c, loss, c=np.log10(n), cmap="viridis", s=14, label="runs")
    fig.colorbar(sc, ax=ax, label="log10 N (parameters)")
    has_frontier = p["alpha"] > 0 and p["beta"] > 0  # else the law has no compute-optimal size (compute_optimal)
    if has_frontier:
        grid_c = np.geomspace(c.min() / 3, c.max() * 100, 200)
        n_opt, d_opt, f_loss = fit.frontier(grid_c)
        ax.plot(grid_c, f_loss, color="crimson", label="compute-optimal frontier (approach 3)")
        _, lo, hi = fit.predict(n_opt, d_opt)
        if np.all(np.isfinite(lo)):
            ax.fill_between(grid_c, lo, hi, color="crimson", alpha=0.2,
                            label=f"{fit.ci_level:.0%} bootstrap interval")
    else:
        ax.plot([], [], " ", label="no compute-optimal frontier: alpha or beta ≤ 0")
    ax.set(xscale="log", yscale="log", xlabel="training compute C = 6ND (FLOPs)", ylabel="loss (nats/token)",
           title=title)
    ax.legend(fontsize=8)
    paths.append(out_dir / "loss_vs_compute.png")
    fig.savefig(paths[-1], dpi=110)

    # 2. IsoFLOP curves: runs of one budget against N, with the law's curve along that budget's C = 6ND line.
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    labels = group_by_compute(c, rel_tol)
    colours = cm.plasma(np.linspace(0.0, 0.85, labels.max() + 1))
    for g in range(labels.max() + 1):
        mask = labels == g
        if mask.sum() < 2:
            continue
        c_g = float(np.exp(np.mean(np.log(c[mask]))))
        ax.scatter(n[mask], loss[mask], color=colours[g], s=14)
        ns = np.geomspace(n[mask].min() / 1.5, n[mask].max() * 1.5, 100)
        curve, _, _ = fit.predict(ns, c_g / (FLOPS_PER_PARAM_TOKEN * ns))
        ax.plot(ns, curve, color=colours[g], lw=1, label=f"C = {c_g:.2g}")
        if has_frontier:
            n_star, _, l_star = fit.frontier(c_g)
            ax.plot([n_star], [l_star], marker="*", color=colours[g], ms=10, mec="black", mew=0.5)
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="loss (nats/token)", title="IsoFLOP profiles (★ = N_opt)")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7, ncol=2)
    paths.append(out_dir / "isoflop.png")
    fig.savefig(paths[-1], dpi=110)

    # 3. Residuals in log space against compute and size.
    res = fit.residuals()
    fig = Figure(figsize=(9, 4), layout="constrained")
    for i, (xs, name) in enumerate(((c, "C = 6ND (FLOPs)"), (n, "N (parameters)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(xs, res.log_residuals, s=10, color="steelblue")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set(xscale="log", xlabel=name, ylabel="ln L_pred − ln L_obs")
    fig.suptitle(f"residuals: RMSE {res.rmse:.4f}, max |r| {res.max_abs:.4f}, mean {res.mean:+.4f}")
    paths.append(out_dir / "residuals.png")
    fig.savefig(paths[-1], dpi=110)
    return paths
