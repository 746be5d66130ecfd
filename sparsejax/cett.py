"""CETT (cumulative errors of tail truncation) of one FFN layer: neuron scores, CETT(t), the
activity under a CETT threshold, and the reference's host-driven threshold search (Sparsing Law,
arXiv 2411.02335). Definitions and the reference procedure: docs/sparsity_metrics_and_laws.md;
"docs §X" below means its section X (§CETT, §Reference procedure, §Departures).

Inputs, per layer (callers loop over layers):

- ``hidden_TxF``: the gated intermediate σ(gate)·up (σ(W_in x) in a plain FFN), flattened over
  unpadded tokens; the searches also take a list/tuple of such batches and pool them;
- ``w_out_FxD``: the output projection; neuron i's output vector is ``w_out_FxD[i]``, and the FFN
  output of a token is ``hidden_TxF @ w_out_FxD``.

``cett_scores_TxF``, ``cett_per_token_T``, ``cett_at_threshold`` and ``cett_active_TxF`` are
jittable. The searches (``cett_threshold_reference``, ``cett_threshold_incremental``) run a host
loop of jitted steps over the candidate grid of ``cett_candidates_G``. The reference code is
thunlp/SparsingLaw ``src/model_utils.py`` (``calc_thresholds_given_cett``, ``set_thresholds`` and
the sparse forward); each function says where it follows or departs from it. The module runs a
little over 450 lines on purpose: the two searches share the batches, grid, bisection and jitted
steps, and the incremental search is exact only relative to those internals, so they stay together.

ReLU and t = 0: a ReLU layer's minimum score is 0 (its exact zeros), so the grid starts at 0 and
the search can return t = 0 — when even grid[1] exceeds the target, or when over ~99% of the
subsampled scores are 0, so that the 0.99 quantile and with it the whole grid are 0. The
reference's sparse pass then tests |σ(gate)·up| < 0 / ‖W_out[i]‖, which drops nothing: every
neuron counts as active, exact zeros included, and the CETT ratio of the sparsest layers reads 1.0
where the *zero* criterion reads the true ReLU ratio. By default (``zero_rule="floor"``) the
per-neuron threshold gets the FAT-ε floor 1e-18 added, as FAT-ε does (``ε + 1e-18``): exact zeros
are inactive at t = 0 and nothing else changes (a floor of 1e-18 is below every float32 threshold
t / ‖W_out[i]‖ > 0 that matters, and dropping exact zeros changes no output). ``zero_rule=
"reference"`` keeps the reference's tie rule, for parity with its numbers (docs §Departures).

Shape suffixes (docs §Shape suffixes): T tokens, F d_ff, D d_model, G candidate thresholds,
P (token, neuron) entries.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.eval_options import CETT_ZERO_RULES
from sparsejax.metrics import as_f32, require_ndim
from sparsejax.sparsity import FAT_FLOOR, active

Array = jax.Array

CETT_NUM_CANDIDATES = 65_536  # reference grid size
CETT_MAX_QUANTILE = 0.99  # reference grid top: "drop the extreme values"
# Incremental CETT search: a step sums the smaller half of the bisection bracket sparsely when
# that half holds at most this share of the layer's (token, neuron) entries, else it runs the
# dense masked matmul. On a 2-core CPU a sparse entry costs ≈ 10× a dense one (0.11 µs vs
# 11 ns at d_model 768), so ≈ 6% leaves room for the host-side compaction.
CETT_SPARSE_SWITCH_FRACTION = 0.06
# Entries per scatter-add step: row-sorted chunks of 1–2k entries keep W_out rows and the
# touched output rows in cache (measured fastest on CPU).
_SCATTER_CHUNK = 1024
_HIGHEST = jax.lax.Precision.HIGHEST  # CETT is a float32 metric: no bf16/TF32 passes on TPU/GPU


def _check_ffn_shapes(hidden_TxF, w_out_FxD) -> None:
    require_ndim("hidden_TxF", hidden_TxF, 2, "tokens, d_ff")
    require_ndim("w_out_FxD", w_out_FxD, 2, "d_ff, d_model")
    if np.shape(hidden_TxF)[1] != np.shape(w_out_FxD)[0]:
        raise ValueError(f"hidden_TxF has d_ff={np.shape(hidden_TxF)[1]} but w_out_FxD has "
                         f"d_ff={np.shape(w_out_FxD)[0]}")


# ----------------------------------------------------------------------------------------------
# Scores, CETT(t) and activity (jittable)
# ----------------------------------------------------------------------------------------------

def cett_scores_TxF(hidden_TxF: Array, w_out_FxD: Array) -> Array:
    """CETT neuron scores (docs §CETT): score_i = |σ(gate)_i · up_i| · ‖W_out[:, i]‖₂ = ‖n_i‖₂."""
    _check_ffn_shapes(hidden_TxF, w_out_FxD)
    return jnp.abs(as_f32(hidden_TxF)) * jnp.linalg.norm(as_f32(w_out_FxD), axis=1)


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
    (The reference's numerator is the output of the tensor whose entries with score > t were
    zeroed, i.e. of the dropped tail, which matches the formula.) Departures: D uses ≤ t as the reference's search does, where the paper writes
    < t; a token with ‖FFN(x)‖ = 0 contributes 0 (the reference divides by zero and gets NaN).
    """
    _check_ffn_shapes(hidden_TxF, w_out_FxD)
    hidden_TxF, w_out_FxD = as_f32(hidden_TxF), as_f32(w_out_FxD)
    full_norm_T = jnp.linalg.norm(_ffn_out_TxD(hidden_TxF, w_out_FxD), axis=-1)
    tail_TxD = _tail_sum_TxD(hidden_TxF, cett_scores_TxF(hidden_TxF, w_out_FxD), w_out_FxD,
                             threshold)
    return _ratios_T(tail_TxD, full_norm_T)


