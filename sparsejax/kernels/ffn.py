"""``block_sparse_ffn``: one entry point over the TPU kernel, the GPU kernel and pure JAX.

Computes, for a tile mask (which neuron blocks each token block uses),

    y = W_out · ([σ(W_gate x) ⊙ W_in x] ⊙ mask)      (gated)
    y = W_out · (σ(W_in x) ⊙ mask)                    (plain)

i.e. the dense FFN of Shazeer 2020 / the Sparsing Law paper (Luo et al. 2024) with the tiles
outside the mask removed. With the mask taken from the activations themselves (zero criterion,
ReLU family) the result equals the dense FFN exactly; with a k_max cap or an ε threshold it is
the dense FFN with those tiles pruned. Implementations:

* ``"tpu"``: Pallas Mosaic kernels for forward, dx and dW (:mod:`sparsejax.kernels.tpu`);
* ``"gpu"``: Pallas Triton forward (:mod:`sparsejax.kernels.gpu`), dense-with-mask backward;
* ``"jax"``: gather the active weight blocks per token block and einsum (pure JAX, any
  backend, differentiated by JAX itself; :func:`jax_tiles`);
* ``"dense"``: the dense FFN times the expanded mask (the ground truth the others are tested
  against, and the fallback above ``DENSE_FALLBACK_DENSITY``).

``impl="auto"`` picks by ``jax.default_backend()``: tpu → "tpu", gpu → "gpu", else "jax".
(``model.ffn_impl="reference"`` is the model's einsum FFN, a different thing: see
:mod:`sparsejax.ffn`.)
Shape letters: see :mod:`sparsejax.kernels.block_mask`; inside token/neuron blocks ``t`` and
``f`` are the block_t tokens and block_f neurons of one tile.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from sparsejax.kernels import block_mask as bm
from sparsejax.kernels import common, gpu, tpu
from sparsejax.kernels.block_mask import BlockMask

Array = jax.Array
IMPLS = ("auto", "tpu", "gpu", "jax", "dense")

# Above this fraction of active tiles the dense FFN is used instead (same result, the mask is
# still applied). Not measured here (no accelerator): the Pallas block-sparse "DSD" matmul reaches
# ≈6× of a 10× bound at 10% density on TPU v5e (Pallas sparse-kernel guide), i.e. ≈60% of dense
# efficiency per computed tile, so a kernel costs ≈ density / 0.6 of the dense FFN and breaks
# even at density ≈ 0.6. Re-measure with benchmarks/block_sparse_ffn.py on the target chip.
# CPU (pure-JAX tile path, measured 2026-11-27 on a 2-core CPU sandbox, T=1024, bt=bf=128,
# forward, k_max = the busiest row): the pure-JAX path beats dense up to density ≈ 0.62 (0.1B shape)
# and ≈ 0.57 (1.2B shape); 0.55 is the lower, rounded down.
DENSE_FALLBACK_DENSITY = {"tpu": 0.6, "gpu": 0.6, "cpu": 0.55}


def pick_impl(impl: str = "auto") -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; allowed: {IMPLS}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    return {"tpu": "tpu", "gpu": "gpu"}.get(backend, "jax")


# ----------------------------------------------------------------------------- pure JAX

def dense(x_TxD: Array, w_in_DxF: Array, w_gate_DxF: Optional[Array], w_out_FxD: Array,
          mask: Optional[BlockMask], act: common.Activation, *, gate_and_up: bool = False,
          block_t: int = 1, block_f: int = 1) -> Array:
    """Dense FFN times the expanded tile mask (no mask: the plain dense FFN). f32 accumulation."""
    f32 = dict(preferred_element_type=jnp.float32)
    u_TxF = jnp.einsum("td,df->tf", x_TxD, w_in_DxF, **f32)
    g_TxF = None if w_gate_DxF is None else jnp.einsum("td,df->tf", x_TxD, w_gate_DxF, **f32)
    h_TxF = common.hidden(act, u_TxF, g_TxF, gate_and_up)
    if mask is not None:
        keep_TxF = bm.to_dense_TxF(mask, block_t, block_f, w_in_DxF.shape[1] // block_f)
        h_TxF = jnp.where(keep_TxF, h_TxF, 0.0)
    y_TxD = jnp.einsum("tf,fd->td", h_TxF.astype(w_out_FxD.dtype), w_out_FxD, **f32)
    return y_TxD.astype(x_TxD.dtype)


def jax_tiles(x_TxD: Array, w_in_DxF: Array, w_gate_DxF: Optional[Array], w_out_FxD: Array,
              mask: BlockMask, act: common.Activation, *, gate_and_up: bool = False,
              block_t: int, block_f: int) -> Array:
    """Gather the listed weight blocks of each token block and einsum; padded slots are zeroed.

    A ``lax.map`` over token blocks keeps the gathered weights at K × D × block_f per step
    instead of N × K × D × block_f at once.
    """
    t, d = x_TxD.shape
    f = w_in_DxF.shape[1]
    n, m = bm.check_blocks(t, f, block_t, block_f)
    k = mask.index_NxK.shape[1]
    f32 = dict(preferred_element_type=jnp.float32)
    cols = lambda w_DxF: w_DxF.reshape(d, m, block_f).transpose(1, 0, 2)  # noqa: E731
    w_in_MxDxf = cols(w_in_DxF)
    w_gate_MxDxf = None if w_gate_DxF is None else cols(w_gate_DxF)
    w_out_MxfxD = w_out_FxD.reshape(m, block_f, d)

    def one_block(args):
        x_txD, index_K, count = args
        u_Kxtxf = jnp.einsum("td,kdf->ktf", x_txD, w_in_MxDxf[index_K], **f32)
        g_Kxtxf = (None if w_gate_MxDxf is None else
                   jnp.einsum("td,kdf->ktf", x_txD, w_gate_MxDxf[index_K], **f32))
        h_Kxtxf = common.hidden(act, u_Kxtxf, g_Kxtxf, gate_and_up)
        h_Kxtxf = jnp.where((jnp.arange(k) < count)[:, None, None], h_Kxtxf, 0.0)
        return jnp.einsum("ktf,kfd->td", h_Kxtxf.astype(w_out_FxD.dtype),
                          w_out_MxfxD[index_K], **f32).astype(x_TxD.dtype)

    y_NxtxD = jax.lax.map(one_block, (x_TxD.reshape(n, block_t, d), mask.index_NxK, mask.count_N))
    return y_NxtxD.reshape(t, d)


# ----------------------------------------------------------------------------- kernels + VJP

def _dense_masked_vjp(x, w_in, w_gate, w_out, mask, dy, act, gate_and_up, block_t, block_f):
    fn = lambda x_, wi, wg, wo: dense(x_, wi, wg, wo, mask, act, gate_and_up=gate_and_up,  # noqa
                                      block_t=block_t, block_f=block_f)
    _, vjp = jax.vjp(fn, x, w_in, w_gate, w_out)
    return vjp(dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _kernel_ffn(x, w_in, w_gate, w_out, mask, impl, act, gate_and_up, block_t, block_f,
                interpret):
    kernel = tpu.forward if impl == "tpu" else gpu.forward
    return kernel(x, w_in, w_gate, w_out, mask, act=act, gate_and_up=gate_and_up,
                  block_t=block_t, block_f=block_f, interpret=interpret)


def _kernel_ffn_fwd(x, w_in, w_gate, w_out, mask, impl, act, gate_and_up, block_t, block_f,
                    interpret):
    y = _kernel_ffn(x, w_in, w_gate, w_out, mask, impl, act, gate_and_up, block_t, block_f,
                    interpret)
    return y, (x, w_in, w_gate, w_out, mask)


def _kernel_ffn_bwd(impl, act, gate_and_up, block_t, block_f, interpret, res, dy):
    x, w_in, w_gate, w_out, mask = res
    if impl == "tpu":
        mask_t = bm.transpose(mask, w_in.shape[1] // block_f)
        dx, dw_in, dw_gate, dw_out = tpu.backward(
            x, w_in, w_gate, w_out, mask, mask_t, dy, act=act, gate_and_up=gate_and_up,
            block_t=block_t, block_f=block_f, interpret=interpret)
    else:  # GPU: documented dense-with-mask backward in XLA
        dx, dw_in, dw_gate, dw_out = _dense_masked_vjp(
            x, w_in, w_gate, w_out, mask, dy, act, gate_and_up, block_t, block_f)
    # Integer index lists get no cotangent.
    return dx, dw_in, dw_gate, dw_out, None


_kernel_ffn.defvjp(_kernel_ffn_fwd, _kernel_ffn_bwd)


# ----------------------------------------------------------------------------- entry point

def pad_tokens(x_TxD: Array, block_t: int) -> tuple[Array, int]:
    """Zero-pad the token axis to a multiple of block_t; returns (padded, original T)."""
    t = x_TxD.shape[0]
    extra = -t % block_t
    return (jnp.pad(x_TxD, ((0, extra), (0, 0))) if extra else x_TxD), t


def block_sparse_ffn(x: Array, w_in_DxF: Array, w_gate_DxF: Optional[Array], w_out_FxD: Array,
                     activation_fn: common.Activation, *, block_t: int = 128,
                     block_f: int = 128, k_max: Optional[int] = None,
                     mask: Optional[BlockMask] = None, threshold: float = 0.0,
                     gate_and_up: bool = False, impl: str = "auto",
                     dense_fallback_density: Optional[float] = None,
                     interpret: bool = False) -> Array:
    """Block-sparse FFN of ``x`` (any leading dims, last dim D); returns x's shape and dtype.

    mask: a :class:`BlockMask` over the (zero-padded) token blocks; if None it is computed from
        σ(W_gate x) (plain FFN: σ(W_in x)) by ``block_mask.active_TxF(·, threshold)`` (the
        zero rule at 0, FAT-ε above; a NaN is active) with one dense gate matmul outside the
        gradient, so only W_in and W_out are skipped then; pass a predicted mask to skip all three.
    k_max: static cap on neuron blocks per token block (None: all M; exact). It sets the
        kernels' grid and the pure-JAX path's work: the kernels skip slots past a row's count, but
        the pure-JAX path computes all k_max slots, so on CPU set it near the busiest row's count.
    gate_and_up: apply σ to the up projection too (dReLU, ``activations.get(name).gate_and_up``).
    impl: "auto" | "tpu" | "gpu" | "jax" | "dense". interpret: run a Pallas kernel in
        interpret mode (CPU tests).
    dense_fallback_density: tile density above which the dense-with-mask FFN runs instead
        (a ``lax.cond`` at run time; same result). None: ``DENSE_FALLBACK_DENSITY`` of the chosen
        kernel's backend; 1.0 or more disables the fallback.
    Tokens are zero-padded to a multiple of block_t; d_ff must be a multiple of block_f
    (ValueError naming the shape otherwise).
    """
    impl = pick_impl(impl)
    *lead, d = x.shape
    f = w_in_DxF.shape[1]
    if w_in_DxF.shape != (d, f) or w_out_FxD.shape != (f, d) or (
            w_gate_DxF is not None and w_gate_DxF.shape != (d, f)):
        raise ValueError(f"weight shapes w_in={w_in_DxF.shape}, w_gate="
                         f"{None if w_gate_DxF is None else w_gate_DxF.shape}, w_out="
                         f"{w_out_FxD.shape} do not fit x of shape {x.shape} (D={d})")
    if f % block_f:
        raise ValueError(f"d_ff F={f} is not a multiple of block_f={block_f}")
    x_TxD, t = pad_tokens(x.reshape(-1, d), block_t)
    n, m = bm.check_blocks(x_TxD.shape[0], f, block_t, block_f)
    if mask is None:
        src_DxF = w_in_DxF if w_gate_DxF is None else w_gate_DxF
        act_TxF = activation_fn(jnp.einsum("td,df->tf", x_TxD, src_DxF,
                                           preferred_element_type=jnp.float32))
        # Padded rows never make a tile active.
        act_TxF = jnp.where((jnp.arange(x_TxD.shape[0]) < t)[:, None], act_TxF, 0.0)
        mask = jax.tree.map(jax.lax.stop_gradient,
                            bm.from_activations(act_TxF, block_t, block_f, k_max=k_max,
                                                threshold=threshold))
    elif mask.index_NxK.shape[0] != n:
        raise ValueError(f"mask has {mask.index_NxK.shape[0]} token blocks; x needs N={n} "
                         f"(T={t} padded to {x_TxD.shape[0]}, block_t={block_t})")
    kw = dict(gate_and_up=gate_and_up, block_t=block_t, block_f=block_f)
    dense_fn = lambda *a: dense(*a, mask, activation_fn, **kw)  # noqa: E731
    if impl == "dense":
        sparse_fn = dense_fn
    elif impl == "jax":
        sparse_fn = lambda *a: jax_tiles(*a, mask, activation_fn, **kw)  # noqa: E731
    else:
        def sparse_fn(*a):
            # Inside shard_map: one varying-axes type for all kernel operands (common.vary_like).
            *a, m_ = common.vary_like(common.varying_axes(*a, *mask), (*a, mask))
            return _kernel_ffn(*a, m_, impl, activation_fn, gate_and_up, block_t, block_f,
                               interpret)
    if dense_fallback_density is None:
        dense_fallback_density = DENSE_FALLBACK_DENSITY.get(
            {"jax": jax.default_backend()}.get(impl, impl), 0.6)
    args = (x_TxD, w_in_DxF, w_gate_DxF, w_out_FxD)
    if impl == "dense" or dense_fallback_density >= 1.0:
        y_TxD = sparse_fn(*args)
    else:
        use_dense = bm.density(mask, m) > dense_fallback_density
        y_TxD = jax.lax.cond(use_dense, dense_fn, sparse_fn, *args)
    return y_TxD[:t].reshape(*lead, d)
