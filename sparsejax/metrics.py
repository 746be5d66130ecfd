"""Activation-sparsity metrics of one FFN layer (SPEC §1, §5, §6; Sparsing Law, arXiv 2411.02335).

Every function sees one layer; callers loop or vmap over layers. Inputs, per layer:

- ``activation_TxF``: σ(gate), the activation-function output, flattened over unpadded tokens;
- ``hidden_TxF``: the gated intermediate σ(gate)·up (equal to ``activation_TxF`` in a plain FFN);
- ``w_out_FxD``: the output projection; neuron i's output vector is ``w_out_FxD[i]``, and the
  FFN output of a token is ``hidden_TxF @ w_out_FxD``.

Criteria for the inactive set D (SPEC §1): zero, per-token top-k, the reference's global top-k,
FAT-ε and CETT. Each ``*_active_TxF`` returns a boolean mask (True = active);
``activation_ratio`` turns any mask into the layer's ratio. Inputs are upcast to float32, as the
reference casts with ``.float()``.

The reference code is thunlp/SparsingLaw ``src/model_utils.py`` (``prune_fat``, ``prune_topk``,
``calc_thresholds_given_cett``, the sparse forward) and ``src/calc_activation.py``; each function
says where it follows or departs from it.

Streaming: ``stats_init`` / ``stats_update`` / ``stats_finalize`` reduce batches to per-neuron
counts, chunk counts and histogram counts, so an evaluation never holds [tokens × d_ff × layers].
The CETT searches take a sequence of token batches of one layer and pool them as the reference
pools all tokens (see ``cett_threshold_reference``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FAT_FLOOR = 1e-18  # the reference adds it to ε (prune_fat) and uses it as the zero test (prune_topk)
CETT_NUM_CANDIDATES = 65_536  # reference grid size
CETT_MAX_QUANTILE = 0.99  # reference grid top: "drop the extreme values"
DEAD_MIN_RATE = 1e-3  # SPEC §1: dead = active on < 0.1% of tokens
CHUNK_LENS = (1, 2, 4, 8, 16, 32)
# Incremental CETT search: a step sums the smaller half of the bisection bracket sparsely when
# that half holds at most this share of the layer's (token, neuron) entries, else it runs the
# dense masked matmul. On a 2-core CPU a sparse entry costs ≈ 10× a dense one (0.11 µs vs
# 11 ns at d_model 768), so ≈ 6% leaves room for the host-side compaction.
CETT_SPARSE_SWITCH_FRACTION = 0.06
# Entries per scatter-add step: row-sorted chunks of 1–2k entries keep W_out rows and the
# touched output rows in cache (measured fastest on CPU).
_SCATTER_CHUNK = 1024
_HIGHEST = jax.lax.Precision.HIGHEST  # CETT is a float32 metric: no bf16/TF32 passes on TPU/GPU


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _require_ndim(name: str, x, ndim: int, axes: str) -> None:
    if np.ndim(x) != ndim:
        raise ValueError(f"{name} must be {ndim}-D [{axes}], got shape {np.shape(x)}")


def _check_ffn_shapes(hidden_TxF, w_out_FxD) -> None:
    _require_ndim("hidden_TxF", hidden_TxF, 2, "tokens, d_ff")
    _require_ndim("w_out_FxD", w_out_FxD, 2, "d_ff, d_model")
    if np.shape(hidden_TxF)[1] != np.shape(w_out_FxD)[0]:
        raise ValueError(f"hidden_TxF has d_ff={np.shape(hidden_TxF)[1]} but w_out_FxD has "
                         f"d_ff={np.shape(w_out_FxD)[0]}")


# ----------------------------------------------------------------------------------------------
# Ratios and simple criteria
# ----------------------------------------------------------------------------------------------

def activation_ratio(active_TxF: Array) -> Array:
    """Layer activation ratio = mean over tokens of |active| / d_ff (SPEC §1); sparsity = 1 − it.

    Counts in int32 because a float32 sum of more than 2^24 ones is inexact.
    """
    _require_ndim("active_TxF", active_TxF, 2, "tokens, d_ff")
    return jnp.sum(active_TxF, dtype=jnp.int32) / np.float32(active_TxF.size)


def zero_active_TxF(activation_TxF: Array) -> Array:
    """*zero* criterion (SPEC §1, ReLU family): neuron active iff σ(gate) ≠ 0."""
    _require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    return activation_TxF != 0


def fat_active_TxF(activation_TxF: Array, eps) -> Array:
    """FAT-ε (SPEC §1; reference ``prune_fat``): active iff |σ(gate)| ≥ ε + 1e-18.

    The reference masks ``x.float().abs() < (eps + 1e-18)``: the sum is a Python float rounded to
    float32 for the comparison, which is what a Python ``eps`` gets here. A traced ``eps`` is
    summed in float32 (``f32(ε) + f32(1e-18)``), which can differ from that by one float32 ulp.
    At ε = 0 this is |σ(gate)| ≥ f32(1e-18): the *zero* criterion except that magnitudes in
    (0, 1e-18) count as inactive.
    """
    _require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    if isinstance(eps, (int, float)):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        threshold = np.float32(eps + FAT_FLOOR)
    else:
        threshold = _f32(eps) + np.float32(FAT_FLOOR)
    # Written as not(<) like the reference, so a NaN activation counts as active.
    return ~(jnp.abs(_f32(activation_TxF)) < threshold)


def resolve_topk(k: int | float, d_ff: int) -> int:
    """Neurons kept per token: an int k in [1, d_ff], or a float fraction f in (0, 1].

    A fraction keeps ``d_ff − int(d_ff · (1 − f))`` neurons, the count the reference's
    ``prune_topk`` keeps for fraction f.
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
    count = d_ff - int(d_ff * (1.0 - k))
    if count < 1:
        raise ValueError(f"k={k} keeps no neuron of d_ff={d_ff}")
    return count


