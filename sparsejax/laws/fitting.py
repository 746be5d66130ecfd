"""Fitting the registered laws: multi-start local least squares (or log-space Huber + L-BFGS-B),
case / moving-block bootstrap confidence intervals, and predictions from a fit.

Methods follow the papers (docs/sparsity_metrics_and_laws.md §Laws): Levenberg–Marquardt least
squares (``scipy.optimize.curve_fit(method="lm")``) for the ratio laws, Chinchilla and
``power_offset``; L-BFGS-B on a Huber loss (δ = 1e-3) of log-space residuals for Q-Sparse.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import scipy.optimize

from sparsejax.laws.core import Law, get_law, validated_data, validated_x

HUBER_DELTA = 1e-3  # Q-Sparse / Chinchilla use δ = 1e-3 on log-space residuals


class FitError(RuntimeError):
    """Raised when numbers are asked of a fit that did not succeed."""



# --------------------------------------------------------------------------------------------
# Fit results
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class FitResult:
    """Outcome of :func:`fit` / :func:`bootstrap`.

    ``params`` maps name -> value (NaN when ``success`` is False); ``param_array`` is the same in
    ``law.param_names`` order. ``residuals`` = y − prediction and ``sse`` / ``r2`` are in the units
    of y for every law (Q-Sparse minimises a log-space Huber loss, but reports linear residuals too).
    After :func:`bootstrap`: ``ci`` maps name -> (lo, hi) percentile interval at ``level``,
    ``boot_params`` holds the successful refits, shape (n_boot_ok, n_params), and ``n_boot`` the
    number of resamples drawn.
    """

    law: Law
    params: dict[str, float]
    param_array: np.ndarray
    residuals: np.ndarray
    sse: float
    r2: float
    n_points: int
    success: bool
    message: str
    method: str = ""
    ci: dict[str, tuple[float, float]] | None = None
    boot_params: np.ndarray | None = None
    n_boot: int = 0
    level: float | None = None

    @property
    def law_name(self) -> str:
        return self.law.name

    @property
    def n_boot_ok(self) -> int:
        return 0 if self.boot_params is None else len(self.boot_params)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v:.4g}" for k, v in self.params.items())
        boot = f", bootstrap {self.n_boot_ok}/{self.n_boot}" if self.n_boot else ""
        return (
            f"FitResult({self.law.name}: {params}; r2={self.r2:.6g}, n={self.n_points}, "
            f"success={self.success}{boot}, {self.message!r})"
        )


# --------------------------------------------------------------------------------------------
# Local solvers and starts
# --------------------------------------------------------------------------------------------


def _lm_solve(law: Law, x, y, p0, method: str) -> np.ndarray | None:
    """One local least-squares solve; None when it fails or leaves the law's bounds."""
    kwargs = dict(method=method, jac=law.jacobian, ftol=1e-12, xtol=1e-12, gtol=1e-12)
    if method == "lm":
        kwargs["maxfev"] = 2000
    else:
        # trf needs a strictly feasible start and finite steps; nudge p0 inside the bounds.
        lower, upper = np.array(law.lower), np.array(law.upper)
        span = np.where(np.isfinite(upper - lower), upper - lower, np.abs(p0) + 1.0)
        p0 = np.clip(p0, lower + 1e-9 * span, upper - 1e-9 * span)
        kwargs.update(bounds=(lower, upper), max_nfev=2000)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            params, _ = scipy.optimize.curve_fit(law.func, x, y, p0=p0, **kwargs)
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError):
            return None
    # curve_fit can hand back p0 unchanged when the residuals are NaN: demand a finite SSE too
    valid = law.within_bounds(params) and np.isfinite(_sse(law, x, y, params))
    return params if valid else None


def _huber_objective(law: Law, x, y):
    """Mean Huber loss of log L_pred − log L_obs, scaled by 1/δ² so it is O(1) at residuals ~δ.

    The scaling only keeps L-BFGS-B's relative stopping rule meaningful for tiny objectives.
    """
    log_y = np.log(y)
    is_log = np.isin(law.param_names, law.log_space_params)

    def to_params(theta):
        return np.where(is_log, np.exp(theta), theta)

    def objective(theta):
        params = to_params(theta)
        with np.errstate(all="ignore"):
            pred = law.func(x, *params)
            if not np.all(np.isfinite(pred)) or np.any(pred <= 0):
                return np.inf, np.zeros_like(theta)
            r = np.log(pred) - log_y
            small = np.abs(r) <= HUBER_DELTA
            loss = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
            dloss_dr = np.where(small, r, HUBER_DELTA * np.sign(r))
            # chain rule: d log(pred)/dp = J / pred; d p/dθ = p for log-parametrised entries
            grad = (dloss_dr / pred) @ law.jacobian(x, *params)
            grad = np.where(is_log, grad * params, grad)
        scale = 1.0 / (len(y) * HUBER_DELTA**2)
        return float(loss.sum() * scale), grad * scale

    return objective, to_params, is_log


