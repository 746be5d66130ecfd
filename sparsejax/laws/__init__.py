"""Scaling laws of activation ratio and loss, with robust multi-start fitting and bootstrap CIs.

Laws (docs/sparsity_metrics_and_laws.md §Laws), each a :class:`Law` in the registry :data:`LAWS`:

- ``relu_ratio``  ``A(D) = exp(−c·D^α + b) + A0``            Sparsing Law (arXiv 2411.02335), ReLU
- ``silu_ratio``  ``A(D) = −c·D^(−α) + A0``                  Sparsing Law (arXiv 2411.02335), SiLU
- ``chinchilla``  ``L(N, D) = E + A/N^α + B/D^β``             Chinchilla (arXiv 2203.15556)
- ``qsparse``     ``L(N, S) = E + (B + C·exp(β/(1−S)))/N^α``  Q-Sparse (arXiv 2407.10969)
- ``power_offset`` ``y = a·x^k + y0``  (limit ratio vs width/depth, Sparsing Law)

``D`` is training tokens / 1e9 for the ratio laws; the loss laws take ``N`` and ``D`` in whatever
units the caller fits them in (predictions must use the same units).

Modules: :mod:`.core` (the :class:`Law` record, the registry, input validation), :mod:`.ratio`
(the activation-ratio laws, ``power_offset`` and the published coefficients), :mod:`.loss`
(Chinchilla, Q-Sparse) and :mod:`.fitting` (:func:`fit`, :func:`bootstrap`, :func:`predict`,
:func:`predict_band`); :mod:`.analysis` reads sweeps against the findings (a least-squares line with
t intervals, mean ± spread over seeds, tokens until a ratio settles, D at which a fitted law nears
its limit) and is imported as ``from sparsejax.laws import analysis``. Each law is one block in
its module — function, Jacobian, initial guesses and ``register(Law(...))`` — so adding a law is
adding one block; everything public is re-exported here, so
``from sparsejax import laws; laws.fit(...)`` is the interface.

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

Variable names: in the laws ``N``, ``D`` and ``S`` are the papers' symbols (parameters, tokens,
sparsity), not shape suffixes; ``ND`` / ``NS`` are (n, 2) arrays of those two columns.
"""

from sparsejax.laws import loss, ratio  # noqa: F401  (registers the laws)
from sparsejax.laws.core import LAWS, Law, get_law, register
from sparsejax.laws.fitting import (HUBER_DELTA, FitError, FitResult, bootstrap, fit, predict,
                                    predict_band)
from sparsejax.laws.loss import chinchilla, qsparse
from sparsejax.laws.ratio import (PUBLISHED, PUBLISHED_LAW, power_offset, published_curve,
                                  published_params, relu_ratio, silu_ratio)

__all__ = [
    "LAWS", "Law", "get_law", "register",
    "HUBER_DELTA", "FitError", "FitResult", "bootstrap", "fit", "predict", "predict_band",
    "chinchilla", "qsparse", "power_offset", "relu_ratio", "silu_ratio",
    "PUBLISHED", "PUBLISHED_LAW", "published_curve", "published_params",
]
