"""The one reading of a config's ``sparsity`` section: :class:`SparsityPlan`.

Every training-time sparsity control reaches the FFN through the plan, and only through it:

* what is **static** (compiled in): a constant top-k k (``lax.top_k`` / ``lax.approx_max_k``),
  the STE, a constant activation threshold, the statistics' active rule;
* what is **traced** (a schedule of the step, computed in-graph so stage changes never recompile
  and a resumed run continues exactly): a scheduled k or threshold, the regularisers' weights
  (:meth:`SparsityPlan.coefficients`);
* the model's input built from both (:meth:`SparsityPlan.model_input`, a
  :class:`sparsejax.sparsity.Sparsity`): FFN implementations read the per-layer values there and
  nothing of the config;
* whether the training top-k applies, decided on that input (``Sparsity.trained_topk``) by the
  FFN, the training statistics and the evaluator alike.

Step convention: training step t (1-based, the step being trained) uses the schedules at t; a
model *after* t steps (evaluation, a checkpoint of step t) is used with the values at t too.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from sparsejax import activations, objectives, schedules, sparsity as sparsity_lib
from sparsejax.config import SPARSITY_TERMS, Config
from sparsejax.schedules import Schedule

# Traced model term -> the Sparsity coefficient the FFN reads (a scalar per layer).
MODEL_COEFFICIENTS = {"topk": "topk_k", "activation_threshold": "activation_threshold"}
# The step's metric of each traced term's current value (docs/recipes.md §Metrics): a model
# term's coefficient name, a regulariser's weight ``<name>_coef`` (a regulariser is the sparsity
# term of the same name as its objectives.REGULARISERS entry).
METRIC_NAMES = {**MODEL_COEFFICIENTS, **{name: f"{name}_coef" for name in objectives.REGULARISERS}}


def constant_value(s: Schedule) -> Optional[float]:
    """A constant schedule's value (a static control), else None (traced)."""
    return float(s.values[0]) if s.kind == "constant" else None


def topk_counts(s: Schedule, d_ff: int) -> Schedule:
    """A top-k schedule in neuron counts, value by value through ``sparsity.config_topk_k``
    (0 -> d_ff, dense; a fraction by the one fraction -> k rule, evaluated on the host in float64
    so a stage's k is exactly the k that evaluation uses for that fraction; an integer -> itself)."""
    counts = tuple(float(sparsity_lib.config_topk_k(float(v), d_ff)) for v in s.values)
    return dataclasses.replace(s, values=counts)


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
    """The static reading of ``cfg.sparsity`` for one model (see module docstring).

    ``topk_k``: the static k (0 = none); ``threshold``: the static activation threshold;
    ``traced``: the terms whose value is computed per step (top-k in counts), regularisers
    included even when constant (their weight enters the objective as a value).
    """

    d_ff: int
    n_layers: int
    exact_zeros: bool
    fat_eps: float
    topk_k: int
    topk_approx: bool
    topk_recall: float
    topk_ste: bool
    threshold: float
    traced: dict  # term -> Schedule
    chunk_len: int
    chunk_tau: float

    @classmethod
    def of(cls, cfg: Config) -> "SparsityPlan":
        """The plan of ``cfg`` (validated by ``sparsejax.configure``)."""
        sp, m = cfg.sparsity, cfg.model
        traced = {}
        static_k, threshold = 0, 0.0
        for term in SPARSITY_TERMS:
            s = getattr(sp, term)
            if schedules.is_default(s):
                continue
            value = constant_value(s)
            if term == "topk" and value is not None:
                static_k = sparsity_lib.config_topk_k(value, m.d_ff)
            elif term == "activation_threshold" and value is not None:
                threshold = value
            else:
                traced[term] = topk_counts(s, m.d_ff) if term == "topk" else s
        return cls(d_ff=m.d_ff, n_layers=m.n_layers,
                   exact_zeros=activations.get(m.activation).exact_zeros, fat_eps=sp.fat_eps,
                   topk_k=static_k, topk_approx=sp.topk_mode == "approx", topk_recall=sp.topk_recall,
                   topk_ste=sp.topk_ste, threshold=threshold, traced=traced, chunk_len=sp.chunk_len,
                   chunk_tau=sp.chunk_tau)

    # -- static structure (decides what is compiled) ---------------------------------------
    @property
    def active(self) -> bool:
        """Any traced term: the step computes coefficients and reports the terms' metrics."""
        return bool(self.traced)

    @property
    def regularisers(self) -> tuple[str, ...]:
        return tuple(name for name in objectives.REGULARISERS if name in self.traced)

    @property
    def stats_threshold(self):
        """The in-graph statistics' rule for ``sparsity.active``: zero (None) or FAT-ε."""
        return None if self.exact_zeros else sparsity_lib.fat_threshold(self.fat_eps)

    @property
    def stats_chunk_len(self) -> int:
        """Chunk length of the per-layer chunk statistics (0 = none): with traced terms."""
        return self.chunk_len if self.active else 0

    def stage_boundaries(self) -> list[int]:
        """Every boundary step of the traced schedules (for the activation-ratio plot)."""
        return sorted({int(b) for s in self.traced.values() for b in s.boundaries})

    # -- in-graph values ---------------------------------------------------------------------
    def coefficients(self, step) -> dict:
        """Values at ``step`` (an int or a traced integer): ``{term: float32 scalar}`` for the
        traced terms; the top-k k is rounded to an int32 count in [1, d_ff]."""
        import jax.numpy as jnp  # noqa: PLC0415 - the plan's static part is plain Python

        out = {}
        for term, s in self.traced.items():
            v = schedules.value(s, step)
            if term == "topk":
                v = jnp.clip(jnp.round(v), 1, self.d_ff).astype(jnp.int32)
            out[term] = v
        return out

    def model_coefficients(self, coefs: Optional[dict]) -> dict:
        """``Sparsity.coefficients``: the traced model terms broadcast to a leading [n_layers]
        axis (the input's per-layer convention, sliced per block or scanned)."""
        import jax.numpy as jnp  # noqa: PLC0415

        return {name: jnp.broadcast_to(coefs[term], (self.n_layers,))
                for term, name in MODEL_COEFFICIENTS.items() if coefs and term in coefs}

    def model_input(self, coefs: Optional[dict] = None, *, stats_weights_BxL=None,
                    topk_k: Optional[int] = None, **eval_masks) -> sparsity_lib.Sparsity:
        """The model's sparsity input: the static controls, the traced model terms' values
        (``coefs`` from :meth:`coefficients`), and — with ``stats_weights_BxL`` — the in-block
        statistics, regulariser sums and chunk statistics.

        ``topk_k``: replace the static k (evaluation's per-token top-k pass: exact, no STE);
        ``eval_masks``: evaluation-time masks (``thresholds``, ``mask_target``, ``eval_masks``).
        """
        static_k = self.topk_k if topk_k is None else topk_k
        stats = stats_weights_BxL is not None
        return sparsity_lib.Sparsity(
            stats_weights_BxL=stats_weights_BxL,
            stats_threshold=self.stats_threshold if stats else None,
            coefficients=self.model_coefficients(coefs),
            regularisers=self.regularisers if stats else (),
            chunk_len=self.stats_chunk_len if stats else 0, chunk_tau=self.chunk_tau,
            topk_k=static_k if 0 < static_k < self.d_ff else 0,
            topk_approx=self.topk_approx and topk_k is None, topk_recall=self.topk_recall,
            topk_ste=self.topk_ste and topk_k is None, threshold=self.threshold, **eval_masks)
