"""Loss laws for loss-vs-compute plots: Chinchilla and Q-Sparse; formulas:
docs/sparsity_metrics_and_laws.md §Laws.

``N`` and ``D`` / ``S`` are in whatever units the caller fits them in (predictions must use the
same units). One block per law: function, Jacobian, initial guesses, then ``register(Law(...))``.
"""

from __future__ import annotations

import math

import numpy as np

from sparsejax.laws.core import Law, linear_lstsq, register


# --------------------------------------------------------------------------------------------
# chinchilla: L(N, D) = E + A/N^α + B/D^β
# --------------------------------------------------------------------------------------------

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

def _chinchilla_guesses(ND, loss):
    """For a grid of (α, β), the loss is linear in (E, A, B)."""
    N, D = ND[:, 0], ND[:, 1]
    guesses = []
    for alpha in (0.1, 0.2, 0.35, 0.5, 0.8):
        for beta in (0.1, 0.2, 0.35, 0.5, 0.8):
            coef = linear_lstsq([np.ones_like(N), np.power(N, -alpha), np.power(D, -beta)], loss)
            if coef is not None:
                E, A, B = coef
                guesses.append(np.array([E, A, alpha, B, beta]))
    return guesses


register(Law(
    name="chinchilla",
    formula="L(N, D) = E + A/N^α + B/D^β",
    param_names=("E", "A", "alpha", "B", "beta"),
    func=chinchilla,
    jacobian=_chinchilla_jac,
    initial_guesses=_chinchilla_guesses,
    lower=(0.0, 0.0, 0.0, 0.0, 0.0),
    upper=(math.inf, math.inf, 5.0, math.inf, 5.0),
    x_names=("N", "D"),
    x_domains=("positive", "positive"),
    y_name="loss",
    y_domain="real",
    method="lm",
    citation="Hoffmann et al. 2022, Chinchilla, arXiv 2203.15556",
))


# --------------------------------------------------------------------------------------------
# qsparse: L(N, S) = E + (B + C·exp(β/(1−S)))/N^α
# --------------------------------------------------------------------------------------------

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

def _qsparse_guesses(NS, loss):
    """For a grid of (β, α), the loss is linear in (E, B, C); E, B, C are kept positive."""
    N, S = NS[:, 0], NS[:, 1]
    guesses = []
    floor = 1e-6 * float(np.mean(loss))
    for alpha in (0.1, 0.2, 0.35, 0.5):
        N_pow = np.power(N, -alpha)
        for beta in (0.1, 0.3, 0.6, 1.0, 2.0):
            coef = linear_lstsq([np.ones_like(N), N_pow, np.exp(beta / (1 - S)) * N_pow], loss)
            if coef is not None:
                E, B, C = np.maximum(coef, floor)
                guesses.append(np.array([E, B, C, beta, alpha]))
    return guesses


register(Law(
    name="qsparse",
    formula="L(N, S) = E + (B + C·exp(β/(1−S)))/N^α",
    param_names=("E", "B", "C", "beta", "alpha"),
    func=qsparse,
    jacobian=_qsparse_jac,
    initial_guesses=_qsparse_guesses,
    # β is bounded only to keep exp(β/(1 − S)) finite.
    lower=(0.0, 0.0, 0.0, -10.0, 0.0),
    upper=(math.inf, math.inf, math.inf, 10.0, 5.0),
    x_names=("N", "S"),
    x_domains=("positive", "fraction"),
    y_name="loss",
    y_domain="positive",
    method="huber_lbfgs",
    citation="Wang et al. 2024, Q-Sparse, arXiv 2407.10969",
    log_space_params=("E", "B", "C"),
))
