"""Scaling laws of activation ratio and loss, with robust multi-start fitting and bootstrap CIs.

Laws (SPEC §2–3), each a :class:`Law` in the registry :data:`LAWS`:

- ``relu_ratio``  ``A(D) = exp(−c·D^α + b) + A0``            Sparsing Law (arXiv 2411.02335), ReLU
- ``silu_ratio``  ``A(D) = −c·D^(−α) + A0``                  Sparsing Law (arXiv 2411.02335), SiLU
- ``chinchilla``  ``L(N, D) = E + A/N^α + B/D^β``             Chinchilla (arXiv 2203.15556)
- ``qsparse``     ``L(N, S) = E + (B + C·exp(β/(1−S)))/N^α``  Q-Sparse (arXiv 2407.10969)
- ``power_offset`` ``y = a·x^k + y0``  (limit ratio vs width/depth, Sparsing Law)

``D`` is training tokens / 1e9 for the ratio laws; the loss laws take ``N`` and ``D`` in whatever
units the caller fits them in (predictions must use the same units).

Fitting (:func:`fit`) follows the papers: Levenberg–Marquardt least squares
(``scipy.optimize.curve_fit(method="lm")``) for the ratio laws, Chinchilla and ``power_offset``;
L-BFGS-B on a Huber loss (δ = 1e-3) of log-space residuals for Q-Sparse. Every fit is
multi-start — the law's initial-guess strategy solves the parameters that enter linearly for a grid
of the nonlinear ones (variable projection), plus random jitter of the best guess — and keeps the
lowest objective. LM ignores bounds, so a solution outside the law's bounds (e.g. A0 ∉ [0, 1]) is
rejected and the next start is tried; if no LM start gives a valid solution, bounded ``"trf"`` is
tried from the same starts.

Error policy:

- bad *input* (too few points, NaN/Inf, mismatched shapes, out-of-domain x or y, unknown law name)
  raises ``ValueError`` naming the problem;
- a fit that does not converge to a valid solution does **not** raise: :func:`fit` and
  :func:`bootstrap` return a :class:`FitResult` with ``success=False``, NaN parameters and the
  reason in ``message``; :func:`predict` and :func:`predict_band` raise :class:`FitError` on such a
  result, so a failed fit can never turn into numbers silently.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Sequence

import numpy as np
import scipy.optimize

HUBER_DELTA = 1e-3  # Q-Sparse / Chinchilla use δ = 1e-3 on log-space residuals (SPEC §3)


class FitError(RuntimeError):
    """Raised when numbers are asked of a fit that did not succeed."""


# --------------------------------------------------------------------------------------------
# Law functions and their Jacobians (x is (n,) for one-variable laws, (n, 2) for two-variable ones)
# --------------------------------------------------------------------------------------------


def relu_ratio(D, alpha, b, c, A0):
    """ReLU activation ratio vs data: ``A(D) = exp(−c·D^α + b) + A0``.

    Sparsing Law (Luo et al. 2024, arXiv 2411.02335), SPEC §2; D = training tokens / 1e9. The ratio
    falls from ``exp(b) + A0`` towards the limit ``A0``.
    """
    return np.exp(b - c * np.power(D, alpha)) + A0


def _relu_ratio_jac(D, alpha, b, c, A0):
    D_pow = np.power(D, alpha)
    decay = np.exp(b - c * D_pow)
    return np.stack([-decay * c * D_pow * np.log(D), decay, -decay * D_pow, np.ones_like(D)], axis=1)


def silu_ratio(D, alpha, c, A0):
    """SiLU activation ratio vs data: ``A(D) = −c·D^(−α) + A0``.

    Sparsing Law (arXiv 2411.02335), SPEC §2; D = training tokens / 1e9. The ratio rises towards the
    limit ``A0`` as a power law.
    """
    return A0 - c * np.power(D, -alpha)


def _silu_ratio_jac(D, alpha, c, A0):
    D_pow = np.power(D, -alpha)
    return np.stack([c * D_pow * np.log(D), -D_pow, np.ones_like(D)], axis=1)


def chinchilla(ND, E, A, alpha, B, beta):
    """Chinchilla loss law ``L(N, D) = E + A/N^α + B/D^β`` (Hoffmann et al. 2022, arXiv 2203.15556).

    ``ND`` has shape (n, 2): column 0 is parameters N, column 1 is training tokens D.
    """
    N, D = ND[:, 0], ND[:, 1]
    return E + A * np.power(N, -alpha) + B * np.power(D, -beta)


def _chinchilla_jac(ND, E, A, alpha, B, beta):
    N, D = ND[:, 0], ND[:, 1]
    N_pow, D_pow = np.power(N, -alpha), np.power(D, -beta)
    return np.stack(
        [np.ones_like(N), N_pow, -A * N_pow * np.log(N), D_pow, -B * D_pow * np.log(D)], axis=1
    )


def qsparse(NS, E, B, C, beta, alpha):
    """Q-Sparse loss law ``L(N, S) = E + (B + C·exp(β/(1−S)))/N^α`` (Wang et al. 2024, arXiv 2407.10969).

    ``NS`` has shape (n, 2): column 0 is parameters N, column 1 is sparsity S in [0, 1).
    """
    N, S = NS[:, 0], NS[:, 1]
    return E + (B + C * np.exp(beta / (1.0 - S))) * np.power(N, -alpha)


def _qsparse_jac(NS, E, B, C, beta, alpha):
    N, S = NS[:, 0], NS[:, 1]
    N_pow = np.power(N, -alpha)
    sparsity_term = np.exp(beta / (1.0 - S))
    amplitude = B + C * sparsity_term
    return np.stack(
        [
            np.ones_like(N),
            N_pow,
            sparsity_term * N_pow,
            C * sparsity_term / (1.0 - S) * N_pow,
            -amplitude * N_pow * np.log(N),
        ],
        axis=1,
    )


def power_offset(x, a, k, y0):
    """Power law with offset ``y = a·x^k + y0``.

    Used for the limit activation ratio against width/depth ratio (Sparsing Law arXiv 2411.02335:
    the limit rises with width/depth, then flattens; SPEC §2).
    """
    return a * np.power(x, k) + y0


def _power_offset_jac(x, a, k, y0):
    x_pow = np.power(x, k)
    return np.stack([x_pow, a * x_pow * np.log(x), np.ones_like(x)], axis=1)


# --------------------------------------------------------------------------------------------
# Initial-guess strategies: grid the nonlinear parameters, solve the linear ones by least squares
# --------------------------------------------------------------------------------------------


def _linear_lstsq(columns: Sequence[np.ndarray], y: np.ndarray) -> np.ndarray | None:
    design = np.stack(columns, axis=1)
    if not np.all(np.isfinite(design)):
        return None
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef if np.all(np.isfinite(coef)) else None


def _relu_ratio_guesses(D, ratio):
    """For a grid of (α, A0 below min ratio), ``log(A − A0) = b − c·D^α`` is linear in (b, c)."""
    lowest, spread = ratio.min(), np.ptp(ratio)
    limit_candidates = {lowest * f for f in (0.0, 0.5, 0.9, 0.99)} | {
        lowest - f * spread for f in (0.01, 0.1, 0.3)
    }
    guesses = []
    for limit in sorted(x for x in limit_candidates if x >= 0.0):
        gap = ratio - limit
        if np.any(gap <= 0):
            continue
        for alpha in (0.1, 0.25, 0.5, 0.75, 1.0, 1.5):
            coef = _linear_lstsq([np.ones_like(D), -np.power(D, alpha)], np.log(gap))
            if coef is not None:
                guesses.append(np.array([alpha, coef[0], max(coef[1], 1e-6), limit]))
    return guesses


def _silu_ratio_guesses(D, ratio):
    """For a grid of α, ``A = A0 − c·D^(−α)`` is linear in (A0, c)."""
    guesses = []
    for alpha in (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0):
        coef = _linear_lstsq([np.ones_like(D), -np.power(D, -alpha)], ratio)
        if coef is not None:
            guesses.append(np.array([alpha, coef[1], np.clip(coef[0], 0.0, 1.0)]))
    return guesses


def _chinchilla_guesses(ND, loss):
    """For a grid of (α, β), the loss is linear in (E, A, B)."""
    N, D = ND[:, 0], ND[:, 1]
    guesses = []
    for alpha in (0.1, 0.2, 0.35, 0.5, 0.8):
        for beta in (0.1, 0.2, 0.35, 0.5, 0.8):
            coef = _linear_lstsq([np.ones_like(N), np.power(N, -alpha), np.power(D, -beta)], loss)
            if coef is not None:
                E, A, B = coef
                guesses.append(np.array([E, A, alpha, B, beta]))
    return guesses


def _qsparse_guesses(NS, loss):
    """For a grid of (β, α), the loss is linear in (E, B, C); E, B, C are kept positive."""
    N, S = NS[:, 0], NS[:, 1]
    guesses = []
    floor = 1e-6 * float(np.mean(loss))
    for alpha in (0.1, 0.2, 0.35, 0.5):
        N_pow = np.power(N, -alpha)
        for beta in (0.1, 0.3, 0.6, 1.0, 2.0):
            coef = _linear_lstsq([np.ones_like(N), N_pow, np.exp(beta / (1 - S)) * N_pow], loss)
            if coef is not None:
                E, B, C = np.maximum(coef, floor)
                guesses.append(np.array([E, B, C, beta, alpha]))
    return guesses


def _power_offset_guesses(x, y):
    """For a grid of exponents k, ``y = a·x^k + y0`` is linear in (a, y0)."""
    guesses = []
    for k in (-2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 2.0):
        coef = _linear_lstsq([np.power(x, k), np.ones_like(x)], y)
        if coef is not None:
            guesses.append(np.array([coef[0], k, coef[1]]))
    return guesses


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# Domain tags checked by the input validation: "positive" (> 0, powers and logs need it),
# "fraction" ([0, 1) — a sparsity S with 1/(1 − S)), "ratio" ([0, 1]), "real" (finite).
_DOMAIN_TEXT = {"positive": "> 0", "fraction": "in [0, 1)", "ratio": "in [0, 1]", "real": "finite"}


@dataclasses.dataclass(frozen=True)
class Law:
    """A named scaling law: formula, parameters, vectorised function and how to fit it."""

    name: str
    formula: str
    param_names: tuple[str, ...]
    func: Callable[..., np.ndarray]  # func(x, *params) -> predictions, shape (n,)
    jacobian: Callable[..., np.ndarray]  # jacobian(x, *params) -> shape (n, n_params)
    initial_guesses: Callable[[np.ndarray, np.ndarray], list[np.ndarray]]  # (x, y) -> p0 list
    lower: tuple[float, ...]  # bounds: LM solutions outside them are rejected
    upper: tuple[float, ...]
    x_names: tuple[str, ...]  # one name per x column, e.g. ("N", "D")
    x_domains: tuple[str, ...]  # one domain tag per x column
    y_name: str
    y_domain: str
    method: str  # "lm": Levenberg–Marquardt least squares; "huber_lbfgs": L-BFGS-B on log-space Huber
    citation: str
    # "huber_lbfgs" only: parameters optimised as logs, which keeps them positive and puts
    # parameters of very different magnitude on one scale for L-BFGS.
    log_space_params: tuple[str, ...] = ()

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def __call__(self, x, *params) -> np.ndarray:
        return self.func(_as_x(self, x, allow_scalar=True), *params)

    def within_bounds(self, params: np.ndarray) -> bool:
        return bool(
            np.all(np.isfinite(params)) and np.all(params >= self.lower) and np.all(params <= self.upper)
        )


_INF = math.inf
_SPARSING_LAW = "Luo et al. 2024, Sparsing Law, arXiv 2411.02335 (SPEC §2)"

LAWS: dict[str, Law] = {
    law.name: law
    for law in (
        Law(
            name="relu_ratio",
            formula="A(D) = exp(−c·D^α + b) + A0",
            param_names=("alpha", "b", "c", "A0"),
            func=relu_ratio,
            jacobian=_relu_ratio_jac,
            initial_guesses=_relu_ratio_guesses,
            # α and b are bounded only to keep exp/pow finite; c ≥ 0 keeps the ratio falling.
            lower=(0.0, -50.0, 0.0, 0.0),
            upper=(10.0, 50.0, _INF, 1.0),
            x_names=("D",),
            x_domains=("positive",),
            y_name="activation ratio",
            y_domain="ratio",
            method="lm",
            citation=_SPARSING_LAW,
        ),
        Law(
            name="silu_ratio",
            formula="A(D) = −c·D^(−α) + A0",
            param_names=("alpha", "c", "A0"),
            func=silu_ratio,
            jacobian=_silu_ratio_jac,
            initial_guesses=_silu_ratio_guesses,
            lower=(0.0, 0.0, 0.0),
            upper=(10.0, _INF, 1.0),
            x_names=("D",),
            x_domains=("positive",),
            y_name="activation ratio",
            y_domain="ratio",
            method="lm",
            citation=_SPARSING_LAW,
        ),
        Law(
            name="chinchilla",
            formula="L(N, D) = E + A/N^α + B/D^β",
            param_names=("E", "A", "alpha", "B", "beta"),
            func=chinchilla,
            jacobian=_chinchilla_jac,
            initial_guesses=_chinchilla_guesses,
            lower=(0.0, 0.0, 0.0, 0.0, 0.0),
            upper=(_INF, _INF, 5.0, _INF, 5.0),
            x_names=("N", "D"),
            x_domains=("positive", "positive"),
            y_name="loss",
            y_domain="real",
            method="lm",
            citation="Hoffmann et al. 2022, Chinchilla, arXiv 2203.15556 (SPEC §3)",
        ),
        Law(
            name="qsparse",
            formula="L(N, S) = E + (B + C·exp(β/(1−S)))/N^α",
            param_names=("E", "B", "C", "beta", "alpha"),
            func=qsparse,
            jacobian=_qsparse_jac,
            initial_guesses=_qsparse_guesses,
            # β is bounded only to keep exp(β/(1 − S)) finite.
            lower=(0.0, 0.0, 0.0, -10.0, 0.0),
            upper=(_INF, _INF, _INF, 10.0, 5.0),
            x_names=("N", "S"),
            x_domains=("positive", "fraction"),
            y_name="loss",
            y_domain="positive",
            method="huber_lbfgs",
            citation="Wang et al. 2024, Q-Sparse, arXiv 2407.10969 (SPEC §3)",
            log_space_params=("E", "B", "C"),
        ),
        Law(
            name="power_offset",
            formula="y = a·x^k + y0",
            param_names=("a", "k", "y0"),
            func=power_offset,
            jacobian=_power_offset_jac,
            initial_guesses=_power_offset_guesses,
            lower=(-_INF, -10.0, -_INF),
            upper=(_INF, 10.0, _INF),
            x_names=("x",),
            x_domains=("positive",),
            y_name="y",
            y_domain="real",
            method="lm",
            citation=_SPARSING_LAW + ", limit ratio vs width/depth",
        ),
    )
}


def get_law(law: str | Law) -> Law:
    """The :class:`Law` for a registry name (or the law itself); ValueError lists valid names."""
    if isinstance(law, Law):
        return law
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; valid names: {sorted(LAWS)}")
    return LAWS[law]


# --------------------------------------------------------------------------------------------
# Published coefficients (SPEC §2, Sparsing Law Table)
# --------------------------------------------------------------------------------------------

PUBLISHED_LAW = {"relu": "relu_ratio", "silu": "silu_ratio"}

PUBLISHED: dict[tuple[str, str], dict[str, float]] = {
    ("relu", "0.1B"): {"alpha": 0.101, "b": -0.0151, "c": 3.20, "A0": 0.0614},
    ("relu", "0.2B"): {"alpha": 0.449, "b": -3.05, "c": 0.286, "A0": 0.0674},
    ("relu", "0.4B"): {"alpha": 0.683, "b": -3.46, "c": 0.0790, "A0": 0.0690},
    ("relu", "0.8B"): {"alpha": 1.01, "b": -3.49, "c": 7.97e-3, "A0": 0.0721},
    ("relu", "1.2B"): {"alpha": 1.33, "b": -3.89, "c": 9.03e-4, "A0": 0.0782},
    ("silu", "0.1B"): {"alpha": 0.479, "c": 0.102, "A0": 0.409},
    ("silu", "0.2B"): {"alpha": 0.844, "c": 0.208, "A0": 0.390},
    ("silu", "0.4B"): {"alpha": 1.03, "c": 0.420, "A0": 0.385},
    ("silu", "0.8B"): {"alpha": 0.995, "c": 0.562, "A0": 0.383},
    ("silu", "1.2B"): {"alpha": 0.967, "c": 0.538, "A0": 0.382},
}


def published_params(activation: str, size: str) -> np.ndarray:
    """Published parameters of (activation, size), ordered as the law's ``param_names``."""
    key = (activation.lower(), size.upper())
    if key not in PUBLISHED:
        raise ValueError(f"no published fit for {key}; available: {sorted(PUBLISHED)}")
    law = LAWS[PUBLISHED_LAW[key[0]]]
    return np.array([PUBLISHED[key][name] for name in law.param_names])


