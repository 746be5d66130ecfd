"""The one definition of an *active* FFN neuron, of fraction → k, and the model's sparsity input.

Everything that decides whether a neuron is active goes through :func:`active`: the in-graph
training statistics (``step``/the FFN's per-layer stats), the training-time top-k keep mask as
the statistics read it (:func:`trained_keep`), the model's evaluation-time masks, the evaluator's
measured masks, the ``metrics.*_active_TxF`` criteria, CETT's sparse pass
(``cett.cett_active_TxF``), the sparse decode FFN and the block-sparse kernels' tile masks
(``kernels.block_mask.active_TxF``). One rule means one tie rule (``|x| == t`` is active), one
floor (:func:`fat_threshold`) and one NaN rule (a NaN is active, so it is counted and, in a
kernel, computed, never silently dropped). Everything that turns a top-k fraction into a
neuron count goes through :func:`topk_count` (the config's values through
:func:`config_topk_k`, which adds the meaning of 0), so training, evaluation and the reference's
global top-k keep the same count.

Shape suffixes (docs/sparsity_metrics_and_laws.md §Shape suffixes): B batch, L length, T tokens,
F d_ff, N layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# The reference (thunlp/SparsingLaw ``prune_fat``) adds it to ε, and ``prune_topk`` uses it as its
# zero test; below float32's resolution at any ε ≥ 1e-10, so it only matters at ε = 0.
FAT_FLOOR = 1e-18

# Evaluation-time neuron masks: which FFN quantity a per-neuron threshold is compared with.
MASK_TARGETS = ("activation", "hidden")


# ------------------------------------------------------------------------------- the rules
def fat_threshold(eps) -> Array | np.float32:
    """FAT-ε threshold ε + 1e-18 in float32, as the reference compares it.

    A Python ε is summed in float64 and rounded once (what torch does with ``eps + 1e-18``); a
    traced ε is summed in float32, which can differ from that by one ulp.
    """
    if isinstance(eps, (int, float, np.floating, np.integer)):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        return np.float32(float(eps) + FAT_FLOOR)
    return jnp.asarray(eps, jnp.float32) + np.float32(FAT_FLOOR)


def active(x: Array, threshold=None, keep: Optional[Array] = None) -> Array:
    """Boolean mask of active entries of ``x`` (any shape).

    * ``threshold is None``: the *zero* rule, ``x ≠ 0`` (ReLU family, exact zeros);
    * otherwise: ``not (|x| < threshold)`` — written as the reference writes its mask
      (``x.abs() < t`` marks the dropped ones), so a NaN counts as active and shows up in the
      ratio instead of silently disappearing. ``threshold`` broadcasts against ``x`` (a scalar
      or a per-neuron ``[F]`` vector) and should already hold the floor
      (:func:`fat_threshold`) where the criterion has one;
    * ``keep``: an extra boolean mask ANDed in (training-time top-k: only kept neurons are active).
    """
    if threshold is None:
        mask = x != 0
    else:
        threshold = jnp.asarray(threshold)
        mask = ~(jnp.abs(x) < threshold.astype(jnp.promote_types(x.dtype, threshold.dtype)))
    return mask if keep is None else mask & keep


def topk_count(k, d_ff: int) -> int:
    """Neurons kept: an int k in [1, d_ff], or a float fraction f in (0, 1].

    A fraction keeps ``d_ff − int(d_ff · (1 − f))`` neurons: the count the reference's
    ``prune_topk`` keeps (``num_to_zero = int(numel · (1 − f))``), so the paper's evaluation
    numbers are reproduced exactly, and training and evaluation agree on k. This differs from
    round(f · d_ff) by one where d_ff · (1 − f) lands just below an integer in float64, e.g.
    f = 0.9, d_ff = 320: 1 − 0.9 = 0.09999999999999998, int(31.999…) = 31, k = 289 (not 288).
    """
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
        raise ValueError(f"k must be an int in [1, d_ff={d_ff}] or a float fraction in (0, 1], "
                         f"got {k!r}")
    if isinstance(k, (int, np.integer)):
        if not 1 <= k <= d_ff:
            raise ValueError(f"k must be an int in [1, d_ff={d_ff}], got {k}")
        return int(k)
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k as a fraction must be in (0, 1], got {k}")
    count = d_ff - int(d_ff * (1.0 - float(k)))
    if count < 1:
        raise ValueError(f"k={k} keeps no neuron of d_ff={d_ff}")
    return count


def config_topk_k(topk: float, d_ff: int) -> int:
    """A ``sparsity.topk`` value → k in [1, d_ff]: 0 is dense (every neuron kept, k = d_ff), a
    fraction in (0, 1) goes through :func:`topk_count`, a whole number ≥ 1 is the count itself.

    0 means "dense" wherever a value is read: a stage of a scheduled k at 0 keeps all d_ff
    neurons. A config whose top-k is the default constant 0 has no top-k at all (the term is off:
    ``schedules.is_default``, :class:`sparsejax.sparsity_plan.SparsityPlan`), so this is never
    asked for it.
    """
    if isinstance(topk, bool) or not isinstance(topk, (int, float, np.integer, np.floating)) \
            or not topk >= 0:
        raise ValueError(f"sparsity.topk={topk!r}; allowed: 0 (dense), a fraction in (0, 1), or "
                         f"an integer k in [1, d_ff={d_ff}]")
    if topk == 0:
        return d_ff
    if topk < 1:
        return topk_count(float(topk), d_ff)
    if topk != int(topk):
        raise ValueError(f"sparsity.topk={topk!r}; allowed: 0 (dense), a fraction in (0, 1), or "
                         f"an integer k in [1, d_ff={d_ff}]")
    return topk_count(int(topk), d_ff)


def topk_keep(score_TxF: Array, k: int, *, approximate: bool = False,
              recall: float = 0.95) -> Array:
    """0/1 mask (score's dtype) of exactly k entries per row: the k largest scores (ties to the
    lower index). ``approximate`` uses ``lax.approx_max_k`` (Chern et al. 2022) with the given
    recall target; it still marks exactly k entries per row."""
    d_ff = score_TxF.shape[-1]
    if not 1 <= k <= d_ff:
        raise ValueError(f"top-k k={k} must be in [1, d_ff={d_ff}]")
    if k == d_ff:
        return jnp.ones_like(score_TxF)
    if approximate:
        _, index_TxK = jax.lax.approx_max_k(score_TxF, k, recall_target=recall)
    else:
        _, index_TxK = jax.lax.top_k(score_TxF, k)
    rows = score_TxF.reshape(-1, d_ff)
    index_PxK = index_TxK.reshape(-1, k)
    mask = jnp.zeros_like(rows).at[jnp.arange(rows.shape[0])[:, None], index_PxK].set(1)
    return mask.reshape(score_TxF.shape)


def topk_keep_traced(score_TxF: Array, k) -> Array:
    """0/1 mask (score's dtype) of the k largest scores per row for a *traced* k (a top-k schedule
    of the sparsity plan), so k can change between steps without recompiling.

    It is the rank-vs-k mask: an entry is kept iff its rank in its row (descending, ties to the
    lower index, as :func:`topk_keep`) is below k, so both masks are equal at every fixed k.
    Computed without materialising ranks (a double argsort was ~7x slower on CPU): with t the
    k-th largest score of the row (one value sort), keep every score > t, and of the scores
    equal to t the first k − #(> t) by index (a cumulative count).
    """
    k = jnp.asarray(k, jnp.int32)
    descending_TxF = -jnp.sort(-score_TxF, axis=-1)
    index = jnp.broadcast_to(k - 1, score_TxF.shape[:-1] + (1,))
    kth_Tx1 = jnp.take_along_axis(descending_TxF, index, axis=-1)
    above_TxF = score_TxF > kth_Tx1
    n_above_Tx1 = jnp.sum(above_TxF, axis=-1, keepdims=True, dtype=jnp.int32)
    tied_TxF = score_TxF == kth_Tx1
    tied_before_TxF = jnp.cumsum(tied_TxF, axis=-1, dtype=jnp.int32) - tied_TxF
    keep_TxF = above_TxF | (tied_TxF & (tied_before_TxF < k - n_above_Tx1))
    return keep_TxF.astype(score_TxF.dtype)


def chunk_stats(active_BxLxF: Array, weights_BxL: Array, chunk_len: int) -> tuple[Array, Array]:
    """(active (chunk, neuron) pairs, counted chunks) of one layer: the in-block form of
    ``metrics.chunk_sparsity`` (consecutive chunks from position 0, the ragged tail and chunks
    holding a padded token not counted), reduced where the activations are."""
    b, l, f = active_BxLxF.shape
    q = l // chunk_len
    used = q * chunk_len
    union_BxQxF = jnp.any(active_BxLxF[:, :used].reshape(b, q, chunk_len, f), axis=2)
    whole_BxQ = jnp.all(weights_BxL[:, :used].reshape(b, q, chunk_len) > 0, axis=2)
    pairs = jnp.sum(union_BxQxF & whole_BxQ[..., None], dtype=jnp.float32)
    return pairs, jnp.sum(whole_BxQ, dtype=jnp.float32)


def global_topk_active(activation_TxF: Array, fraction: float) -> Array:
    """The reference's global top-k (``prune_topk``): keep the top ``fraction`` of |σ(gate)| over
    all entries; the ``int(numel · (1 − fraction))`` smallest magnitudes are dropped (ties to the
    lower flat index, stable sort), then the 1e-18 floor applies as everywhere."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be a float in (0, 1], got {fraction!r}")
    abs_P = jnp.abs(jnp.asarray(activation_TxF, jnp.float32)).reshape(-1)
    num_to_zero = abs_P.size - topk_count(float(fraction), abs_P.size)
    dropped_P = jnp.argsort(abs_P, stable=True)[:num_to_zero]
    keep_P = jnp.ones(abs_P.shape, bool).at[dropped_P].set(False)
    return active(abs_P, fat_threshold(0.0), keep_P).reshape(activation_TxF.shape)


