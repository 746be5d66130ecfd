"""The block-sparse FFN under a device mesh: one ``jax.shard_map`` around mask + kernel.

Why a ``shard_map`` at all: a Pallas kernel is an opaque custom call that GSPMD cannot split, and
the block mask is a data-dependent index list over *global* token and neuron blocks, so under
jit's automatic partitioning the kernel would run on gathered, replicated arrays. Inside
``shard_map`` every device runs the kernel on its own tokens and its own neurons, Megatron-style:

* tokens ([B, L, ·]) are split like the FFN's hidden activations ("batch", "length");
* W_in / W_gate columns and W_out rows are split over the mesh axes of "mlp" (tensor
  parallel); each shard's output is a partial sum over its neurons, ``psum``-ed over those axes;
* the weights' "embed" dimension is *not* in the in_specs, so weights FSDP-sharded over it are
  all-gathered by jit at the boundary (and their gradients reduce-scattered back), as FSDP does;
* each shard builds its block mask from its local activations (local tokens × local neurons),
  so no index list ever refers to another device's blocks.

The mesh axes come from the caller as the mesh ``PartitionSpec`` of the [B, L, F] hidden
activations (the model resolves its logical names through the active rules; see
``sparsejax.ffn.block_sparse_ffn``), so nothing here names a mesh axis. On one device, or with
no mesh, the same local function runs without ``shard_map``.

``check_vma``: shard_map's varying-axes typing makes the backward exact *and* cheap (the
cotangent of the psum-ed output is used as is; without it JAX adds one more all-reduce of dy per
layer: on the v5e compile of tests/test_kernels_tpu.py, three activation-sized all-reduces
instead of two). The Pallas kernels state their
outputs' varying axes (``common.out_struct``) and get operands of one type
(``common.vary_like``). Pallas *interpret* mode cannot follow that typing (its grid loop slices
typed operands with untyped indices; JAX's error suggests ``check_vma=False`` as the
workaround), so interpret runs, i.e. the CPU tests of the kernels, use ``check_vma=False``,
which is exact too, only with that extra all-reduce.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import PartitionSpec as P

from sparsejax.kernels import block_mask as bm
from sparsejax.kernels import common
from sparsejax.kernels import ffn as kffn
from sparsejax.sharding import shard_ways, spec_axes

Array = jax.Array


def _check_divides(mesh, x_shape, d_ff: int, block_f: int, tok_axes, mlp_axes) -> None:
    """ValueError naming the dimension (and the config field) that a shard would not divide."""
    for dim, name, axes in ((x_shape[0], "batch B", tok_axes[0]),
                            (x_shape[1], "length L", tok_axes[1])):
        if dim % shard_ways(mesh, axes):
            raise ValueError(f"block-sparse FFN under a mesh: {name}={dim} is not divisible by "
                             f"the {shard_ways(mesh, axes)} shards of mesh axes {list(axes)}")
    ways = shard_ways(mesh, mlp_axes)
    if d_ff % ways:
        raise ValueError(f"block-sparse FFN under a mesh: d_ff={d_ff} (model.d_ff) is not "
                         f"divisible by the {ways} shards of mesh axes {list(mlp_axes)} "
                         f"(the 'mlp' rule)")
    if (d_ff // ways) % block_f:
        raise ValueError(
            f"block-sparse FFN under a mesh: block_f={block_f} (model.ffn_block_f) does not "
            f"divide the neurons of one shard: d_ff={d_ff} is split over mesh axes "
            f"{list(mlp_axes)} ({ways} ways, the 'mlp' rule) into {d_ff // ways} per shard; "
            f"choose a block_f that divides {d_ff // ways}, or change the mesh or mesh.rules")


def block_sparse_ffn(x_BxLxD: Array, act_BxLxF: Optional[Array], w_in_DxF: Array,
                     w_gate_DxF: Optional[Array], w_out_FxD: Array,
                     activation_fn: common.Activation, *, hidden_spec: Optional[P] = None,
                     mesh=None, block_t: int, block_f: int, k_max: Optional[int] = None,
                     threshold: float = 0.0, gate_and_up: bool = False, impl: str = "auto",
                     dense_fallback_density: Optional[float] = None,
                     interpret: bool = False) -> Array:
    """:func:`sparsejax.kernels.ffn.block_sparse_ffn` of [B, L, D] tokens, per shard of ``mesh``.

    act_BxLxF: σ(gate) (plain FFN: σ(W_in x)) for the mask, already computed by the caller
        (gradients are not taken through it); None: each shard computes it from its x and
        gate columns. Tiles are active iff some entry is by ``block_mask.active_TxF(act,
        threshold)`` (k_max: as in the kernels).
    hidden_spec: mesh PartitionSpec of the [B, L, F] hidden activations (token dims, neuron dim);
        None or all-None: tokens and neurons replicated (each device computes the whole FFN).
    mesh: a Mesh / AbstractMesh; None: the context mesh (``jax.sharding.use_abstract_mesh``).
        With no mesh or one device the local computation runs unchanged, without shard_map.
    Raises ValueError when a sharded dimension, or a shard's d_ff and block_f, do not divide.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    opts = dict(block_t=block_t, block_f=block_f, gate_and_up=gate_and_up, impl=impl,
                dense_fallback_density=dense_fallback_density, interpret=interpret)
    spec = tuple(hidden_spec or ()) + (None,) * (3 - len(hidden_spec or ()))
    tok_axes, mlp_axes = (spec_axes(spec[0]), spec_axes(spec[1])), spec_axes(spec[2])

    def local(x, act, w_in, w_gate, w_out, psum_axes=mlp_axes):
        mask = None
        if act is not None:
            act_TxF, _ = kffn.pad_tokens(act.reshape(-1, act.shape[-1]), block_t)  # padded rows: 0
            mask = jax.tree.map(jax.lax.stop_gradient, bm.from_activations(
                jax.lax.stop_gradient(act_TxF), block_t, block_f, k_max=k_max,
                threshold=threshold))
        y = kffn.block_sparse_ffn(x, w_in, w_gate, w_out, activation_fn, mask=mask, k_max=k_max,
                                  threshold=threshold, **opts)
        return jax.lax.psum(y, psum_axes) if psum_axes else y

    args = (x_BxLxD, act_BxLxF, w_in_DxF, w_gate_DxF, w_out_FxD)
    if mesh is None or mesh.empty or mesh.size == 1:
        return local(*args, psum_axes=())  # nothing is split: no partial sums
    _check_divides(mesh, x_BxLxD.shape, w_in_DxF.shape[1], block_f, tok_axes, mlp_axes)
    tokens = P(spec[0], spec[1], None)
    cols = P(None, spec[2])  # W_in / W_gate [D, F]: "embed" gathered, "mlp" split
    in_specs = (tokens, None if act_BxLxF is None else P(*spec), cols,
                None if w_gate_DxF is None else cols, P(spec[2], None))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=tokens,
                         check_vma=not interpret)(*args)