def published_curve(activation: str, size: str, D) -> np.ndarray:
    """Activation ratio at D (tokens / 1e9) from the published fit of (activation, size)."""
    params = published_params(activation, size)
    return LAWS[PUBLISHED_LAW[activation.lower()]](D, *params)


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
# Input validation
# --------------------------------------------------------------------------------------------


def _as_x(law: Law, x, *, allow_scalar: bool = False) -> np.ndarray:
    """x as float array: (n,) for one-variable laws (or () if allowed), (n, 2) for two-variable ones."""
    n_cols = len(law.x_names)
    if n_cols == 1:
        x = np.asarray(x, dtype=float)
        if x.ndim != 1 and not (allow_scalar and x.ndim == 0):
            raise ValueError(f"{law.name}: x ({law.x_names[0]}) must be 1-D; got shape {x.shape}")
        return x
    if isinstance(x, (tuple, list)) and len(x) == n_cols:
        columns = [np.asarray(col, dtype=float) for col in x]
        if any(col.ndim != 1 for col in columns) or len({len(col) for col in columns}) != 1:
            raise ValueError(
                f"{law.name}: x columns {law.x_names} must be 1-D of equal length; "
                f"got shapes {[col.shape for col in columns]}"
            )
        return np.stack(columns, axis=1)
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[1] != n_cols:
        raise ValueError(
            f"{law.name}: x must have shape (n, {n_cols}) with columns {law.x_names} "
            f"(or be a tuple of {n_cols} arrays); got shape {x.shape}"
        )
    return x


