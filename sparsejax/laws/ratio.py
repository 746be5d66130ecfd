"""Activation-ratio laws of the Sparsing Law paper (Luo et al. 2024, arXiv 2411.02335) and their
published coefficients; formulas and fits: docs/sparsity_metrics_and_laws.md §Laws.

``D`` is training tokens / 1e9. One block per law: function, Jacobian, initial guesses, then
``register(Law(...))``.
"""

from __future__ import annotations

import math

import numpy as np

from sparsejax.laws.core import LAWS, Law, linear_lstsq, register

SPARSING_LAW = "Luo et al. 2024, Sparsing Law, arXiv 2411.02335"
# What the two activation-ratio laws share: x is D (tokens / 1e9), y a ratio in [0, 1], LM fit.
_RATIO_VS_TOKENS = dict(x_names=("D",), x_domains=("positive",), y_name="activation ratio",
                        y_domain="ratio", method="lm", citation=SPARSING_LAW)


# --------------------------------------------------------------------------------------------
# relu_ratio: A(D) = exp(−c·D^α + b) + A0
# --------------------------------------------------------------------------------------------

def relu_ratio(D, alpha, b, c, A0):
    """ReLU activation ratio vs data: ``A(D) = exp(−c·D^α + b) + A0``.

    Sparsing Law (Luo et al. 2024, arXiv 2411.02335); D = training tokens / 1e9. The ratio
    falls from ``exp(b) + A0`` towards the limit ``A0``.
    """
    return np.exp(b - c * np.power(D, alpha)) + A0


def _relu_ratio_jac(D, alpha, b, c, A0):
    D_pow = np.power(D, alpha)
    decay = np.exp(b - c * D_pow)
    return np.stack([-decay * c * D_pow * np.log(D), decay, -decay * D_pow, np.ones_like(D)], axis=1)


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
            coef = linear_lstsq([np.ones_like(D), -np.power(D, alpha)], np.log(gap))
            if coef is not None:
                guesses.append(np.array([alpha, coef[0], max(coef[1], 1e-6), limit]))
    return guesses



register(Law(
    name="relu_ratio",
    formula="A(D) = exp(−c·D^α + b) + A0",
    param_names=("alpha", "b", "c", "A0"),
    func=relu_ratio,
    jacobian=_relu_ratio_jac,
    initial_guesses=_relu_ratio_guesses,
    # α and b are bounded only to keep exp/pow finite; c ≥ 0 keeps the ratio falling.
    lower=(0.0, -50.0, 0.0, 0.0),
    upper=(10.0, 50.0, math.inf, 1.0),
    **_RATIO_VS_TOKENS,
))


# --------------------------------------------------------------------------------------------
# silu_ratio: A(D) = −c·D^(−α) + A0
# --------------------------------------------------------------------------------------------

def silu_ratio(D, alpha, c, A0):
    """SiLU activation ratio vs data: ``A(D) = −c·D^(−α) + A0``.

    Sparsing Law (arXiv 2411.02335); D = training tokens / 1e9. The ratio rises towards the
    limit ``A0`` as a power law.
    """
    return A0 - c * np.power(D, -alpha)


def _silu_ratio_jac(D, alpha, c, A0):
    D_pow = np.power(D, -alpha)
    return np.stack([c * D_pow * np.log(D), -D_pow, np.ones_like(D)], axis=1)


def _silu_ratio_guesses(D, ratio):
    """For a grid of α, ``A = A0 − c·D^(−α)`` is linear in (A0, c)."""
    guesses = []
    for alpha in (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0):
        coef = linear_lstsq([np.ones_like(D), -np.power(D, -alpha)], ratio)
        if coef is not None:
            guesses.append(np.array([alpha, coef[1], np.clip(coef[0], 0.0, 1.0)]))
    return guesses


register(Law(
    name="silu_ratio",
    formula="A(D) = −c·D^(−α) + A0",
    param_names=("alpha", "c", "A0"),
    func=silu_ratio,
    jacobian=_silu_ratio_jac,
    initial_guesses=_silu_ratio_guesses,
    lower=(0.0, 0.0, 0.0),
    upper=(10.0, math.inf, 1.0),
    **_RATIO_VS_TOKENS,
))


# --------------------------------------------------------------------------------------------
# power_offset: y = a·x^k + y0 (limit ratio vs width/depth)
# --------------------------------------------------------------------------------------------

def power_offset(x, a, k, y0):
    """Power law with offset ``y = a·x^k + y0``.

    Used for the limit activation ratio against width/depth ratio (Sparsing Law arXiv 2411.02335:
    the limit rises with width/depth, then flattens; docs/sparsity_metrics_and_laws.md §Laws).
    """
    return a * np.power(x, k) + y0


def _power_offset_jac(x, a, k, y0):
    x_pow = np.power(x, k)
    return np.stack([x_pow, a * x_pow * np.log(x), np.ones_like(x)], axis=1)

def _power_offset_guesses(x, y):
    """For a grid of exponents k, ``y = a·x^k + y0`` is linear in (a, y0)."""
    guesses = []
    for k in (-2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 2.0):
        coef = linear_lstsq([np.power(x, k), np.ones_like(x)], y)
        if coef is not None:
            guesses.append(np.array([coef[0], k, coef[1]]))
    return guesses


register(Law(
    name="power_offset",
    formula="y = a·x^k + y0",
    param_names=("a", "k", "y0"),
    func=power_offset,
    jacobian=_power_offset_jac,
    initial_guesses=_power_offset_guesses,
    lower=(-math.inf, -10.0, -math.inf),
    upper=(math.inf, 10.0, math.inf),
    x_names=("x",),
    x_domains=("positive",),
    y_name="y",
    y_domain="real",
    method="lm",
    citation=SPARSING_LAW + ", limit ratio vs width/depth",
))


# --------------------------------------------------------------------------------------------
# Published coefficients (Sparsing Law, fits of the activation ratio per model size)
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
