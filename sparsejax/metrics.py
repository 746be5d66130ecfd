"""Activation-sparsity metrics of one FFN layer: the jittable criteria, chunk sparsity,
histograms and streaming statistics (Sparsing Law, arXiv 2411.02335). Definitions:
docs/sparsity_metrics_and_laws.md; "docs §X" below means its section X.

Every function sees one layer; callers loop or vmap over layers. Inputs, per layer:

- ``activation_TxF``: σ(gate), the activation-function output, flattened over unpadded tokens;
- ``active_TxF`` / ``active_BxLxF``: a boolean mask from any criterion (True = active).

Criteria for the inactive set (docs §Criteria): zero, per-token top-k, the reference's global
top-k and FAT-ε. Each ``*_active_TxF`` returns a boolean mask; ``activation_ratio`` turns any mask
into the layer's ratio. Inputs are upcast to float32, as the reference casts with ``.float()``.
The CETT criterion and its threshold searches live in :mod:`sparsejax.cett`.

The reference code is thunlp/SparsingLaw ``src/model_utils.py`` (``prune_fat``, ``prune_topk``)
and ``src/calc_activation.py``; each function says where it follows or departs from it.

Streaming: ``stats_init`` / ``stats_update`` / ``stats_finalize`` reduce batches to per-neuron
counts, chunk counts and histogram counts, so an evaluation never holds [tokens × d_ff × layers].

Shape suffixes (docs §Shape suffixes): B batch, L sequence length, T tokens, F d_ff, D d_model,
C chunk lengths, Q chunks per sequence, E histogram edges, S histogram slots (E + 1),
P flattened (token, neuron) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.eval_options import DEAD_MIN_RATE  # one definition, importable without JAX

Array = jax.Array

# One rule for "active" and one for fraction -> k, shared with training and evaluation.
from sparsejax.sparsity import (FAT_FLOOR, active, fat_threshold,  # noqa: E402,F401
                                global_topk_active, topk_count, topk_keep)
CHUNK_LENS = (1, 2, 4, 8, 16, 32)


def as_f32(x) -> Array:
    """``x`` as a float32 JAX array (the reference's ``.float()``)."""
    return jnp.asarray(x, jnp.float32)


def require_ndim(name: str, x, ndim: int, axes: str) -> None:
    """ValueError naming ``name`` and its axes unless ``x`` has ``ndim`` dimensions."""
    if np.ndim(x) != ndim:
        raise ValueError(f"{name} must be {ndim}-D [{axes}], got shape {np.shape(x)}")


# ----------------------------------------------------------------------------------------------
# Ratios and simple criteria
# ----------------------------------------------------------------------------------------------

def activation_ratio(active_TxF: Array) -> Array:
    """Layer activation ratio = mean over tokens of |active| / d_ff (docs §Activation ratio);
    sparsity = 1 − it.

    Counts in int32 because a float32 sum of more than 2^24 ones is inexact.
    """
    require_ndim("active_TxF", active_TxF, 2, "tokens, d_ff")
    return jnp.sum(active_TxF, dtype=jnp.int32) / np.float32(active_TxF.size)


def zero_active_TxF(activation_TxF: Array) -> Array:
    """*zero* criterion (docs §Criteria, ReLU family): neuron active iff σ(gate) ≠ 0."""
    require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    return active(activation_TxF)


def fat_active_TxF(activation_TxF: Array, eps) -> Array:
    """FAT-ε (docs §Criteria; reference ``prune_fat``): active iff |σ(gate)| ≥ ε + 1e-18.

    The reference masks ``x.float().abs() < (eps + 1e-18)``: the sum is a Python float rounded to
    float32 for the comparison, which is what a Python ``eps`` gets here. A traced ``eps`` is
    summed in float32 (``f32(ε) + f32(1e-18)``), which can differ from that by one float32 ulp.
    At ε = 0 this is |σ(gate)| ≥ f32(1e-18): the *zero* criterion except that magnitudes in
    (0, 1e-18) count as inactive.
    """
    require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    # not(<) like the reference (sparsity.active), so a NaN activation counts as active.
    return active(as_f32(activation_TxF), fat_threshold(eps))


def topk_active_TxF(activation_TxF: Array, k: int | float) -> Array:
    """Per-token top-k (docs §Criteria; Lazy Neuron, Q-Sparse): keep the k largest |σ(gate)| per token.

    ``k`` is static: an int count or a fraction, made a count by the one rule
    (:func:`sparsejax.sparsity.topk_count`); the mask is the one training applies
    (:func:`sparsejax.sparsity.topk_keep`: ties to the lower neuron index). As in the reference's
    top-k, a selected entry with |σ(gate)| < 1e-18 is inactive, so a token with fewer than k
    non-zero activations has fewer than k active neurons.
    """
    require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    abs_TxF = jnp.abs(as_f32(activation_TxF))
    selected_TxF = topk_keep(abs_TxF, topk_count(k, abs_TxF.shape[-1])) > 0
    return active(abs_TxF, fat_threshold(0.0), selected_TxF)


def global_topk_active_TxF(activation_TxF: Array, fraction: float) -> Array:
    """The reference's global top-k (``prune_topk``): keep the top ``fraction`` of |σ(gate)| over
    all tokens × neurons of the layer.

    The ``int(numel · (1 − fraction))`` smallest magnitudes are dropped (the empirical
    (1 − fraction)-quantile is the cut), then, as in the reference, anything with
    |σ(gate)| < 1e-18 is inactive too. Ties at the cut go to the lower flat index (stable sort;
    torch.topk's choice is unspecified). Departure: the reference pools the tokens of its
    batch; pass all of a layer's evaluation tokens to pool them the same way.
    """
    require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    # The same function the model's evaluation-time global top-k mask uses.
    return global_topk_active(activation_TxF, fraction)


def dead_neurons(active_TxF: Array, min_rate: float = DEAD_MIN_RATE) -> tuple[Array, Array]:
    """Dead neurons (docs §Dead neurons): per-neuron activation frequency over tokens below ``min_rate``.

    Returns ``(dead_F, dead_share)``.
    """
    require_ndim("active_TxF", active_TxF, 2, "tokens, d_ff")
    # count < min_rate·T holds for an integer count iff count < ⌈min_rate·T⌉. Comparing counts
    # avoids float32 rate division, which XLA turns into a multiply by 1/T for a constant T and
    # which then puts e.g. 5/5000 just below 1e-3.
    count_F = jnp.sum(active_TxF, axis=0, dtype=jnp.int32)
    dead_F = count_F < math.ceil(min_rate * active_TxF.shape[0])
    return dead_F, jnp.mean(dead_F)


# ----------------------------------------------------------------------------------------------
# Chunk-level sparsity (BlockFFN) and the independent-rate prediction (docs §Chunk-level sparsity)
# ----------------------------------------------------------------------------------------------

def _check_chunk_len(chunk_len) -> None:
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")


def _valid_or_all(valid_BxL, shape_BxL) -> Array:
    if valid_BxL is None:
        return jnp.ones(shape_BxL, bool)
    if np.shape(valid_BxL) != tuple(shape_BxL):
        raise ValueError(f"valid_BxL must have shape {tuple(shape_BxL)}, got {np.shape(valid_BxL)}")
    return jnp.asarray(valid_BxL, bool)


def _chunk_counts(active_BxLxF: Array, valid_BxL: Array, chunk_len: int) -> tuple[Array, Array]:
    """(number of counted chunks in which each neuron is active at least once, counted chunks).

    Chunks are consecutive ``chunk_len`` tokens from the start of each sequence; the ragged tail
    of L mod chunk_len tokens is not counted, and a chunk with a padded token is not counted.
    """
    n_batch, seq_len, d_ff = active_BxLxF.shape
    n_chunks = seq_len // chunk_len
    used = n_chunks * chunk_len
    union_BxQxF = jnp.any(active_BxLxF[:, :used].reshape(n_batch, n_chunks, chunk_len, d_ff), axis=2)
    counted_BxQ = jnp.all(valid_BxL[:, :used].reshape(n_batch, n_chunks, chunk_len), axis=2)
    active_count_F = jnp.sum(union_BxQxF & counted_BxQ[..., None], axis=(0, 1), dtype=jnp.int32)
    return active_count_F, jnp.sum(counted_BxQ, dtype=jnp.int32)


def chunk_sparsity(active_BxLxF: Array, chunk_len: int, valid_BxL: Array | None = None) -> Array:
    """Chunk-level sparsity (BlockFFN, Song et al. 2025; docs §Chunk-level sparsity): the share of (chunk, neuron)
    pairs in which the neuron is inactive for every token of the chunk.

    ``active_BxLxF`` keeps the sequence axis so chunks never straddle two sequences. A sequence
    contributes its ⌊L / chunk_len⌋ full chunks from position 0; the ragged tail is dropped so
    every counted chunk has exactly ``chunk_len`` tokens. With ``valid_BxL`` (False = padding), a
    chunk containing padding is dropped. NaN when no chunk is counted. chunk_len = 1 gives the
    token-level sparsity 1 − activation ratio.
    """
    _check_chunk_len(chunk_len)
    require_ndim("active_BxLxF", active_BxLxF, 3, "batch, seq, d_ff")
    valid_BxL = _valid_or_all(valid_BxL, active_BxLxF.shape[:2])
    active_count_F, n_chunks = _chunk_counts(active_BxLxF, valid_BxL, chunk_len)
    return 1.0 - jnp.sum(active_count_F) / (n_chunks * np.float32(active_BxLxF.shape[2]))


def chunk_sparsity_curve(active_BxLxF: Array, chunk_lens: Sequence[int] = CHUNK_LENS,
                         valid_BxL: Array | None = None) -> Array:
    """``chunk_sparsity`` for each chunk length, as a [len(chunk_lens)] array."""
    return jnp.stack([chunk_sparsity(active_BxLxF, c, valid_BxL) for c in chunk_lens])


def independent_chunk_density(rate, chunk_len: int):
    """A neuron active independently with rate r per token is active in a chunk of B tokens with
    probability 1 − (1 − r)^B, elementwise (docs §Chunk-level sparsity).

    Average it over per-neuron rates before comparing with a measured chunk density: averaging r
    first overstates the density (Jensen).
    """
    _check_chunk_len(chunk_len)
    return 1.0 - (1.0 - rate) ** chunk_len


# ----------------------------------------------------------------------------------------------
# Histograms of |σ(gate)|
# ----------------------------------------------------------------------------------------------

def log_bin_edges(low: float, high: float, num_bins: int) -> np.ndarray:
    """``num_bins + 1`` log-spaced float32 edges from ``low`` to ``high``."""
    if not 0.0 < low < high:
        raise ValueError(f"log bin edges need 0 < low < high, got low={low}, high={high}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    return np.geomspace(low, high, num_bins + 1).astype(np.float32)


DEFAULT_HIST_EDGES = tuple(float(e) for e in log_bin_edges(1e-6, 1e2, 64))  # 8 bins per decade


def _histogram(abs_P: Array, weight_P: Array, edges_E: Array) -> Array:
    # side='right' makes every bin half-open [e_{i-1}, e_i): slot 0 is below e_0 (zeros fall there
    # for log edges), slot E is ≥ e_{E-1}.
    slot_P = jnp.searchsorted(edges_E, abs_P, side="right")
    return jax.ops.segment_sum(weight_P.astype(jnp.int32), slot_P, num_segments=edges_E.shape[0] + 1)


def activation_histogram(activation_TxF: Array, edges_E) -> Array:
    """Counts of |σ(gate)| over increasing edges e_0 < … < e_{E−1}, as E + 1 int32 slots:
    [underflow |a| < e_0, the E − 1 bins [e_{i−1}, e_i), overflow |a| ≥ e_{E−1}].

    Every bin is half-open, including the last (unlike ``np.histogram``); NaNs land in the
    overflow slot. ``edges_E`` may be traced; its length fixes the output shape.
    """
    require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    require_ndim("edges_E", edges_E, 1, "edges")
    abs_P = jnp.abs(as_f32(activation_TxF)).reshape(-1)
    return _histogram(abs_P, jnp.ones(abs_P.shape, bool), as_f32(edges_E))


# ----------------------------------------------------------------------------------------------
# Streaming accumulators
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["n_tokens", "active_count_F", "chunk_active_count_CxF",
                                "n_chunks_C", "hist_count_S"],
                   meta_fields=["chunk_lens", "hist_edges"])
@dataclasses.dataclass(frozen=True)
class SparsityStats:
    """Running sums of one layer over streamed batches (a pytree; jit and vmap over layers).

    Per-neuron counts are int32: exact up to 2^31 tokens.
    """
    n_tokens: Array  # [] valid tokens seen
    active_count_F: Array  # [F] tokens on which each neuron was active
    chunk_active_count_CxF: Array  # [C, F] counted chunks in which each neuron was active
    n_chunks_C: Array  # [C] counted chunks per chunk length
    hist_count_S: Array  # [E + 1] |σ(gate)| histogram slots (see activation_histogram)
    chunk_lens: tuple[int, ...]
    hist_edges: tuple[float, ...]


class SparsityReport(NamedTuple):
    activation_ratio: Array  # mean over tokens of |active| / d_ff
    neuron_rate_F: Array  # per-neuron activation frequency
    dead_F: Array  # neuron_rate_F < min_rate
    dead_share: Array
    chunk_sparsity_C: Array  # measured, per chunk length (BlockFFN CLS)
    chunk_sparsity_independent_C: Array  # mean_i (1 − r_i)^L, the independent prediction
    hist_count_S: Array


def stats_init(d_ff: int, *, chunk_lens: Sequence[int] = CHUNK_LENS,
               hist_edges: Sequence[float] = DEFAULT_HIST_EDGES) -> SparsityStats:
    """Empty accumulator for one layer with ``d_ff`` neurons."""
    for c in chunk_lens:
        _check_chunk_len(c)
    edges = tuple(float(e) for e in np.asarray(hist_edges, np.float32))
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"hist_edges must be at least 2 increasing values, got {hist_edges!r}")
    return SparsityStats(
        n_tokens=jnp.zeros((), jnp.int32),
        active_count_F=jnp.zeros((d_ff,), jnp.int32),
        chunk_active_count_CxF=jnp.zeros((len(chunk_lens), d_ff), jnp.int32),
        n_chunks_C=jnp.zeros((len(chunk_lens),), jnp.int32),
        hist_count_S=jnp.zeros((len(edges) + 1,), jnp.int32),
        chunk_lens=tuple(chunk_lens), hist_edges=edges)