def _check_domain(values: np.ndarray, domain: str, what: str, law: Law) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{law.name}: {what} contains NaN or Inf")
    bad = {
        "positive": values <= 0,
        "fraction": (values < 0) | (values >= 1),
        "ratio": (values < 0) | (values > 1),
        "real": np.zeros(values.shape, bool),
    }[domain]
    if np.any(bad):
        raise ValueError(
            f"{law.name}: {what} must be {_DOMAIN_TEXT[domain]}; "
            f"got {int(bad.sum())} value(s) outside, e.g. {values[bad][0]:g}"
        )


def _validated_x(law: Law, x, *, allow_scalar: bool = False) -> np.ndarray:
    x = _as_x(law, x, allow_scalar=allow_scalar)
    columns = x.reshape(-1, len(law.x_names))
    for col, name, domain in zip(columns.T, law.x_names, law.x_domains):
        _check_domain(col, domain, f"x column {name!r}", law)
    return x


def _validated_data(law: Law, x, y) -> tuple[np.ndarray, np.ndarray]:
    x = _validated_x(law, x)
    y = np.asarray(y, dtype=float)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(
            f"{law.name}: y must be 1-D with one value per x point ({len(x)}); got shape {y.shape}"
        )
    _check_domain(y, law.y_domain, f"y ({law.y_name})", law)
    if len(y) < law.n_params + 1:
        raise ValueError(
            f"{law.name}: needs at least {law.n_params + 1} points for {law.n_params} parameters; "
            f"got {len(y)}"
        )
    return x, y


# --------------------------------------------------------------------------------------------
# Fitting
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


def fit(law: str | Law, x, y, *, n_starts: int = 8, seed: int = 0) -> FitResult:
    """Fit ``law`` to points (x, y) with the law's method, multi-start; keep the best objective.

    x: D (n,) for the ratio laws and ``power_offset``; (n, 2) or a tuple (N, D) / (N, S) for
    ``chinchilla`` / ``qsparse``. ``n_starts`` local solves: the better half from the law's
    initial-guess grid, the rest jittered copies of the best guess (``seed`` drives the jitter).

    Raises ValueError on bad input (see module docstring). Never raises for non-convergence: the
    result then has ``success=False``, NaN parameters and a message.
    """
    law = get_law(law)
    x, y = _validated_data(law, x, y)
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
    x, y = _validated_data(law, x, y)
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
    x = _validated_x(result.law, x, allow_scalar=True)
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
    x = _validated_x(result.law, x, allow_scalar=True)
    with np.errstate(all="ignore"):
        curves = np.stack([result.law.func(x, *p) for p in result.boot_params])
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(curves, [tail, 100 - tail], axis=0)
    return central, lo, hi