def topk_active_TxF(activation_TxF: Array, k: int | float) -> Array:
    """Per-token top-k (SPEC §1; Lazy Neuron, Q-Sparse): keep the k largest |σ(gate)| per token.

    ``k`` is static (see ``resolve_topk``). Ties go to the lower neuron index (``lax.top_k``).
    As in the reference's top-k, a selected entry with |σ(gate)| < 1e-18 is inactive, so a token
    with fewer than k non-zero activations has fewer than k active neurons.
    """
    _require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    n_tokens, d_ff = activation_TxF.shape
    abs_TxF = jnp.abs(_f32(activation_TxF))
    _, index_TxK = jax.lax.top_k(abs_TxF, resolve_topk(k, d_ff))
    selected_TxF = jnp.zeros((n_tokens, d_ff), bool).at[
        jnp.arange(n_tokens)[:, None], index_TxK].set(True)
    return selected_TxF & (abs_TxF >= np.float32(FAT_FLOOR))


def global_topk_active_TxF(activation_TxF: Array, fraction: float) -> Array:
    """The reference's global top-k (``prune_topk``): keep the top ``fraction`` of |σ(gate)| over
    all tokens × neurons of the layer.

    The ``int(numel · (1 − fraction))`` smallest magnitudes are dropped (the empirical
    (1 − fraction)-quantile is the cut), then, as in the reference, anything with
    |σ(gate)| < 1e-18 is inactive too. Ties at the cut go to the lower flat index (stable sort;
    torch.topk's choice is unspecified). Departure: the reference pools the tokens of its
    batch; pass all of a layer's evaluation tokens to pool them the same way.
    """
    _require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be a float in (0, 1], got {fraction!r}")
    abs_N = jnp.abs(_f32(activation_TxF)).reshape(-1)
    num_to_zero = int(abs_N.size * (1.0 - fraction))
    dropped_N = jnp.argsort(abs_N, stable=True)[:num_to_zero]
    keep_N = jnp.ones(abs_N.shape, bool).at[dropped_N].set(False)
    return (keep_N & (abs_N >= np.float32(FAT_FLOOR))).reshape(activation_TxF.shape)


def dead_neurons(active_TxF: Array, min_rate: float = DEAD_MIN_RATE) -> tuple[Array, Array]:
    """Dead neurons (SPEC §1): per-neuron activation frequency over tokens below ``min_rate``.

    Returns ``(dead_F, dead_share)``.
    """
    _require_ndim("active_TxF", active_TxF, 2, "tokens, d_ff")
    # count < min_rate·T holds for an integer count iff count < ⌈min_rate·T⌉. Comparing counts
    # avoids float32 rate division, which XLA turns into a multiply by 1/T for a constant T and
    # which then puts e.g. 5/5000 just below 1e-3.
    count_F = jnp.sum(active_TxF, axis=0, dtype=jnp.int32)
    dead_F = count_F < math.ceil(min_rate * active_TxF.shape[0])
    return dead_F, jnp.mean(dead_F)


