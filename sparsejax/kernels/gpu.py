"""Block-sparse FFN forward as Pallas GPU kernels on the Triton backend.

Two launches, a grouped-GEMM shape (as in MegaBlocks, Gale et al. 2023, whose block-sparse
matmuls are also Triton):

1. ``hidden``: grid (N token blocks, K list slots); program (n, k) computes the (bt × bf) tile
   h = σ(x_n·W_gate[:, f]) ⊙ (x_n·W_in[:, f]) for f = index[n, k], contracting D in chunks of
   ``block_d``, and writes it to a compact (N, K, bt, bf) buffer (zeros in padded slots).
2. ``out``: grid (N, D / block_d); program (n, d) sums h[n, k]·W_out[f, d-chunk] over
   k < count[n] with a loop whose trip count is the runtime count, so padded slots cost nothing.

Triton has no scalar prefetch: the index list is read inside the kernel (scalar loads) and the
weight tiles are loaded with dynamic slices. Triton tiles must be powers of two, so bt, bf and
block_d are powers of two (≥ 16 for ``tl.dot``) and D must be a multiple of block_d
(768 = 3 × 256, 1792 = 7 × 256). The backward pass is not a kernel: :mod:`sparsejax.kernels.ffn`
uses the dense-with-mask backward in XLA on GPU (same cost as the dense FFN's backward).

Why Triton rather than Mosaic GPU: the installed jax's Mosaic GPU examples (ragged_dot_mgpu,
hopper/blackwell matmuls) target sm90/sm100 warpgroup instructions only, while Triton lowering
runs on every CUDA GPU JAX supports; it can also be lowered (not compiled) on a CPU-only machine,
which is the only check this codebase can run without a GPU. Shape letters: see
:mod:`sparsejax.kernels.block_mask`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparsejax.kernels import common
from sparsejax.kernels.block_mask import BlockMask

Array = jax.Array


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def check_tiling(d_model: int, block_t: int, block_f: int, block_d: int) -> None:
    for name, v in (("block_t", block_t), ("block_f", block_f), ("block_d", block_d)):
        if not _is_pow2(v) or v < 16:
            raise ValueError(f"GPU kernel: {name}={v} must be a power of two ≥ 16 (Triton tiles)")
    if d_model % block_d:
        raise ValueError(f"GPU kernel: d_model D={d_model} is not a multiple of block_d={block_d}")


def _hidden_kernel(index_ref, count_ref, x_ref, w_in_ref, *rest, act, gated, gate_and_up,
                   block_t, block_f, block_d):
    if gated:
        w_gate_ref, h_ref = rest
    else:
        (h_ref,), w_gate_ref = rest, None
    n, k = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(n * block_t, block_t)
    zeros = jnp.zeros((block_t, block_f), jnp.float32)

    @pl.when(k < count_ref[n])
    def _compute():
        cols = pl.ds(index_ref[n, k] * block_f, block_f)

        def body(c, carry):
            u, g = carry
            chunk = pl.ds(c * block_d, block_d)
            x = x_ref[rows, chunk]
            u += plgpu.dot(x, w_in_ref[chunk, cols])
            if gated:
                g += plgpu.dot(x, w_gate_ref[chunk, cols])
            return u, g

        u, g = jax.lax.fori_loop(0, x_ref.shape[1] // block_d, body, (zeros, zeros))
        h = common.hidden(act, u, g if gated else None, gate_and_up)
        h_ref[n, k, :, :] = h.astype(h_ref.dtype)

    @pl.when(k >= count_ref[n])
    def _pad():
        h_ref[n, k, :, :] = zeros.astype(h_ref.dtype)


def _out_kernel(index_ref, count_ref, h_ref, w_out_ref, y_ref, *, block_t, block_f, block_d):
    n, c = pl.program_id(0), pl.program_id(1)
    chunk = pl.ds(c * block_d, block_d)

    def body(k, acc):
        rows = pl.ds(index_ref[n, k] * block_f, block_f)
        return acc + plgpu.dot(h_ref[n, k, :, :], w_out_ref[rows, chunk])

    acc = jax.lax.fori_loop(0, count_ref[n], body, jnp.zeros((block_t, block_d), jnp.float32))
    y_ref[pl.ds(n * block_t, block_t), chunk] = acc.astype(y_ref.dtype)


def forward(x_TxD: Array, w_in_DxF: Array, w_gate_DxF: Optional[Array], w_out_FxD: Array,
            mask: BlockMask, *, act: common.Activation, gate_and_up: bool, block_t: int,
            block_f: int, block_d: int = 128, interpret: bool = False,
            num_warps: int = 4, num_stages: int = 2) -> Array:
    t, d = x_TxD.shape
    n, k = mask.index_NxK.shape
    gated = w_gate_DxF is not None
    check_tiling(d, block_t, block_f, block_d)
    # Whole arrays in global memory; the kernels slice them (Triton refs are pointers).
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    weights = (w_in_DxF, w_gate_DxF) if gated else (w_in_DxF,)
    ins = (mask.index_NxK, mask.count_N, x_TxD, *weights)
    # At k_max (every slot a tile): XLA's cost model counts these custom calls otherwise as 0.
    item, tile = x_TxD.dtype.itemsize, 2 * block_t * block_f * d
    hidden_cost = common.cost_estimate(
        flops=len(weights) * tile * n * k,
        bytes_accessed=item * n * k * (block_t * d + len(weights) * d * block_f + block_t * block_f))
    out_cost = common.cost_estimate(
        flops=tile * n * k, bytes_accessed=item * (n * k * (block_t * block_f + block_f * d) + t * d))
    h_NxKxtxf = pl.pallas_call(
        functools.partial(_hidden_kernel, act=act, gated=gated, gate_and_up=gate_and_up,
                          block_t=block_t, block_f=block_f, block_d=block_d),
        out_shape=common.out_struct((n, k, block_t, block_f), x_TxD.dtype, x_TxD),
        grid=(n, k), in_specs=[whole(a) for a in ins],
        out_specs=pl.BlockSpec((n, k, block_t, block_f), lambda *_: (0, 0, 0, 0)),
        compiler_params=params, cost_estimate=hidden_cost, interpret=interpret,
        name="block_sparse_ffn_hidden",
    )(*ins)
    ins = (mask.index_NxK, mask.count_N, h_NxKxtxf, w_out_FxD)
    return pl.pallas_call(
        functools.partial(_out_kernel, block_t=block_t, block_f=block_f, block_d=block_d),
        out_shape=common.out_struct((t, d), x_TxD.dtype, x_TxD),
        grid=(n, d // block_d), in_specs=[whole(a) for a in ins],
        out_specs=pl.BlockSpec((t, d), lambda *_: (0, 0)),
        compiler_params=params, cost_estimate=out_cost, interpret=interpret,
        name="block_sparse_ffn_out",
    )(*ins)