def stats_update(stats: SparsityStats, active_BxLxF: Array, activation_BxLxF: Array | None = None,
                 valid_BxL: Array | None = None) -> SparsityStats:
    """Add one batch: ``active_BxLxF`` from any criterion, in sequence order; the histogram is of
    |``activation_BxLxF``| and is skipped when it is None; ``valid_BxL`` marks real tokens."""
    require_ndim("active_BxLxF", active_BxLxF, 3, "batch, seq, d_ff")
    if active_BxLxF.shape[2] != stats.active_count_F.shape[0]:
        raise ValueError(f"active_BxLxF has d_ff={active_BxLxF.shape[2]}, the stats "
                         f"{stats.active_count_F.shape[0]}")
    valid_BxL = _valid_or_all(valid_BxL, active_BxLxF.shape[:2])
    active_BxLxF = jnp.asarray(active_BxLxF, bool) & valid_BxL[..., None]
    chunk_counts = [_chunk_counts(active_BxLxF, valid_BxL, c) for c in stats.chunk_lens]
    hist_count_S = stats.hist_count_S
    if activation_BxLxF is not None:
        if np.shape(activation_BxLxF) != active_BxLxF.shape:
            raise ValueError(f"activation_BxLxF must have shape {active_BxLxF.shape}, got "
                             f"{np.shape(activation_BxLxF)}")
        hist_count_S = hist_count_S + _histogram(
            jnp.abs(as_f32(activation_BxLxF)).reshape(-1),
            jnp.broadcast_to(valid_BxL[..., None], active_BxLxF.shape).reshape(-1),
            jnp.asarray(stats.hist_edges, jnp.float32))
    return dataclasses.replace(
        stats,
        n_tokens=stats.n_tokens + jnp.sum(valid_BxL, dtype=jnp.int32),
        active_count_F=stats.active_count_F + jnp.sum(active_BxLxF, axis=(0, 1), dtype=jnp.int32),
        chunk_active_count_CxF=stats.chunk_active_count_CxF + jnp.stack([a for a, _ in chunk_counts]),
        n_chunks_C=stats.n_chunks_C + jnp.stack([n for _, n in chunk_counts]),
        hist_count_S=hist_count_S)