def trained_keep(hidden: Array, trained_topk: bool) -> Optional[Array]:
    """The training-time top-k keep mask as everyone reads it: the hidden value survived the
    mask. (Kept neurons have σ(gate)·up ≠ 0 almost surely, so this is the mask itself, and it is
    what an evaluator that only sees ``hidden`` can recompute: :func:`active` by the zero rule.)"""
    return active(hidden) if trained_topk else None


# --------------------------------------------------------------------------- the model's input
@flax.struct.dataclass
class Sparsity:
    """What the FFNs should mask and measure: one input, Transformer → Block → FeedForward.

    At the Transformer, per-layer fields carry a leading layer axis N; :meth:`layer` slices one
    layer's, and :meth:`scan_axes` tells ``nn.scan`` to scan them and broadcast the rest.

    thresholds: evaluation-time per-neuron thresholds [N, F] (per layer [F]); neurons with
        |target| < threshold are dropped (a threshold of 0 is the dense model).
    mask_target: which quantity the thresholds compare with, one of ``MASK_TARGETS``.
    eval_masks: further evaluation-time masks, ``(name, parameter)`` pairs naming masks of
        ``sparsejax.ffn.EVAL_MASKS`` with a static parameter (e.g. ``("global_topk", 0.3)``:
        the reference's global top-k fraction of |σ(gate)| per layer); () = none.
    stats_weights_BxL: token weights of the in-block statistics; None = no statistics.
    stats_threshold: the statistics' rule: None = zero rule, else a FAT threshold
        (:func:`fat_threshold`).
    coefficients: training-time per-layer coefficients ``name -> [N, ...]`` for FFN
        implementations that read them; scanned like ``thresholds``. The reference FFN reads
        ``topk_k`` (a traced top-k k: rank-vs-k mask, :func:`topk_keep_traced`) and
        ``activation_threshold`` (the activation's ``threshold`` parameter, traced); a name's
        presence is static (pytree structure), so it decides what is compiled
        (:class:`sparsejax.sparsity_plan.SparsityPlan`).
    regularisers: names in ``objectives.REGULARISERS`` whose per-layer sums each block reduces
        over the ``stats_weights_BxL`` tokens and reports (differentiably) as ``reg_<name>``.
    chunk_len: chunk length of the chunk penalty and of the per-layer chunk statistics
        (``chunk_active``, ``chunks``: :func:`chunk_stats` by the statistics' rule); 0 = none.
    chunk_tau: the chunk penalty's temperature.
    topk_k: the static training-time top-k k (0 = none): ``lax.top_k`` (``topk_approx``:
        ``lax.approx_max_k`` at ``topk_recall``), with the Q-Sparse straight-through estimator
        when ``topk_ste``; a scheduled k is the ``topk_k`` coefficient instead.
    threshold: the static ``threshold`` parameter of the activation (fatrelu, shifted_relu); a
        scheduled one is the ``activation_threshold`` coefficient instead.

    Built by :meth:`sparsejax.sparsity_plan.SparsityPlan.model_input`, the one reading of the
    config's ``sparsity`` section; ``Sparsity()`` is the dense model.
    """

    thresholds: Optional[Array] = None
    stats_weights_BxL: Optional[Array] = None
    coefficients: Mapping[str, Array] = dataclasses.field(default_factory=dict)
    mask_target: str = flax.struct.field(pytree_node=False, default="activation")
    eval_masks: tuple[tuple[str, Any], ...] = flax.struct.field(pytree_node=False, default=())
    stats_threshold: Optional[float] = flax.struct.field(pytree_node=False, default=None)
    regularisers: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    chunk_len: int = flax.struct.field(pytree_node=False, default=0)
    chunk_tau: float = flax.struct.field(pytree_node=False, default=0.1)
    topk_k: int = flax.struct.field(pytree_node=False, default=0)
    topk_approx: bool = flax.struct.field(pytree_node=False, default=False)
    topk_recall: float = flax.struct.field(pytree_node=False, default=0.95)
    topk_ste: bool = flax.struct.field(pytree_node=False, default=False)
    threshold: float = flax.struct.field(pytree_node=False, default=0.0)

    def __post_init__(self):
        if self.mask_target not in MASK_TARGETS:
            raise ValueError(f"mask_target={self.mask_target!r}; allowed: {list(MASK_TARGETS)}")
        if not all(isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], str)
                   for m in self.eval_masks):
            raise ValueError(f"eval_masks={self.eval_masks!r}; allowed: (name, parameter) pairs "
                             f"of sparsejax.ffn.EVAL_MASKS")

    @property
    def wants_stats(self) -> bool:
        return self.stats_weights_BxL is not None

    @property
    def trained_topk(self) -> bool:
        """A training-time top-k mask is part of the forward pass (static or scheduled k)."""
        return self.topk_k > 0 or "topk_k" in self.coefficients

    def layer(self, i: int) -> "Sparsity":
        """Layer i's input: per-layer fields sliced, the rest shared."""
        return self.replace(
            thresholds=None if self.thresholds is None else self.thresholds[i],
            coefficients={k: v[i] for k, v in self.coefficients.items()})

    def scan_axes(self) -> Any:
        """``nn.scan`` ``in_axes`` prefix for this input: per-layer fields on axis 0, the rest
        broadcast (the token weights are the same for every layer)."""
        import flax.linen as nn  # noqa: PLC0415 - keep this module importable without Linen state

        return self.replace(
            thresholds=None if self.thresholds is None else 0,
            stats_weights_BxL=None if self.stats_weights_BxL is None else nn.broadcast,
            coefficients={k: 0 for k in self.coefficients})


def layer_stats(activation_BxLxF: Array, hidden_BxLxF: Array,
                sparsity: Sparsity) -> tuple[Array, Array]:
    """(active count per neuron [F], active sum []) of one layer over the weighted tokens.

    Reduced where the activations are, so nothing of size [B, L, F] leaves the block in training.
    """
    w_BxLx1 = sparsity.stats_weights_BxL[..., None].astype(jnp.float32)
    mask = active(activation_BxLxF, sparsity.stats_threshold,
                  trained_keep(hidden_BxLxF, sparsity.trained_topk))
    count_F = jnp.sum(mask.astype(jnp.float32) * w_BxLx1, axis=(0, 1))
    return count_F, jnp.sum(count_F)