# ----------------------------------------------------------------------------------------------
# Chunk-level sparsity (BlockFFN, SPEC §5) and the independent-rate prediction (SPEC §6)
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
    union_BxNxF = jnp.any(active_BxLxF[:, :used].reshape(n_batch, n_chunks, chunk_len, d_ff), axis=2)
    counted_BxN = jnp.all(valid_BxL[:, :used].reshape(n_batch, n_chunks, chunk_len), axis=2)
    active_count_F = jnp.sum(union_BxNxF & counted_BxN[..., None], axis=(0, 1), dtype=jnp.int32)
    return active_count_F, jnp.sum(counted_BxN, dtype=jnp.int32)


def chunk_sparsity(active_BxLxF: Array, chunk_len: int, valid_BxL: Array | None = None) -> Array:
    """Chunk-level sparsity (BlockFFN, Song et al. 2025; SPEC §5): the share of (chunk, neuron)
    pairs in which the neuron is inactive for every token of the chunk.

    ``active_BxLxF`` keeps the sequence axis so chunks never straddle two sequences. A sequence
    contributes its ⌊L / chunk_len⌋ full chunks from position 0; the ragged tail is dropped so
    every counted chunk has exactly ``chunk_len`` tokens. With ``valid_BxL`` (False = padding), a
    chunk containing padding is dropped. NaN when no chunk is counted. chunk_len = 1 gives the
    token-level sparsity 1 − activation ratio.
    """
    _check_chunk_len(chunk_len)
    _require_ndim("active_BxLxF", active_BxLxF, 3, "batch, seq, d_ff")
    valid_BxL = _valid_or_all(valid_BxL, active_BxLxF.shape[:2])
    active_count_F, n_chunks = _chunk_counts(active_BxLxF, valid_BxL, chunk_len)
    return 1.0 - jnp.sum(active_count_F) / (n_chunks * np.float32(active_BxLxF.shape[2]))


def chunk_sparsity_curve(active_BxLxF: Array, chunk_lens: Sequence[int] = CHUNK_LENS,
                         valid_BxL: Array | None = None) -> Array:
    """``chunk_sparsity`` for each chunk length, as a [len(chunk_lens)] array."""
    return jnp.stack([chunk_sparsity(active_BxLxF, c, valid_BxL) for c in chunk_lens])