def stats_finalize(stats: SparsityStats, min_rate: float = DEAD_MIN_RATE) -> SparsityReport:
    """Ratios from the running sums; NaN where nothing was counted.

    Dead neurons compare the float32 rate count / n_tokens (a division by a traced count, so
    correctly rounded) with ``min_rate``, which agrees with ``dead_neurons``'s exact count test
    while n_tokens < 2^24 and min_rate = 1e-3.
    """
    d_ff = stats.active_count_F.shape[0]
    neuron_rate_F = stats.active_count_F / stats.n_tokens.astype(jnp.float32)
    dead_F = neuron_rate_F < min_rate
    chunk_density_C = (jnp.sum(stats.chunk_active_count_CxF.astype(jnp.float32), axis=1)
                       / (stats.n_chunks_C * np.float32(d_ff)))
    lens_C = jnp.asarray(stats.chunk_lens, jnp.float32)
    return SparsityReport(
        activation_ratio=jnp.mean(neuron_rate_F),
        neuron_rate_F=neuron_rate_F,
        dead_F=dead_F,
        dead_share=jnp.mean(dead_F),
        chunk_sparsity_C=1.0 - chunk_density_C,
        chunk_sparsity_independent_C=jnp.mean((1.0 - neuron_rate_F[None, :]) ** lens_C[:, None],
                                              axis=1),
        hist_count_S=stats.hist_count_S)
