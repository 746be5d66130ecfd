"""Small statistics for reading sweeps against the Sparsing Law findings (arXiv 2411.02335).

- :func:`fit_line`: ordinary least squares ``y = slope·x + intercept`` with Student-t confidence
  intervals and a confidence band of the fitted line (width/depth finding: the activation ratio
  rises roughly linearly with width/depth below a bottleneck; scale finding: the limit A0 per decade
  of parameters).
- :func:`mean_spread`: mean and half-range over seeds (``mean ± spread``).
- :func:`converged_tokens`: model-free "how fast does the ratio settle": the tokens after which a
  smoothed curve stays within a fraction of its total change from its final level.
- :func:`limit_approach_D`: the same question asked of a fitted ratio law: the D at which the
  law's transient term has shrunk to a fraction of its limit A0 (closed form per law).

Pure NumPy/SciPy; no JAX.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class LineFit:
    slope: float
    intercept: float
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    slope_se: float
    intercept_se: float
    residual_sd: float  # sqrt(SSE / (n − 2))
    r2: float
    n: int
    level: float
    x_mean: float
    sxx: float  # Σ (x − x̄)²

    def predict(self, x) -> np.ndarray:
        return self.slope * np.asarray(x, dtype=float) + self.intercept

    def band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Confidence band of the fitted line (the mean response) at ``x``, at ``level``."""
        x = np.asarray(x, dtype=float)
        t = stats.t.ppf(0.5 + self.level / 2, self.n - 2)
        half = t * self.residual_sd * np.sqrt(1.0 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        y = self.predict(x)
        return y - half, y + half

    def slope_excludes_zero(self) -> bool:
        lo, hi = self.slope_ci
        return lo > 0 or hi < 0


def fit_line(x, y, level: float = 0.95) -> LineFit:
    """OLS line through (x, y) with ``level`` Student-t intervals (n − 2 degrees of freedom).

    Raises ValueError for fewer than 3 points, non-finite values or constant x.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.shape} vs {y.shape}")
    if len(x) < 3:
        raise ValueError(f"a line with a confidence interval needs >= 3 points, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    n, x_mean, y_mean = len(x), float(x.mean()), float(y.mean())
    sxx = float(np.sum((x - x_mean) ** 2))
    if sxx == 0:
        raise ValueError("x is constant: the slope is not identified")
    slope = float(np.sum((x - x_mean) * (y - y_mean)) / sxx)
    intercept = y_mean - slope * x_mean
    residuals = y - (slope * x + intercept)
    sse, sst = float(np.sum(residuals**2)), float(np.sum((y - y_mean) ** 2))
    s = math.sqrt(sse / (n - 2))
    slope_se = s / math.sqrt(sxx)
    intercept_se = s * math.sqrt(1.0 / n + x_mean**2 / sxx)
    t = float(stats.t.ppf(0.5 + level / 2, n - 2))
    return LineFit(slope=slope, intercept=intercept,
                   slope_ci=(slope - t * slope_se, slope + t * slope_se),
                   intercept_ci=(intercept - t * intercept_se, intercept + t * intercept_se),
                   slope_se=slope_se, intercept_se=intercept_se, residual_sd=s,
                   r2=1.0 - sse / sst if sst > 0 else 1.0, n=n, level=level, x_mean=x_mean, sxx=sxx)


def mean_spread(values) -> tuple[float, float]:
    """(mean, half of max − min): the ``mean ± spread`` of a few seeds."""
    v = np.asarray(values, dtype=float).ravel()
    if not len(v):
        raise ValueError("no values")
    return float(v.mean()), float((v.max() - v.min()) / 2)


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points (fewer at the start)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def converged_tokens(tokens, values, *, tol: float = 0.1, tail: float = 0.1, window: int = 5) -> float:
    """Tokens after which the (trailing ``window``-point mean) curve stays within ``tol`` of its
    total change from its final level.

    Final level L: the mean of the last ``tail`` share of the points (by tokens, at least one);
    total change: |s₀ − L| with s₀ the first smoothed point. Returns the smallest token count t such
    that every smoothed point at or after t lies within ``tol·|s₀ − L|`` of L (the first point's
    tokens if the curve never leaves that band). A model-free measure of how fast a ratio
    settles: smaller means faster (Sparsing Law: smaller models converge to their limit faster).
    """
    x, y = np.asarray(tokens, dtype=float).ravel(), np.asarray(values, dtype=float).ravel()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need >= 2 (tokens, value) points of equal length, got {x.shape}, {y.shape}")
    if not 0 < tol < 1 or not 0 < tail <= 1 or window < 1:
        raise ValueError(f"tol={tol} must be in (0, 1), tail={tail} in (0, 1], window={window} >= 1")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    smooth = _moving_average(y, window)
    k = max(1, int(round(tail * len(y))))
    final = float(np.mean(y[-k:]))
    band = tol * abs(smooth[0] - final)
    outside = np.flatnonzero(np.abs(smooth - final) > band)
    if not len(outside):
        return float(x[0])
    last_out = outside[-1]
    return float(x[min(last_out + 1, len(x) - 1)])


def limit_approach_D(law: str, params, frac: float = 0.1) -> float:
    """D (tokens / 1e9) at which a fitted ratio law's transient term is ``frac``·A0.

    ``relu_ratio`` A = exp(b − c·D^α) + A0: exp(b − c·D^α) = frac·A0 ⇒ D = ((b − ln(frac·A0))/c)^(1/α)
    (0 when the transient is already below frac·A0 at D → 0). ``silu_ratio`` A = −c·D^(−α) + A0:
    c·D^(−α) = frac·A0 ⇒ D = (c/(frac·A0))^(1/α). ``params``: a mapping of the law's parameters.
    Infinite when the law never gets there (c = 0 or A0 = 0).
    """
    if not frac > 0:
        raise ValueError(f"frac={frac} must be > 0")
    p = dict(params)
    A0, alpha, c = float(p["A0"]), float(p["alpha"]), float(p["c"])
    if A0 <= 0 or c <= 0 or alpha <= 0:
        return math.inf
    target = frac * A0
    if law == "relu_ratio":
        top = float(p["b"]) - math.log(target)
        return 0.0 if top <= 0 else (top / c) ** (1.0 / alpha)
    if law == "silu_ratio":
        return (c / target) ** (1.0 / alpha)
    raise ValueError(f"limit_approach_D: law {law!r} unknown; allowed: relu_ratio, silu_ratio")