def _huber_lbfgs_solve(law: Law, x, y, p0) -> tuple[np.ndarray, float] | None:
    objective, to_params, is_log = _huber_objective(law, x, y)
    if np.any(p0[is_log] <= 0):
        return None
    theta0 = np.where(is_log, np.log(np.where(is_log, p0, 1.0)), p0)
    bounds = [
        (None, None) if log else (lo if np.isfinite(lo) else None, hi if np.isfinite(hi) else None)
        for log, lo, hi in zip(is_log, law.lower, law.upper)
    ]
    res = scipy.optimize.minimize(
        objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
        options=dict(maxiter=20000, maxfun=40000, ftol=1e-15, gtol=1e-12),
    )
    params = to_params(res.x)
    if not np.isfinite(res.fun) or not law.within_bounds(params):
        return None
    return params, float(res.fun)


def _sse(law: Law, x, y, params) -> float:
    with np.errstate(all="ignore"):
        value = float(np.sum((y - law.func(x, *params)) ** 2))
    return value if np.isfinite(value) else np.inf


def _starts(law: Law, x, y, n_starts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Best-ranked initial guesses (by SSE) for half the starts, jittered best guess for the rest."""
    with np.errstate(all="ignore"):
        guesses = [g for g in law.initial_guesses(x, y) if np.all(np.isfinite(g))]
    guesses.sort(key=lambda p: _sse(law, x, y, p))
    if not guesses:
        guesses = [np.clip(np.ones(law.n_params), law.lower, law.upper)]
    n_ranked = min(len(guesses), max(1, (n_starts + 1) // 2))
    starts = guesses[:n_ranked]
    while len(starts) < n_starts:
        # multiplicative jitter keeps each parameter's sign and order of magnitude
        starts.append(guesses[0] * np.exp(0.3 * rng.standard_normal(law.n_params)))
    return starts


def _best_local_fit(law: Law, x, y, starts) -> tuple[np.ndarray | None, str]:
    """Run the law's local optimiser from every start; return the best valid params and method."""
    if law.method == "huber_lbfgs":
        solutions = [s for s in (_huber_lbfgs_solve(law, x, y, p0) for p0 in starts) if s]
        if solutions:
            return min(solutions, key=lambda s: s[1])[0], "L-BFGS-B on log-space Huber"
        return None, ""
    for method in ("lm", "trf"):
        solutions = [s for s in (_lm_solve(law, x, y, p0, method) for p0 in starts) if s is not None]
        if solutions:
            return min(solutions, key=lambda p: _sse(law, x, y, p)), method
    return None, ""


def _result(law: Law, x, y, params, method: str, message: str) -> FitResult:
    success = params is not None
    if not success:
        params = np.full(law.n_params, np.nan)
    with np.errstate(all="ignore"):
        residuals = y - law.func(x, *params)
    sse = float(np.sum(residuals**2))
    sst = float(np.sum((y - y.mean()) ** 2))
    return FitResult(
        law=law,
        params=dict(zip(law.param_names, map(float, params))),
        param_array=np.asarray(params, dtype=float),
        residuals=residuals,
        sse=sse,
        r2=1.0 - sse / sst if sst > 0 else math.nan,
        n_points=len(y),
        success=success,
        message=message,
        method=method,
    )



# --------------------------------------------------------------------------------------------
# fit and bootstrap
# --------------------------------------------------------------------------------------------


def fit(law: str | Law, x, y, *, n_starts: int = 8, seed: int = 0) -> FitResult:
    """Fit ``law`` to points (x, y) with the law's method, multi-start; keep the best objective.

    x: D (n,) for the ratio laws and ``power_offset``; (n, 2) or a tuple (N, D) / (N, S) for
    ``chinchilla`` / ``qsparse``. ``n_starts`` local solves: the better half from the law's
    initial-guess grid, the rest jittered copies of the best guess (``seed`` drives the jitter).

    Raises ValueError on bad input (see module docstring). Never raises for non-convergence: the
    result then has ``success=False``, NaN parameters and a message.
    """
    law = get_law(law)
    x, y = validated_data(law, x, y)
    starts = _starts(law, x, y, n_starts, np.random.default_rng(seed))
    return _fit_from_starts(law, x, y, starts)


def _fit_from_starts(law: Law, x, y, starts) -> FitResult:
    params, method = _best_local_fit(law, x, y, starts)
    if params is None:
        message = (
            f"no start out of {len(starts)} converged to parameters within the bounds of "
            f"{law.name} ({dict(zip(law.param_names, zip(law.lower, law.upper)))})"
        )
        return _result(law, x, y, None, "", message)
    return _result(law, x, y, params, method, f"converged ({method}, best of {len(starts)} starts)")


def _resample_indices(rng: np.random.Generator, n: int, block: int) -> np.ndarray:
    """n indices: i.i.d. draws (block 1) or runs of ``block`` consecutive indices from random starts."""
    starts = rng.integers(0, n - block + 1, -(-n // block))
    return (starts[:, None] + np.arange(block)).reshape(-1)[:n]


def bootstrap(
    law: str | Law, x, y, *, n_boot: int = 200, level: float = 0.95, n_starts: int = 8, seed: int = 0,
    block: int = 1,
) -> FitResult:
    """:func:`fit`, plus percentile confidence intervals from a case-resampling bootstrap.

    Each of ``n_boot`` resamples draws n points with replacement and refits, starting from the
    full-data solution (the multi-start only if that fails). With ``block`` > 1 it is a moving-block
    bootstrap (Künsch 1989): points sorted by x are drawn as runs of ``block`` neighbours, which
    keeps serial correlation inside a resample; use it for dense, autocorrelated series such as
    per-step training statistics, where resampling single points gives too-narrow intervals.
    Resamples with fewer distinct points than parameters + 1, or whose refit fails, are skipped;
    ``n_boot_ok`` counts the rest. ``ci`` gets the ((1 − level)/2, (1 + level)/2) percentiles of the
    successful refits; it is None (and the message says why) when fewer than 2 refits succeeded.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    law = get_law(law)
    x, y = validated_data(law, x, y)
    if not 1 <= block <= len(y):
        raise ValueError(f"block must be in [1, {len(y)}] (the number of points); got {block}")
    if block > 1:
        if x.ndim != 1:
            raise ValueError(f"block > 1 needs one x per point (a series); {law.name} takes x of shape {x.shape}")
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
    rng = np.random.default_rng(seed)
    full = _fit_from_starts(law, x, y, _starts(law, x, y, n_starts, rng))
    if not full.success:
        return full
    samples = []
    for _ in range(n_boot):
        idx = _resample_indices(rng, len(y), block)
        if len(np.unique(idx)) < law.n_params + 1:
            continue
        xb, yb = x[idx], y[idx]
        params, _ = _best_local_fit(law, xb, yb, [full.param_array])
        if params is None:
            params, _ = _best_local_fit(law, xb, yb, _starts(law, xb, yb, n_starts, rng))
        if params is not None:
            samples.append(params)
    boot_params = np.array(samples).reshape(-1, law.n_params)
    ci, message = None, full.message + f"; bootstrap {len(samples)}/{n_boot} refits succeeded"
    if len(samples) >= 2:
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(boot_params, [tail, 100 - tail], axis=0)
        ci = {name: (float(a), float(b)) for name, a, b in zip(law.param_names, lo, hi)}
    else:
        message += " (too few for a confidence interval)"
    return dataclasses.replace(
        full, ci=ci, boot_params=boot_params, n_boot=n_boot, level=level, message=message
    )



# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def predict(result: FitResult, x) -> np.ndarray:
    """The fitted law evaluated at x (same layout and units as fitted); FitError if it failed."""
    if not result.success:
        raise FitError(f"cannot predict from a failed {result.law.name} fit: {result.message}")
    x = validated_x(result.law, x, allow_scalar=True)
    return result.law.func(x, *result.param_array)


def predict_band(
    result: FitResult, x, level: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(central, lo, hi) at x: the full-data fit and a percentile band over the bootstrap refits.

    The band is pointwise: at each x, the ((1 − level)/2, (1 + level)/2) percentiles of the
    bootstrap curves (``level`` defaults to the bootstrap's). It widens where the data no longer
    constrain the law, e.g. when extrapolating. Needs a :func:`bootstrap` result with ≥ 2 refits.
    """
    central = predict(result, x)
    if result.n_boot_ok < 2:
        raise FitError(
            f"{result.law.name}: predict_band needs bootstrap samples (call bootstrap(), got "
            f"{result.n_boot_ok} successful refits)"
        )
    level = result.level if level is None else level
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    x = validated_x(result.law, x, allow_scalar=True)
    with np.errstate(all="ignore"):
        curves = np.stack([result.law.func(x, *p) for p in result.boot_params])
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(curves, [tail, 100 - tail], axis=0)
    return central, lo, hi