def cett_at_threshold(hidden_TxF: Array, w_out_FxD: Array, threshold) -> Array:
    """CETT(t) = mean over tokens of ``cett_per_token_T`` (docs §CETT). To pool batches, sum
    ``cett_per_token_T`` over them and divide by the total token count."""
    return jnp.mean(cett_per_token_T(hidden_TxF, w_out_FxD, threshold))


def neuron_thresholds_F(threshold, w_out_FxD, zero_rule: str = "floor"):
    """Per-neuron thresholds of the sparse pass under a layer's CETT threshold t:
    t / ‖W_out[i]‖₂ (the reference's division form), plus the FAT-ε floor 1e-18 under
    ``zero_rule="floor"``. Works on numpy and jax arrays (float32).

    A neuron with a zero output vector gets t / 0: inf for t > 0 (always inactive, it contributes
    nothing), NaN at t = 0 — active under "reference" (as in the reference), the floor under
    "floor".
    """
    if zero_rule not in CETT_ZERO_RULES:
        raise ValueError(f"zero_rule={zero_rule!r}; allowed: {list(CETT_ZERO_RULES)}")
    xp = jnp if isinstance(w_out_FxD, jax.Array) else np
    w = xp.asarray(w_out_FxD, xp.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_neuron_F = xp.asarray(threshold, xp.float32) / xp.linalg.norm(w, axis=1)
    if zero_rule == "reference":
        return per_neuron_F
    return xp.where(xp.isnan(per_neuron_F), xp.float32(0), per_neuron_F) + xp.float32(FAT_FLOOR)


def cett_active_TxF(hidden_TxF: Array, w_out_FxD: Array, threshold, zero_rule: str = "floor") -> Array:
    """Activity under a CETT threshold t, as the sparse pass applies it: neuron i is inactive
    iff |σ(gate)·up|_i < :func:`neuron_thresholds_F` (strict, and in division form, so it can
    differ from ``score < t`` by rounding, and from the search's ``score ≤ t`` at equality).

    Under the default ``zero_rule="floor"`` exact zeros are inactive at every t, t = 0 included.
    Under ``zero_rule="reference"`` nothing is inactive at t = 0, exact zeros included, so the
    ratio is 1.0 (module docstring, "ReLU and t = 0"); a neuron with a zero output vector is
    inactive for t > 0 and active at t = 0 (NaN threshold), as in the reference.

    The comparison is the one active rule (:func:`sparsejax.sparsity.active`): ``|h| == t_i`` is
    active and a NaN value of σ(gate)·up is active (it is counted, not dropped).
    """
    _check_ffn_shapes(hidden_TxF, w_out_FxD)
    neuron_threshold_F = neuron_thresholds_F(as_f32(threshold), as_f32(w_out_FxD), zero_rule)
    return active(as_f32(hidden_TxF), neuron_threshold_F)


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
def _scatter_sum_TxD(rows_P, cols_P, vals_P, w_out_FxD, n_chunks, *, n_rows: int):
    """Σ_e vals[e] · w_out[cols[e]] into row rows[e], over the first n_chunks chunks.

    ``n_chunks`` is traced, so one compile serves every step of one padded capacity.
    """
    def add_chunk(i, acc_TxD):
        def take(x_P):
            return jax.lax.dynamic_slice_in_dim(x_P, i * _SCATTER_CHUNK, _SCATTER_CHUNK)
        return acc_TxD.at[take(rows_P)].add(take(vals_P)[:, None] * w_out_FxD[take(cols_P)])
    zeros_TxD = jnp.zeros((n_rows, w_out_FxD.shape[1]), w_out_FxD.dtype)
    return jax.lax.fori_loop(0, n_chunks, add_chunk, zeros_TxD)


def _as_batches(hidden) -> list[Array]:
    batches = list(hidden) if isinstance(hidden, (list, tuple)) else [hidden]
    if not batches:
        raise ValueError("hidden_TxF must be a 2-D array or a non-empty sequence of them")
    return batches


def _prepare(hidden, w_out_FxD) -> tuple[Array, list[_Batch], int]:
    w_out_FxD = as_f32(w_out_FxD)
    batches = []
    for hidden_TxF in _as_batches(hidden):
        _check_ffn_shapes(hidden_TxF, w_out_FxD)
        if hidden_TxF.shape[0] == 0:
            continue
        hidden_TxF = as_f32(hidden_TxF)
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


def _fma_f32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """a·b + c rounded once to float32 (a fused multiply-add), computed exactly with fractions."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    near = np.float32(float(exact))  # within one float32 ulp; pick the nearest of it and its neighbours
    candidates = [near, np.nextafter(near, np.float32(-np.inf)), np.nextafter(near, np.float32(np.inf))]
    return min(candidates, key=lambda x: (abs(Fraction(float(x)) - exact),
                                          int(np.asarray(x).view(np.uint32)) & 1))


def quantile_f32(values, q: float) -> np.float32:
    """``torch.quantile(values, q)`` (linear interpolation) of float32 values as torch computes it
    (``quantile_compute`` in ATen's Sorting.cpp): q becomes a float32 tensor, the rank
    q·(n − 1) is a float32 product, and the two order statistics around it are blended by
    ``torch.lerp`` in float32 — ``lo + w·(hi − lo)`` for weights w < 0.5, else
    ``hi − (hi − lo)·(1 − w)`` — with the multiply-add fused as CUDA, where the reference runs,
    compiles it.

    A float64 rank is not the same: f32(0.99) = 0.99000001, so for n ≈ 65,536 the float32 rank is
    ≈ 6.5e-4 higher, which moves the result by that share of the gap between the two order
    statistics (many float32 ulps when the gap is wide) and with it the whole CETT grid.
    """
    sorted_P = np.sort(np.asarray(values, np.float32).reshape(-1))
    if sorted_P.size == 0:
        raise ValueError("quantile of an empty array")
    rank = np.float32(q) * np.float32(sorted_P.size - 1)  # n − 1 < 2^24 (torch checks): exact
    below, above = int(rank), int(np.ceil(rank))
    weight = rank - np.float32(below)
    lo, hi = sorted_P[below], sorted_P[above]
    if weight < np.float32(0.5):
        return _fma_f32(weight, hi - lo, lo)
    return _fma_f32(weight - np.float32(1.0), hi - lo, hi)


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
    high = quantile_f32(np.concatenate(subsample), CETT_MAX_QUANTILE)
    return _linspace_f32(low, high, num_candidates)


def cett_candidates_G(hidden, w_out_FxD: Array,
                      num_candidates: int = CETT_NUM_CANDIDATES) -> np.ndarray:
    """The reference's CETT threshold grid (``calc_thresholds_given_cett``): a float32 linspace
    of ``num_candidates`` points from the minimum score over all tokens to the 0.99 quantile
    (linear interpolation) of every ⌊numel / num_candidates⌋-th (at least every 1st) element of
    the flattened scores. ``hidden`` is a [T, F] array or a list/tuple of them, pooled in
    order.
    """
    _, batches, _ = _prepare(hidden, w_out_FxD)
    return _candidates(batches, num_candidates)


def _bisect(grid_G: np.ndarray, target: float, evaluate: Callable[[int], float]) -> CettSearchResult:
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
    left, right = 0, len(grid_G) - 1
    while left < right:
        mid = (left + right) // 2
        values[mid] = evaluate(mid)
        if values[mid] > target:
            right = mid
        else:
            left = mid + 1
    last = len(grid_G) - 1
    if left == 0:
        index = 0
    elif left == last:
        values[last] = evaluate(last)
        index = last if values[last] <= target else last - 1
    else:
        index = left - 1
    return CettSearchResult(threshold=float(grid_G[index]), index=index, cett=values[index],
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
    """The reference CETT threshold search (``calc_thresholds_given_cett``; docs §Reference procedure).

    Candidates from ``cett_candidates_G``; a bisection (see ``_bisect`` for its edges) in which
    each step is one jitted pass per batch: a masked [T, F] @ [F, D] matmul, never a
    [candidates × T × F] tensor. CETT(t) is ``cett_per_token_T`` pooled over all tokens.

    CETT is not monotone in t (adding a neuron's vector can shrink a norm), so the result is a
    crossing point, CETT(t*) ≤ target < CETT(next candidate), not necessarily the largest t
    with CETT(t) ≤ target (docs §CETT).

    Streaming: ``hidden`` may be a sequence of [T_b, F] batches of one layer (device arrays:
    each is read once per step). Their scores are pooled for the grid's minimum and strided
    quantile, and CETT(t) sums per-token ratios over batches, so the result equals the search on
    the concatenation up to float32 summation order. Memory: the batches plus their scores
    (tokens × d_ff each) and FFN outputs (tokens × d_model); one layer at a time.
    """
    target = _check_target(target)
    w_out_FxD, batches, n_tokens = _prepare(hidden, w_out_FxD)
    grid_G = _candidates(batches, num_candidates)

    def evaluate(index: int) -> float:
        tails = [_tail_sum_jit(b.hidden_TxF, b.scores_TxF, w_out_FxD, grid_G[index])
                 for b in batches]
        return _pooled_cett(tails, batches, n_tokens)

    return _bisect(grid_G, target, evaluate)


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

    def __init__(self, batches: list[_Batch], w_out_FxD: Array, grid_G: np.ndarray,
                 target: float, n_tokens: int, switch_count: int):
        self.batches, self.w_out_FxD, self.grid_G = batches, w_out_FxD, grid_G
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
        t = self.grid_G[index]
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
    grid_G = _candidates(batches, num_candidates)
    numel = sum(b.scores_TxF.size for b in batches)
    evaluate = _IncrementalCett(batches, w_out_FxD, grid_G, target, n_tokens,
                                switch_count=int(sparse_switch_fraction * numel))
    return _bisect(grid_G, target, evaluate)


