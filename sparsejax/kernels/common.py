"""Element-wise pieces shared by the TPU and GPU kernel bodies (pure functions of f32 tiles).

The FFN hidden unit is ``h = σ(g) · τ(u)`` for a gated FFN (g = x·W_gate, u = x·W_in; τ is the
identity, or σ when the activation is applied to the up projection too, as in dReLU, Song et al.
2024) and ``h = σ(u)`` for a plain FFN. σ must be element-wise: a blocked kernel sees only
``block_f`` neurons at a time, so feature-axis normalising activations (PolyNorm) cannot run here.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
Activation = Callable[[Array], Array]


def value_and_slope(act: Activation, z: Array) -> tuple[Array, Array]:
    """(σ(z), σ'(z)) element-wise, by one forward-mode pass (no transpose needed in a kernel)."""
    return jax.jvp(act, (z,), (jnp.ones_like(z),))


def hidden(act: Activation, u: Array, g: Optional[Array], gate_and_up: bool) -> Array:
    if g is None:
        return act(u)
    return act(g) * (act(u) if gate_and_up else u)


def hidden_grads(act: Activation, u: Array, g: Optional[Array], gate_and_up: bool,
                 dh: Array) -> tuple[Array, Array, Optional[Array]]:
    """(h, du, dg) for upstream dh; dg is None for a plain FFN."""
    if g is None:
        s_u, ds_u = value_and_slope(act, u)
        return s_u, dh * ds_u, None
    s_g, ds_g = value_and_slope(act, g)
    if gate_and_up:
        t_u, dt_u = value_and_slope(act, u)
    else:
        t_u, dt_u = u, jnp.ones_like(u)
    return s_g * t_u, dh * s_g * dt_u, dh * t_u * ds_g


def varying_axes(*operands) -> frozenset:
    """Mesh axes (inside ``jax.shard_map``) over which any operand varies; empty outside."""
    axes = frozenset()
    for a in operands:
        if a is not None:
            axes |= jax.typeof(a).manual_axis_type.varying
    return axes


def vary_like(axes: frozenset, tree):
    """Mark every array of ``tree`` as varying over ``axes`` (a no-op outside ``shard_map``).

    Under ``shard_map(check_vma=True)`` a ``pallas_call`` must state how its outputs vary, and a
    ``custom_vjp`` must return cotangents typed like its primal inputs. Making all kernel operands
    vary over the same axes first satisfies both: the outputs vary over those axes, and the
    transpose of this cast is the ``psum`` that reduces, e.g., the per-shard partial weight
    gradients over the data-parallel axes.
    """
    def cast(a):
        missing = tuple(sorted(axes - jax.typeof(a).manual_axis_type.varying))
        return jax.lax.pcast(a, missing, to="varying") if missing else a
    return jax.tree.map(cast, tree)


def out_struct(shape, dtype, like: Array) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` output shape that varies over the same mesh axes as ``like``."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def cost_estimate(*, flops: int, bytes_accessed: int) -> "pl.CostEstimate":
    """What XLA's cost model counts for a ``pallas_call`` (otherwise 0 FLOPs: a custom call is
    opaque to it). The kernels pass the FLOPs and HBM bytes of their grid at k_max, i.e. with
    every list slot active: an upper bound when some token blocks have fewer active tiles.
    Transcendentals are left at 0 (ReLU has none; the others' share of an FFN is small)."""
    from jax.experimental import pallas as pl  # noqa: PLC0415 - as the kernel modules do

    return pl.CostEstimate(flops=int(flops), transcendentals=0,
                           bytes_accessed=int(bytes_accessed))
