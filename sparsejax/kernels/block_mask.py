"""Which FFN-neuron blocks each token block needs: padded index lists with static shapes.

Per-token activation sparsity fades when tokens are grouped: a block of B tokens whose neurons
are each active with independent probability r is dense in a neuron with probability
1 − (1 − r)^B (BlockFFN, Song et al. 2025, "chunk-level sparsity"). A block-sparse FFN kernel can
only skip a (token block, neuron block) tile when *every* token of the block leaves *every* neuron
of the neuron block inactive, so this module works at that granularity.

Shape letters used in names throughout :mod:`sparsejax.kernels`:

* ``T`` tokens (batch × length flattened), ``D`` d_model, ``F`` d_ff;
* ``N`` token blocks (T / block_t), ``M`` neuron blocks (F / block_f);
* ``K`` the static cap on active neuron blocks per token block (``k_max``), and ``J`` the static
  cap on active token blocks per neuron block (always N: the transposed lists are exact).

The index lists are padded by repeating the last valid index, so a Pallas pipeline that reads
block ``index[n, k]`` at a padded step asks for the block it already holds and issues no copy;
the kernels skip padded steps with ``k < count[n]``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from sparsejax import sparsity

Array = jax.Array


class BlockMask(NamedTuple):
    """Active neuron blocks per token block, padded to a static width.

    index_NxK: int32 neuron-block indices, valid entries ascending, padded with the last valid one
        (0 where a token block has none).
    count_N: int32 number of valid entries per row (≤ K).
    n_active_N: int32 number of neuron blocks that were active before the k_max cap; a row with
        n_active > count dropped blocks (the kernel is then no longer exact w.r.t. the dense FFN).
    """

    index_NxK: Array
    count_N: Array
    n_active_N: Array


def check_blocks(n_tokens: int, d_ff: int, block_t: int, block_f: int) -> tuple[int, int]:
    """(N, M) for the given shapes, or a ValueError naming the shape that does not divide."""
    if block_t <= 0 or block_f <= 0:
        raise ValueError(f"block_t={block_t} and block_f={block_f} must be positive")
    if n_tokens % block_t:
        raise ValueError(f"tokens T={n_tokens} is not a multiple of block_t={block_t}; "
                         "pad the tokens (sparsejax.kernels.ffn.pad_tokens) or pick another block_t")
    if d_ff % block_f:
        raise ValueError(f"d_ff F={d_ff} is not a multiple of block_f={block_f}")
    return n_tokens // block_t, d_ff // block_f


def active_TxF(activation_TxF: Array, threshold: float = 0.0) -> Array:
    """Which (token, neuron) entries a tile mask must keep: :func:`sparsejax.sparsity.active`.

    * ``threshold == 0``: the zero rule ``σ ≠ 0``. Not FAT-0's floor (``|σ| ≥ 1e-18``): tile
      skipping must never skip an entry the dense FFN multiplies, so that the block-sparse FFN
      *is* the dense FFN for the ReLU family; the floor would skip tiles whose only non-zeros are
      below 1e-18 (normal float32 numbers reach 1.2e-38).
    * ``threshold = ε > 0``: the FAT-ε rule, ``not |σ| < ε + 1e-18``
      (:func:`sparsejax.sparsity.fat_threshold`): the entries FAT-ε evaluation counts as active,
      ``|σ| == ε`` included. This changes the output (the pruned tiles), as FAT-ε does.
    * NaN is active under both, so a tile holding a NaN is computed and the NaN reaches the
      output instead of being skipped.

    ``threshold`` is a static Python number ≥ 0 (ValueError otherwise).
    """
    if threshold == 0:
        return sparsity.active(activation_TxF)
    return sparsity.active(activation_TxF.astype(jnp.float32), sparsity.fat_threshold(threshold))


def block_activity_NxM(active_TxF: Array, block_t: int, block_f: int) -> Array:
    """Boolean: is any (token, neuron) pair of tile (n, m) active?"""
    t, f = active_TxF.shape
    n, m = check_blocks(t, f, block_t, block_f)
    return jnp.any(active_TxF.reshape(n, block_t, m, block_f), axis=(1, 3))


def from_block_activity(active_NxM: Array, k_max: Optional[int] = None,
                        score_NxM: Optional[Array] = None) -> BlockMask:
    """Padded index lists from a boolean tile mask. Jittable; shapes depend only on k_max.

    When a row has more than k_max active blocks, the k_max with the highest score (default: all
    equal, so the lowest indices) are kept; ``n_active_N`` records the overflow. Active blocks
    always rank before inactive ones: a NaN score ranks first (a tile holding a NaN is kept, not
    dropped by the cap) and a −inf score still ranks above every inactive block.
    """
    n, m = active_NxM.shape
    k = m if k_max is None else int(k_max)
    if not 1 <= k <= m:
        raise ValueError(f"k_max={k_max} must be in [1, M={m}] (M = d_ff / block_f)")
    active_NxM = active_NxM.astype(bool)
    n_active_N = jnp.sum(active_NxM, axis=1, dtype=jnp.int32)
    if score_NxM is None:
        score_NxM = jnp.zeros((n, m), jnp.float32)
    # Rank active blocks first (by score, ties to the lower index), inactive ones last; the sort
    # key puts the chosen k in ascending index order afterwards.
    lowest = jnp.finfo(jnp.float32).min
    key_NxM = jnp.where(active_NxM, jnp.nan_to_num(score_NxM.astype(jnp.float32), nan=jnp.inf,
                                                   posinf=jnp.inf, neginf=lowest), -jnp.inf)
    order_NxM = jnp.argsort(-key_NxM, axis=1, stable=True)
    chosen_NxK = order_NxM[:, :k]
    count_N = jnp.minimum(n_active_N, k)
    valid_NxK = jnp.arange(k)[None, :] < count_N[:, None]
    # Sort the chosen valid indices ascending (invalid ones pushed to the end with a big key).
    chosen_NxK = jnp.sort(jnp.where(valid_NxK, chosen_NxK, m), axis=1)
    last_N = jnp.where(count_N > 0,
                       jnp.take_along_axis(chosen_NxK, jnp.maximum(count_N - 1, 0)[:, None], 1)[:, 0],
                       0)
    index_NxK = jnp.where(valid_NxK, chosen_NxK, last_N[:, None]).astype(jnp.int32)
    return BlockMask(index_NxK, count_N.astype(jnp.int32), n_active_N)


def from_activations(activation_TxF: Array, block_t: int, block_f: int, *,
                     k_max: Optional[int] = None, threshold: float = 0.0) -> BlockMask:
    """Block mask from σ(gate) (or σ(W_in x) for a plain FFN): a tile is active iff one of its
    entries is, by :func:`active_TxF` (the one active rule).

    threshold 0 is the *zero* criterion (exact for the ReLU family: skipped tiles contribute
    exactly nothing). threshold ε > 0 is the FAT-ε cut (Kurtz et al. 2020) and changes the
    output. Rows over k_max keep the blocks with the largest Σ|σ| (a NaN tile first).
    """
    t, f = activation_TxF.shape
    n, m = check_blocks(t, f, block_t, block_f)
    mag_TxF = jnp.abs(activation_TxF.astype(jnp.float32))
    active_NxM = block_activity_NxM(active_TxF(activation_TxF, threshold), block_t, block_f)
    score_NxM = jnp.sum(mag_TxF.reshape(n, block_t, m, block_f), axis=(1, 3))
    return from_block_activity(active_NxM, k_max, score_NxM)


def from_gate_sign(x_TxD: Array, w_gate_DxF: Array, block_t: int, block_f: int, *,
                   k_max: Optional[int] = None, threshold: float = 0.0) -> BlockMask:
    """Predictor for ReLU-family gates: neuron active iff its pre-activation x·W_gate > threshold.

    Exact for ReLU (σ(z) = 0 iff z ≤ 0) and for FATReLU / shifted ReLU with their threshold. It
    costs one dense T×D×F matmul, so it only pays off where a cheaper predictor (low-rank, as in
    Deja Vu, Liu et al. 2023) replaces it; it is here as the exact baseline for one.
    """
    pre_TxF = jnp.einsum("td,df->tf", x_TxD, w_gate_DxF, preferred_element_type=jnp.float32)
    return from_activations(jnp.maximum(pre_TxF - threshold, 0.0), block_t, block_f, k_max=k_max)


def all_active(n_blocks_t: int, n_blocks_f: int) -> BlockMask:
    """Every tile active (the dense FFN as a block mask)."""
    index_NxM = jnp.broadcast_to(jnp.arange(n_blocks_f, dtype=jnp.int32), (n_blocks_t, n_blocks_f))
    count_N = jnp.full((n_blocks_t,), n_blocks_f, jnp.int32)
    return BlockMask(index_NxM, count_N, count_N)


def to_dense_NxM(mask: BlockMask, n_blocks_f: int) -> Array:
    """Boolean tile mask of the blocks the kernels will actually compute (valid entries only)."""
    n, k = mask.index_NxK.shape
    valid_NxK = jnp.arange(k)[None, :] < mask.count_N[:, None]
    rows_NxK = jnp.broadcast_to(jnp.arange(n)[:, None], (n, k))
    # Invalid entries scatter to an extra column that is dropped.
    cols_NxK = jnp.where(valid_NxK, mask.index_NxK, n_blocks_f)
    return jnp.zeros((n, n_blocks_f + 1), bool).at[rows_NxK, cols_NxK].set(True)[:, :n_blocks_f]


def to_dense_TxF(mask: BlockMask, block_t: int, block_f: int, n_blocks_f: int) -> Array:
    """The tile mask expanded to tokens × neurons (for the dense-with-mask reference)."""
    tiles_NxM = to_dense_NxM(mask, n_blocks_f)
    return jnp.repeat(jnp.repeat(tiles_NxM, block_t, axis=0), block_f, axis=1)


def transpose(mask: BlockMask, n_blocks_f: int) -> BlockMask:
    """Per neuron block, the token blocks that use it (exact: width J = N). For weight gradients."""
    tiles_NxM = to_dense_NxM(mask, n_blocks_f)
    return from_block_activity(tiles_NxM.T, k_max=tiles_NxM.shape[0])


def density(mask: BlockMask, n_blocks_f: int) -> Array:
    """Fraction of (token block, neuron block) tiles the kernels compute."""
    return jnp.sum(mask.count_N) / (mask.count_N.shape[0] * n_blocks_f)
