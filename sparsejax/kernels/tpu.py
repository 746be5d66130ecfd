"""Block-sparse FFN as Pallas TPU (Mosaic) kernels: forward, input gradient, weight gradients.

Forward: grid (N token blocks, K list slots). The per-token-block list of active neuron blocks
and its length are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``) so the BlockSpec
index maps can pick the weight column block ``index[n, k]`` before the body runs; the pipeline
then DMAs only active weight blocks. Padded slots repeat the last index, so the pipeline sees an
unchanged block index and skips the copy; ``pl.when(k < count[n])`` skips the compute. The output
tile accumulates in an f32 VMEM scratch, as in the Pallas TPU matmul guide and the block-sparse
"DSD" kernel of the Pallas sparse guide (docs.jax.dev, "Pallas TPU: sparse kernels").

Backward, flash-attention style (Dao et al. 2022): nothing from the forward is stored besides
the inputs; each kernel recomputes its (bt × bf) tile of g = x·W_gate and u = x·W_in.

* dx: same grid and lists as the forward; dx[n] += du·W_inᵀ + dg·W_gateᵀ over active tiles.
* dW: grid (M neuron blocks, N slots) over the *transposed* lists (token blocks that use neuron
  block m); dW_in[:, m] += xᵀ·du, dW_gate[:, m] += xᵀ·dg, dW_out[m] += hᵀ·dy.

Block shapes: token tiles (bt, D), weight tiles (D, bf) / (bf, D). Mosaic needs the last two
dims divisible by (8, 128) or equal to the full array dims, so bf % 128 == 0 and bt % 8 == 0,
in bf16 too (Mosaic compiles bt = 8 bf16 tiles, tests/test_kernels_tpu.py); D is taken whole (the model's d_model is a
multiple of 128 in every config). Shape letters: see :mod:`sparsejax.kernels.block_mask`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sparsejax.kernels import common
from sparsejax.kernels.block_mask import BlockMask

Array = jax.Array

# Mosaic's default scoped-VMEM limit (16 MiB on v4/v5e, 32 MiB on v6e) is below what the 1.2B
# shapes need at large blocks; above it the kernels request their estimate. VMEM per core is
# 16 MiB on v4, 64 MiB on v5p, 128 MiB on v5e/v6e (``pltpu.get_tpu_info_for_chip``): a request
# over a chip's capacity fails to compile loudly (the 1.2B f32 backward at bt = 128 on v4 does;
# bt = 64 fits) rather than spilling.
_DEFAULT_SCOPED_VMEM = 16 * 2**20
_VMEM_CAP = 100 * 2**20


def check_tiling(d_model: int, block_t: int, block_f: int, dtype) -> None:
    # 8 sublanes for every dtype: Mosaic lays out bf16 (bt = 8, D) tiles too, so a 16-row rule for
    # bf16 (two rows per packed sublane) would refuse tilings that compile.
    sublanes = 8
    if block_f % 128:
        raise ValueError(f"TPU kernel: block_f={block_f} must be a multiple of 128 (lane width)")
    if block_t % sublanes:
        raise ValueError(f"TPU kernel: block_t={block_t} must be a multiple of {sublanes} "
                         f"for {jnp.dtype(dtype).name}")
    if d_model % 128:
        raise ValueError(f"TPU kernel: d_model D={d_model} must be a multiple of 128")


def _vmem_limit(n_bytes: int) -> Optional[int]:
    # Double-buffered inputs/outputs plus scratch, with 50% headroom for temporaries.
    need = int(1.5 * n_bytes)
    return None if need <= _DEFAULT_SCOPED_VMEM else min(need, _VMEM_CAP)


def _params(n_bytes: int) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                vmem_limit_bytes=_vmem_limit(n_bytes))


def _dot_nt(a, b):  # a · bᵀ
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # aᵀ · b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _up_gate(x, w_in_ref, w_gate_ref):
    u = _dot(x, w_in_ref[...])
    g = None if w_gate_ref is None else _dot(x, w_gate_ref[...])
    return u, g


def tile_costs(t: int, d: int, f: int, n_tiles: int, block_t: int, block_f: int, gated: bool,
               item: int, n_tiles_t: Optional[int] = None) -> dict:
    """``pl.CostEstimate`` of the forward, dx and dW kernels at k_max (every list slot a tile:
    ``n_tiles`` = N·K of the lists, ``n_tiles_t`` = M·J of the transposed lists).

    One tile's matmul is 2·bt·bf·D FLOPs; with w = 3 weights (gated) or 2 (plain) the forward
    does w of them (up, gate, out), dx 2w − 1 (up and gate recomputed, dh, du·W_inᵀ, dg·W_gateᵀ),
    dW 2w (recompute, dh, the w weight gradients). Bytes: token tiles read once per token block
    (forward, dx: their block index does not change with k), once per tile in dW; weight tiles
    once per tile (forward, dx), once per neuron block in dW (read and written); outputs once."""
    n_tiles_t = n_tiles if n_tiles_t is None else n_tiles_t
    w = 3 if gated else 2
    tile = 2 * block_t * block_f * d
    weight_tile, token_bytes = d * block_f * item, t * d * item
    return {
        "fwd": common.cost_estimate(flops=w * tile * n_tiles,
                                    bytes_accessed=2 * token_bytes + w * weight_tile * n_tiles),
        "dx": common.cost_estimate(flops=(2 * w - 1) * tile * n_tiles,
                                   bytes_accessed=3 * token_bytes + w * weight_tile * n_tiles),
        "dw": common.cost_estimate(
            flops=2 * w * tile * n_tiles_t,
            bytes_accessed=2 * block_t * d * item * n_tiles_t + 2 * w * d * f * item),
    }


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(index_ref, count_ref, *refs, act, gated, gate_and_up):
    del index_ref  # used by the index maps only
    if gated:
        x_ref, w_in_ref, w_gate_ref, w_out_ref, y_ref, acc_ref = refs
    else:
        (x_ref, w_in_ref, w_out_ref, y_ref, acc_ref), w_gate_ref = refs, None
    n, k = pl.program_id(0), pl.program_id(1)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(k < count_ref[n])
    def _accumulate():
        u, g = _up_gate(x_ref[...], w_in_ref, w_gate_ref)
        h = common.hidden(act, u, g, gate_and_up)
        acc_ref[...] += _dot(h.astype(w_out_ref.dtype), w_out_ref[...])

    @pl.when(k == pl.num_programs(1) - 1)
    def _store():
        y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def _token_major_specs(d_model, block_t, block_f, gated, n_token_inputs):
    """x-like (bt, D) tiles at token block n, weight tiles at neuron block index[n, k]."""
    tok = pl.BlockSpec((block_t, d_model), lambda n, k, idx, cnt: (n, 0))
    col = pl.BlockSpec((d_model, block_f), lambda n, k, idx, cnt: (0, idx[n, k]))
    row = pl.BlockSpec((block_f, d_model), lambda n, k, idx, cnt: (idx[n, k], 0))
    return [tok] * n_token_inputs + [col] + ([col] if gated else []) + [row], tok


def forward(x_TxD: Array, w_in_DxF: Array, w_gate_DxF: Optional[Array], w_out_FxD: Array,
            mask: BlockMask, *, act: common.Activation, gate_and_up: bool, block_t: int,
            block_f: int, interpret: bool = False) -> Array:
    t, d = x_TxD.shape
    n, k = mask.index_NxK.shape
    gated = w_gate_DxF is not None
    check_tiling(d, block_t, block_f, x_TxD.dtype)
    in_specs, out_spec = _token_major_specs(d, block_t, block_f, gated, 1)
    item = x_TxD.dtype.itemsize
    n_bytes = 2 * item * (2 * block_t * d + (3 if gated else 2) * d * block_f) + 4 * block_t * d
    weights = (w_in_DxF, w_gate_DxF, w_out_FxD) if gated else (w_in_DxF, w_out_FxD)
    costs = tile_costs(t, d, w_in_DxF.shape[1], n * k, block_t, block_f, gated, item)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, act=act, gated=gated, gate_and_up=gate_and_up),
        out_shape=common.out_struct((t, d), x_TxD.dtype, x_TxD),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(n, k), in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((block_t, d), jnp.float32)]),
        compiler_params=_params(n_bytes),
        cost_estimate=costs["fwd"],
        interpret=interpret,
        name="block_sparse_ffn_fwd",
    )(mask.index_NxK, mask.count_N, x_TxD, *weights)


# ----------------------------------------------------------------------------- dx

def _dx_kernel(index_ref, count_ref, *refs, act, gated, gate_and_up):
    del index_ref
    if gated:
        x_ref, dy_ref, w_in_ref, w_gate_ref, w_out_ref, dx_ref, acc_ref = refs
    else:
        (x_ref, dy_ref, w_in_ref, w_out_ref, dx_ref, acc_ref), w_gate_ref = refs, None
    n, k = pl.program_id(0), pl.program_id(1)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(k < count_ref[n])
    def _accumulate():
        u, g = _up_gate(x_ref[...], w_in_ref, w_gate_ref)
        dh = _dot_nt(dy_ref[...], w_out_ref[...])
        _, du, dg = common.hidden_grads(act, u, g, gate_and_up, dh)
        w_dtype = w_in_ref.dtype
        dx = _dot_nt(du.astype(w_dtype), w_in_ref[...])
        if gated:
            dx += _dot_nt(dg.astype(w_dtype), w_gate_ref[...])
        acc_ref[...] += dx

    @pl.when(k == pl.num_programs(1) - 1)
    def _store():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


# ----------------------------------------------------------------------------- dW

def _dw_kernel(index_ref, count_ref, *refs, act, gated, gate_and_up):
    del index_ref
    if gated:
        (x_ref, dy_ref, w_in_ref, w_gate_ref, w_out_ref,
         dw_in_ref, dw_gate_ref, dw_out_ref, acc_in, acc_gate, acc_out) = refs
    else:
        (x_ref, dy_ref, w_in_ref, w_out_ref, dw_in_ref, dw_out_ref, acc_in, acc_out) = refs
        w_gate_ref = dw_gate_ref = acc_gate = None
    m, j = pl.program_id(0), pl.program_id(1)
    accs = [a for a in (acc_in, acc_gate, acc_out) if a is not None]

    @pl.when(j == 0)
    def _init():
        for a in accs:
            a[...] = jnp.zeros_like(a)

    @pl.when(j < count_ref[m])
    def _accumulate():
        x, dy = x_ref[...], dy_ref[...]
        u, g = _up_gate(x, w_in_ref, w_gate_ref)
        dh = _dot_nt(dy, w_out_ref[...])
        h, du, dg = common.hidden_grads(act, u, g, gate_and_up, dh)
        acc_in[...] += _dot_tn(x, du.astype(x.dtype))
        if gated:
            acc_gate[...] += _dot_tn(x, dg.astype(x.dtype))
        acc_out[...] += _dot_tn(h.astype(dy.dtype), dy)

    @pl.when(j == pl.num_programs(1) - 1)
    def _store():
        for a, o in zip(accs, [r for r in (dw_in_ref, dw_gate_ref, dw_out_ref) if r is not None]):
            o[...] = a[...].astype(o.dtype)


def backward(x_TxD: Array, w_in_DxF: Array, w_gate_DxF: Optional[Array], w_out_FxD: Array,
             mask: BlockMask, mask_t: BlockMask, dy_TxD: Array, *, act: common.Activation,
             gate_and_up: bool, block_t: int, block_f: int, interpret: bool = False):
    """(dx, dW_in, dW_gate or None, dW_out); ``mask_t`` is ``block_mask.transpose(mask, M)``."""
    t, d = x_TxD.shape
    n, k = mask.index_NxK.shape
    m, j = mask_t.index_NxK.shape
    gated = w_gate_DxF is not None
    check_tiling(d, block_t, block_f, x_TxD.dtype)
    weights = (w_in_DxF, w_gate_DxF, w_out_FxD) if gated else (w_in_DxF, w_out_FxD)
    kw = dict(act=act, gated=gated, gate_and_up=gate_and_up)
    item = x_TxD.dtype.itemsize
    n_w = 3 if gated else 2
    costs = tile_costs(t, d, w_in_DxF.shape[1], n * k, block_t, block_f, gated, item,
                       n_tiles_t=m * j)

    in_specs, out_spec = _token_major_specs(d, block_t, block_f, gated, 2)
    dx_bytes = 2 * item * (3 * block_t * d + n_w * d * block_f) + 4 * block_t * d
    dx_TxD = pl.pallas_call(
        functools.partial(_dx_kernel, **kw),
        out_shape=common.out_struct((t, d), x_TxD.dtype, x_TxD),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(n, k), in_specs=in_specs, out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((block_t, d), jnp.float32)]),
        compiler_params=_params(dx_bytes), cost_estimate=costs["dx"], interpret=interpret,
        name="block_sparse_ffn_dx",
    )(mask.index_NxK, mask.count_N, x_TxD, dy_TxD, *weights)

    # Neuron-block major: the lists say which token blocks use neuron block m.
    tok = pl.BlockSpec((block_t, d), lambda m_, j_, idx, cnt: (idx[m_, j_], 0))
    col = pl.BlockSpec((d, block_f), lambda m_, j_, idx, cnt: (0, m_))
    row = pl.BlockSpec((block_f, d), lambda m_, j_, idx, cnt: (m_, 0))
    w_specs = [col] + ([col] if gated else []) + [row]
    out_shapes = [common.out_struct(w.shape, w.dtype, x_TxD) for w in weights]
    scratch = [pltpu.VMEM((d, block_f), jnp.float32)] * (n_w - 1) + [
        pltpu.VMEM((block_f, d), jnp.float32)]
    dw_bytes = 2 * item * (2 * block_t * d + 2 * n_w * d * block_f) + 4 * n_w * d * block_f
    grads = pl.pallas_call(
        functools.partial(_dw_kernel, **kw),
        out_shape=out_shapes,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(m, j), in_specs=[tok, tok] + w_specs,
            out_specs=w_specs, scratch_shapes=scratch),
        compiler_params=_params(dw_bytes), cost_estimate=costs["dw"], interpret=interpret,
        name="block_sparse_ffn_dw",
    )(mask_t.index_NxK, mask_t.count_N, x_TxD, dy_TxD, *weights)
    if gated:
        dw_in, dw_gate, dw_out = grads
    else:
        (dw_in, dw_out), dw_gate = grads, None
    return dx_TxD, dw_in, dw_gate, dw_out