def independent_chunk_density(rate, chunk_len: int):
    """SPEC §6: a neuron active independently with rate r per token is active in a chunk of B
    tokens with probability 1 − (1 − r)^B (elementwise).

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


def _histogram(abs_N: Array, weight_N: Array, edges_E: Array) -> Array:
    # side='right' makes every bin half-open [e_{i-1}, e_i): slot 0 is below e_0 (zeros fall there
    # for log edges), slot E is ≥ e_{E-1}.
    slot_N = jnp.searchsorted(edges_E, abs_N, side="right")
    return jax.ops.segment_sum(weight_N.astype(jnp.int32), slot_N, num_segments=edges_E.shape[0] + 1)


def activation_histogram(activation_TxF: Array, edges_E) -> Array:
    """Counts of |σ(gate)| over increasing edges e_0 < … < e_{E−1}, as E + 1 int32 slots:
    [underflow |a| < e_0, the E − 1 bins [e_{i−1}, e_i), overflow |a| ≥ e_{E−1}].

    Every bin is half-open, including the last (unlike ``np.histogram``); NaNs land in the
    overflow slot. ``edges_E`` may be traced; its length fixes the output shape.
    """
    _require_ndim("activation_TxF", activation_TxF, 2, "tokens, d_ff")
    _require_ndim("edges_E", edges_E, 1, "edges")
    abs_N = jnp.abs(_f32(activation_TxF)).reshape(-1)
    return _histogram(abs_N, jnp.ones(abs_N.shape, bool), _f32(edges_E))


# ----------------------------------------------------------------------------------------------
# CETT (cumulative errors of tail truncation)
# ----------------------------------------------------------------------------------------------

def cett_scores_TxF(hidden_TxF: Array, w_out_FxD: Array) -> Array:
    """CETT neuron scores (SPEC §1): score_i = |σ(gate)_i · up_i| · ‖W_out[:, i]‖₂ = ‖n_i‖₂."""
    _check_ffn_shapes(hidden_TxF, w_out_FxD)
    return jnp.abs(_f32(hidden_TxF)) * jnp.linalg.norm(_f32(w_out_FxD), axis=1)


def _ffn_out_TxD(hidden_TxF: Array, w_out_FxD: Array) -> Array:
    return jnp.matmul(hidden_TxF, w_out_FxD, precision=_HIGHEST)


def _tail_sum_TxD(hidden_TxF: Array, scores_TxF: Array, w_out_FxD: Array, threshold) -> Array:
    # The reference zeroes the neurons with score > t and multiplies what is left: the dropped
    # tail D = {score ≤ t}, so a score equal to t is dropped.
    return _ffn_out_TxD(jnp.where(scores_TxF <= threshold, hidden_TxF, 0.0), w_out_FxD)


def _ratios_T(tail_TxD: Array, full_norm_T: Array) -> Array:
    nonzero_T = full_norm_T > 0
    safe_T = jnp.where(nonzero_T, full_norm_T, 1.0)
    return jnp.where(nonzero_T, jnp.linalg.norm(tail_TxD, axis=-1) / safe_T, 0.0)


def cett_per_token_T(hidden_TxF: Array, w_out_FxD: Array, threshold) -> Array:
    """Per-token CETT at threshold t: ‖Σ_{i∈D} n_i‖₂ / ‖FFN(x)‖₂ with D = {i : score_i ≤ t}.

    This is the error of keeping only the neurons with score > t: ‖FFN(x) − kept‖ / ‖FFN(x)‖.
    (SPEC §1 calls the reference's numerator the "kept" output; in the code it is the output of
    the tensor whose entries with score > t were zeroed, i.e. of the dropped tail, which matches
    the formula.) Departures: D uses ≤ t as the reference's search does, where the paper writes
    < t; a token with ‖FFN(x)‖ = 0 contributes 0 (the reference divides by zero and gets NaN).
    """
    _check_ffn_shapes(hidden_TxF, w_out_FxD)
    hidden_TxF, w_out_FxD = _f32(hidden_TxF), _f32(w_out_FxD)
    full_norm_T = jnp.linalg.norm(_ffn_out_TxD(hidden_TxF, w_out_FxD), axis=-1)
    tail_TxD = _tail_sum_TxD(hidden_TxF, cett_scores_TxF(hidden_TxF, w_out_FxD), w_out_FxD,
                             threshold)
    return _ratios_T(tail_TxD, full_norm_T)


def cett_at_threshold(hidden_TxF: Array, w_out_FxD: Array, threshold) -> Array:
    """CETT(t) = mean over tokens of ``cett_per_token_T`` (SPEC §1). To pool batches, sum
    ``cett_per_token_T`` over them and divide by the total token count."""
    return jnp.mean(cett_per_token_T(hidden_TxF, w_out_FxD, threshold))


def cett_active_TxF(hidden_TxF: Array, w_out_FxD: Array, threshold) -> Array:
    """Activity under a CETT threshold t, as the reference's sparse pass: neuron i is inactive
    iff |σ(gate)·up|_i < t / ‖W_out[:, i]‖₂ (strict, and in division form, so it can differ from
    ``score < t`` by rounding, and from the search's ``score ≤ t`` at equality).

    A neuron with a zero output vector is inactive for t > 0; at t = 0 its threshold is NaN and
    it stays active, as in the reference.
    """
    _check_ffn_shapes(hidden_TxF, w_out_FxD)
    neuron_threshold_F = _f32(threshold) / jnp.linalg.norm(_f32(w_out_FxD), axis=1)
    return ~(jnp.abs(_f32(hidden_TxF)) < neuron_threshold_F)


class CettSearchResult(NamedTuple):
    threshold: float  # grid[index] (a float32 value)
    index: int  # position on the candidate grid
    cett: float  # CETT(threshold) as evaluated by the search
    satisfied: bool  # cett ≤ target; False only when even grid[0] exceeds the target
    num_evaluations: int


class _Batch(NamedTuple):
    hidden_TxF: Array
    scores_TxF: Array
    full_TxD: Array
    full_norm_T: Array


_scores_jit = jax.jit(cett_scores_TxF)
_ffn_out_jit = jax.jit(_ffn_out_TxD)
_tail_sum_jit = jax.jit(_tail_sum_TxD)
_ratio_sum_jit = jax.jit(lambda tail_TxD, full_norm_T: jnp.sum(_ratios_T(tail_TxD, full_norm_T)))
_norm_rows_jit = jax.jit(lambda x_TxD: jnp.linalg.norm(x_TxD, axis=-1))
_count_between_jit = jax.jit(
    lambda s_TxF, lo, hi: jnp.sum((s_TxF > lo) & (s_TxF <= hi), dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames="n_rows")
def _scatter_sum_TxD(rows_N, cols_N, vals_N, w_out_FxD, n_chunks, *, n_rows: int):
    """Σ_e vals[e] · w_out[cols[e]] into row rows[e], over the first n_chunks chunks.

    ``n_chunks`` is traced, so one compile serves every step of one padded capacity.
    """
    def add_chunk(i, acc_TxD):
        def take(x_N):
            return jax.lax.dynamic_slice_in_dim(x_N, i * _SCATTER_CHUNK, _SCATTER_CHUNK)
        return acc_TxD.at[take(rows_N)].add(take(vals_N)[:, None] * w_out_FxD[take(cols_N)])
    zeros_TxD = jnp.zeros((n_rows, w_out_FxD.shape[1]), w_out_FxD.dtype)
    return jax.lax.fori_loop(0, n_chunks, add_chunk, zeros_TxD)


def _as_batches(hidden) -> list[Array]:
    batches = list(hidden) if isinstance(hidden, (list, tuple)) else [hidden]
    if not batches:
        raise ValueError("hidden_TxF must be a 2-D array or a non-empty sequence of them")
    return batches


def _prepare(hidden, w_out_FxD) -> tuple[Array, list[_Batch], int]:
    w_out_FxD = _f32(w_out_FxD)
    batches = []
    for hidden_TxF in _as_batches(hidden):
        _check_ffn_shapes(hidden_TxF, w_out_FxD)
        if hidden_TxF.shape[0] == 0:
            continue
        hidden_TxF = _f32(hidden_TxF)
        full_TxD = _ffn_out_jit(hidden_TxF, w_out_FxD)
        batches.append(_Batch(hidden_TxF, _scores_jit(hidden_TxF, w_out_FxD), full_TxD,
                              _norm_rows_jit(full_TxD)))
    n_tokens = sum(b.hidden_TxF.shape[0] for b in batches)
    if n_tokens == 0:
        raise ValueError("hidden_TxF has no tokens")
    return w_out_FxD, batches, n_tokens


def _linspace_f32(start: np.float32, end: np.float32, num: int) -> np.ndarray:
    # float32 arithmetic in the two-sided form of torch.linspace's kernel (start + i·step for the
    # first half, end − (num − 1 − i)·step for the second), so both endpoints are exact. The
    # result is nondecreasing, which the incremental search relies on: each half is monotone in
    # i, and at the junction the two offsets sum to < end − start, so rounding cannot cross.
    step = (end - start) / np.float32(num - 1)
    index = np.arange(num)
    half = num // 2
    low = start + step * index[:half].astype(np.float32)
    high = end - step * (num - 1 - index[half:]).astype(np.float32)
    return np.concatenate([low, high])


def _candidates(batches: Sequence[_Batch], num_candidates: int) -> np.ndarray:
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) \
            or num_candidates < 2:
        raise ValueError(f"num_candidates must be an int >= 2, got {num_candidates!r}")
    low = min(np.float32(jnp.min(b.scores_TxF)) for b in batches)
    numel = sum(b.scores_TxF.size for b in batches)
    stride = max(numel // num_candidates, 1)
    # Every stride-th element of the pooled flattened scores, the batches laid end to end.
    subsample, offset = [], 0
    for b in batches:
        flat = b.scores_TxF.reshape(-1)
        subsample.append(np.asarray(flat[(-offset) % stride::stride]))
        offset += flat.size
    # torch.quantile interpolates in float32; float64 then rounding is within one ulp of it.
    high = np.float32(np.quantile(np.concatenate(subsample).astype(np.float64), CETT_MAX_QUANTILE))
    return _linspace_f32(low, high, num_candidates)


def cett_candidates_N(hidden, w_out_FxD: Array,
                      num_candidates: int = CETT_NUM_CANDIDATES) -> np.ndarray:
    """The reference's CETT threshold grid (``calc_thresholds_given_cett``): a float32 linspace
    of ``num_candidates`` points from the minimum score over all tokens to the 0.99 quantile
    (linear interpolation) of every ⌊numel / num_candidates⌋-th (at least every 1st) element of
    the flattened scores. ``hidden`` is a [T, F] array or a list/tuple of them, pooled in
    order.
    """
    _, batches, _ = _prepare(hidden, w_out_FxD)
    return _candidates(batches, num_candidates)


def _bisect(grid_N: np.ndarray, target: float, evaluate: Callable[[int], float]) -> CettSearchResult:
    """The reference bisection over grid indices, with its two edges defined.

    Reference: left, right = 0, N − 1; while left < right: mid = (left + right) // 2; right = mid
    if CETT(grid[mid]) > target else left = mid + 1; return grid[left − 1]. Every evaluated mid
    left of the final ``left`` satisfied the target and the final ``left`` (when < N − 1) failed
    it, so grid[left − 1] is a crossing: CETT ≤ target there, > target one candidate up.
    Departures, both at the edges only:
    - left = 0 (even grid[0] exceeds the target): the reference's ``thresholds[-1]`` wraps around
      to the top of the grid, pruning the most; this returns grid[0] (``satisfied`` False), the
      minimum score, under which the sparse pass's strict ``<`` prunes nothing (up to rounding);
    - left = N − 1 (no evaluated candidate exceeded): the reference never evaluates grid[N − 1]
      and returns grid[N − 2]; this evaluates it and returns it if it satisfies the target.
    """
    values = {}
    left, right = 0, len(grid_N) - 1
    while left < right:
        mid = (left + right) // 2
        values[mid] = evaluate(mid)
        if values[mid] > target:
            right = mid
        else:
            left = mid + 1
    last = len(grid_N) - 1
    if left == 0:
        index = 0
    elif left == last:
        values[last] = evaluate(last)
        index = last if values[last] <= target else last - 1
    else:
        index = left - 1
    return CettSearchResult(threshold=float(grid_N[index]), index=index, cett=values[index],
                            satisfied=bool(values[index] <= target), num_evaluations=len(values))


def _check_target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)) \
            or math.isnan(target):
        raise ValueError(f"target must be a real number (a CETT value, usually in [0, 1]), "
                         f"got {target!r}")
    return float(target)


def _pooled_cett(tails: Sequence[Array], batches: Sequence[_Batch], n_tokens: int) -> float:
    return sum(float(_ratio_sum_jit(t, b.full_norm_T)) for t, b in zip(tails, batches)) / n_tokens


def cett_threshold_reference(hidden, w_out_FxD: Array, target: float, *,
                             num_candidates: int = CETT_NUM_CANDIDATES) -> CettSearchResult:
    """The reference CETT threshold search (``calc_thresholds_given_cett``; SPEC §1).

    Candidates from ``cett_candidates_N``; a bisection (see ``_bisect`` for its edges) in which
    each step is one jitted pass per batch: a masked [T, F] @ [F, D] matmul, never a
    [candidates × T × F] tensor. CETT(t) is ``cett_per_token_T`` pooled over all tokens.

    CETT is not monotone in t (adding a neuron's vector can shrink a norm), so the result is a
    crossing point, CETT(t*) ≤ target < CETT(next candidate), not necessarily the largest t
    with CETT(t) ≤ target (SPEC §1).

    Streaming: ``hidden`` may be a sequence of [T_b, F] batches of one layer (device arrays:
    each is read once per step). Their scores are pooled for the grid's minimum and strided
    quantile, and CETT(t) sums per-token ratios over batches, so the result equals the search on
    the concatenation up to float32 summation order. Memory: the batches plus their scores
    (tokens × d_ff each) and FFN outputs (tokens × d_model); one layer at a time.
    """
    target = _check_target(target)
    w_out_FxD, batches, n_tokens = _prepare(hidden, w_out_FxD)
    grid_N = _candidates(batches, num_candidates)

    def evaluate(index: int) -> float:
        tails = [_tail_sum_jit(b.hidden_TxF, b.scores_TxF, w_out_FxD, grid_N[index])
                 for b in batches]
        return _pooled_cett(tails, batches, n_tokens)

    return _bisect(grid_N, target, evaluate)


class _Entries(NamedTuple):
    """Host copies of one batch's (token, neuron) entries with scores inside the bracket, in
    row-major order (so scatter-adds walk the output rows in order)."""
    scores: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    capacity: int  # padded length passed to the kernel: a power of two, fixed per compaction


class _IncrementalCett:
    """CETT evaluator for the incremental search. It keeps the dropped-tail sums S(t) at the two
    ends of the bisection bracket (t_lo, t_hi] and gets S(t_mid) from the nearer one:
    S(t_mid) = S(t_lo) + Σ_{t_lo < score ≤ t_mid} n_i or S(t_hi) − Σ_{t_mid < score ≤ t_hi} n_i,
    summing over the smaller half. While the bracket is wide a step is the reference's dense
    masked matmul; once the bracket holds ≤ 2 × ``switch_count`` entries they are compacted on
    the host, and a step whose smaller half holds ≤ ``switch_count`` entries scatter-adds only
    that half.
    """

    def __init__(self, batches: list[_Batch], w_out_FxD: Array, grid_N: np.ndarray,
                 target: float, n_tokens: int, switch_count: int):
        self.batches, self.w_out_FxD, self.grid_N = batches, w_out_FxD, grid_N
        self.target, self.n_tokens, self.switch_count = target, n_tokens, switch_count
        self.lo_t, self.lo_tails = -np.inf, [jnp.zeros_like(b.full_TxD) for b in batches]
        self.hi_t, self.hi_tails = np.inf, [b.full_TxD for b in batches]
        self.entries: list[_Entries] | None = None

    def _bracket_bounds(self) -> tuple[np.float32, np.float32]:
        # Zero scores (exact zeros of σ(gate)·up, ReLU's majority) add exact zeros: leave them out.
        return np.float32(max(self.lo_t, 0.0)), np.float32(self.hi_t)

    def _bracket_count(self) -> int:
        lo, hi = self._bracket_bounds()
        return sum(int(_count_between_jit(b.scores_TxF, lo, hi)) for b in self.batches)

    def _compact(self) -> list[_Entries]:
        lo, hi = self._bracket_bounds()
        entries = []
        for b in self.batches:
            scores = np.asarray(b.scores_TxF).reshape(-1)
            flat = np.flatnonzero((scores > lo) & (scores <= hi))
            d_ff = b.scores_TxF.shape[1]
            capacity = max(_SCATTER_CHUNK, 1 << max(flat.size - 1, 0).bit_length())
            entries.append(_Entries(scores[flat], (flat // d_ff).astype(np.int32),
                                    (flat % d_ff).astype(np.int32),
                                    np.asarray(b.hidden_TxF).reshape(-1)[flat], capacity))
        return entries

    def _entry_sum(self, e: _Entries, select: np.ndarray, n_rows: int) -> Array:
        n = int(select.sum())
        # Zero padding up to the fixed capacity adds 0 to row 0 and is skipped by n_chunks anyway.
        padded = [np.pad(a[select], (0, e.capacity - n)) for a in (e.rows, e.cols, e.vals)]
        return _scatter_sum_TxD(*padded, self.w_out_FxD, -(-n // _SCATTER_CHUNK), n_rows=n_rows)

    def _dense_tails(self, t: np.float32) -> list[Array]:
        return [_tail_sum_jit(b.hidden_TxF, b.scores_TxF, self.w_out_FxD, t) for b in self.batches]

    def __call__(self, index: int) -> float:
        # The grid is nondecreasing and the bisection's mids lie strictly inside the bracket of
        # evaluated indices, so t_lo ≤ t ≤ t_hi.
        t = self.grid_N[index]
        if self.entries is None and self._bracket_count() <= 2 * self.switch_count:
            self.entries = self._compact()
        lower = None
        if self.entries is None:
            tails = self._dense_tails(t)
        else:
            lower = [e.scores <= t for e in self.entries]  # bracket entries in (t_lo, t]
            n_lower = sum(int(m.sum()) for m in lower)
            n_upper = sum(e.scores.size for e in self.entries) - n_lower
            if min(n_lower, n_upper) > self.switch_count:
                tails = self._dense_tails(t)
            elif n_lower <= n_upper:
                tails = [s + self._entry_sum(e, m, s.shape[0])
                         for s, e, m in zip(self.lo_tails, self.entries, lower)]
            else:
                tails = [s - self._entry_sum(e, ~m, s.shape[0])
                         for s, e, m in zip(self.hi_tails, self.entries, lower)]
        value = _pooled_cett(tails, self.batches, self.n_tokens)
        exceeds = value > self.target
        if exceeds:
            self.hi_t, self.hi_tails = t, tails
        else:
            self.lo_t, self.lo_tails = t, tails
        if lower is not None:
            self.entries = [_Entries(*(a[m if exceeds else ~m] for a in e[:4]), e.capacity)
                            for e, m in zip(self.entries, lower)]
        return value


def cett_threshold_incremental(hidden, w_out_FxD: Array, target: float, *,
                               num_candidates: int = CETT_NUM_CANDIDATES,
                               sparse_switch_fraction: float = CETT_SPARSE_SWITCH_FRACTION,
                               ) -> CettSearchResult:
    """Same grid, same bisection and same answer as ``cett_threshold_reference``, faster.

    Each step reuses the dropped-tail sums of the bracket ends (``_IncrementalCett``): dense
    masked matmuls while the bracket is wide, then sparse updates over the smaller half of the
    bracket once that half holds ≤ ``sparse_switch_fraction`` of the layer's (token, neuron)
    entries. The halves shrink geometrically, so the late steps cost little.

    Why it is exact: the bisection visits the same candidates as long as every comparison
    CETT(mid) > target comes out the same. Dense steps are the reference's jitted computation,
    bit for bit. A sparse step drops exactly the same set {score ≤ t} (the same float32 scores
    and candidates are compared) and gets the same vector sums in exact arithmetic, but in a
    different float32 summation order (and S(t_hi) − Δ can cancel); so the two searches can
    differ only if some visited CETT(mid) lies within that rounding (≈1e-7–1e-6 relative) of
    the target. The pooled batches, grid and edge rules are those of
    ``cett_threshold_reference``. Memory adds two tokens × d_model tail sums per batch and, from
    the switch on, host copies of the scores and hidden values (read once) and of the bracket's
    entries.
    """
    target = _check_target(target)
    if not 0.0 <= sparse_switch_fraction <= 1.0:
        raise ValueError(f"sparse_switch_fraction must be in [0, 1], got {sparse_switch_fraction}")
    w_out_FxD, batches, n_tokens = _prepare(hidden, w_out_FxD)
    grid_N = _candidates(batches, num_candidates)
    numel = sum(b.scores_TxF.size for b in batches)
    evaluate = _IncrementalCett(batches, w_out_FxD, grid_N, target, n_tokens,
                                switch_count=int(sparse_switch_fraction * numel))
    return _bisect(grid_N, target, evaluate)


# ----------------------------------------------------------------------------------------------
# Streaming accumulators
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["n_tokens", "active_count_F", "chunk_active_count_CxF",
                                "n_chunks_C", "hist_count_H"],
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
    hist_count_H: Array  # [E + 1] |σ(gate)| histogram slots (see activation_histogram)
    chunk_lens: tuple[int, ...]
    hist_edges: tuple[float, ...]


class SparsityReport(NamedTuple):
    activation_ratio: Array  # mean over tokens of |active| / d_ff
    neuron_rate_F: Array  # per-neuron activation frequency
    dead_F: Array  # neuron_rate_F < min_rate
    dead_share: Array
    chunk_sparsity_C: Array  # measured, per chunk length (BlockFFN CLS)
    chunk_sparsity_independent_C: Array  # mean_i (1 − r_i)^L, the SPEC §6 independent prediction
    hist_count_H: Array


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
        hist_count_H=jnp.zeros((len(edges) + 1,), jnp.int32),
        chunk_lens=tuple(chunk_lens), hist_edges=edges)


def stats_update(stats: SparsityStats, active_BxLxF: Array, activation_BxLxF: Array | None = None,
                 valid_BxL: Array | None = None) -> SparsityStats:
    """Add one batch: ``active_BxLxF`` from any criterion, in sequence order; the histogram is of
    |``activation_BxLxF``| and is skipped when it is None; ``valid_BxL`` marks real tokens."""
    _require_ndim("active_BxLxF", active_BxLxF, 3, "batch, seq, d_ff")
    if active_BxLxF.shape[2] != stats.active_count_F.shape[0]:
        raise ValueError(f"active_BxLxF has d_ff={active_BxLxF.shape[2]}, the stats "
                         f"{stats.active_count_F.shape[0]}")
    valid_BxL = _valid_or_all(valid_BxL, active_BxLxF.shape[:2])
    active_BxLxF = jnp.asarray(active_BxLxF, bool) & valid_BxL[..., None]
    chunk_counts = [_chunk_counts(active_BxLxF, valid_BxL, c) for c in stats.chunk_lens]
    hist_count_H = stats.hist_count_H
    if activation_BxLxF is not None:
        if np.shape(activation_BxLxF) != active_BxLxF.shape:
            raise ValueError(f"activation_BxLxF must have shape {active_BxLxF.shape}, got "
                             f"{np.shape(activation_BxLxF)}")
        hist_count_H = hist_count_H + _histogram(
            jnp.abs(_f32(activation_BxLxF)).reshape(-1),
            jnp.broadcast_to(valid_BxL[..., None], active_BxLxF.shape).reshape(-1),
            jnp.asarray(stats.hist_edges, jnp.float32))
    return dataclasses.replace(
        stats,
        n_tokens=stats.n_tokens + jnp.sum(valid_BxL, dtype=jnp.int32),
        active_count_F=stats.active_count_F + jnp.sum(active_BxLxF, axis=(0, 1), dtype=jnp.int32),
        chunk_active_count_CxF=stats.chunk_active_count_CxF + jnp.stack([a for a, _ in chunk_counts]),
        n_chunks_C=stats.n_chunks_C + jnp.stack([n for _, n in chunk_counts]),
        hist_count_H=hist_count_H)


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
        hist_count_H=stats.hist_count_H)
