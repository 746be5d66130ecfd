"""The causal attention implementations behind ``model.attention_impl``, and their registry.

An implementation is ``attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK) -> out_BxLxHxK``: RoPE is already
applied, ``G`` key/value heads are shared by ``H / G`` query heads each (grouped-query attention;
G == H for multi-head), and the result is softmax(q kᵀ / √K, causal) v per head. A factory
``factory(cfg) -> attend`` registers under a name with :func:`register_attention_impl`;
:class:`sparsejax.model.Attention` calls :func:`attention_fn` and nothing else changes.

* ``xla``: :func:`sparsejax.model.causal_attention` (registered there, next to it), two einsums
  around float32 [B, H, L, L] scores with the causal mask applied after the fact (the masked
  upper triangle is computed). The default, and the fastest on CPU.
* ``splash``: TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``), a
  flash kernel over (``attention_block_q`` × ``attention_block_kv``) blocks with a causal block
  mask, so blocks above the diagonal are never loaded or computed (about half of the score
  FLOPs at long contexts; :func:`splash_block_fraction`). Grouped-query heads natively (its MHA
  kernel maps query head h to key/value head h // (H / G), as :func:`repeat_kv`).
* ``gpu``: the Pallas GPU (Triton) flash kernel ``jax.experimental.pallas.ops.gpu.attention.mha``
  with its causal block skipping; any dtype. Key/value heads are repeated for GQA.
* ``cudnn``: cuDNN's fused attention through ``jax.nn.dot_product_attention``
  (bfloat16 only, GPU only).
* ``auto``: ``splash`` on TPU, ``gpu`` on GPU, ``xla`` elsewhere (:data:`AUTO`).

Where it runs: the target platform is the one of the mesh the step is traced under (so a TPU
compile on a CPU host gets the TPU kernels), else JAX's default backend. A Pallas kernel off its
platform runs in Pallas *interpret* mode: exact and slow, which is how the CPU tests compare the
kernels with ``xla`` (``splash`` and ``gpu`` are usable on CPU, just not fast).

Under a multi-device mesh the Pallas kernels run per shard inside ``jax.shard_map`` (a Pallas
kernel is an opaque custom call that GSPMD cannot split): batch over the mesh axes of the
``batch`` rule, heads over those of ``heads``, sequence and head_dim whole, as
:mod:`sparsejax.kernels.sharded` does for the block-sparse FFN. The specs come from the active
logical rules, so no mesh axis is named here.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sparsejax.config import Config, ConfigError, ModelConfig, choice, positive
from sparsejax.sharding import shard_ways, spec_axes

Array = jax.Array
AttentionFn = Callable[[Array, Array, Array], Array]
ATTENTION_IMPLS: dict[str, Callable[[ModelConfig], AttentionFn]] = {}
# What ``auto`` picks on each platform (any other platform: "xla").
AUTO = {"tpu": "splash", "gpu": "gpu"}
# ``checkpoint_name`` of splash attention's residuals (its output and log-sum-exp), which the
# remat policy ``save_qkv_attention`` (sparsejax.model.REMAT_POLICIES) keeps so the backward pass
# does not rerun the forward kernel.
RESIDUALS_NAME = "attention_residuals"
LANES = 128  # splash block sizes are multiples of the TPU lane width


def register_attention_impl(name: str):
    """Decorator: register ``factory(cfg) -> attend`` under ``model.attention_impl=name``."""
    def deco(factory):
        ATTENTION_IMPLS[name] = factory
        return factory
    return deco


def attention_impl_names() -> list[str]:
    """The allowed values of ``model.attention_impl``: the registered ones and ``auto``."""
    return sorted(ATTENTION_IMPLS) + ["auto"]


def target_platform() -> str:
    """The platform the traced computation is compiled for: the context mesh's devices', else
    JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def resolve(name: str, platform: Optional[str] = None) -> str:
    """``auto`` → the implementation for ``platform`` (default: :func:`target_platform`)."""
    if name != "auto":
        return name
    return AUTO.get(platform or target_platform(), "xla")


def attention_fn(cfg: ModelConfig) -> AttentionFn:
    """The attention of ``model.attention_impl`` (``auto`` resolved for the target platform)."""
    choice("model.attention_impl", cfg.attention_impl, attention_impl_names())
    return ATTENTION_IMPLS[resolve(cfg.attention_impl)](cfg)


def splash_blocks(cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
    """(block_q, block_kv) of splash attention at ``seq_len``: the configured sizes, capped at
    the sequence length."""
    return min(cfg.attention_block_q, seq_len), min(cfg.attention_block_kv, seq_len)


def _splash_seq_error(cfg: ModelConfig, seq_len: int, what: str) -> Optional[str]:
    bq, bkv = splash_blocks(cfg, seq_len)
    if seq_len % LANES or seq_len % bq or seq_len % bkv:
        return (f"{what}={seq_len} must be a multiple of {LANES} and of the splash blocks "
                f"model.attention_block_q={cfg.attention_block_q} and "
                f"model.attention_block_kv={cfg.attention_block_kv} (each capped at the "
                f"sequence length) for model.attention_impl='splash'")
    return None


def check_config(cfg: Config) -> None:
    """``model.attention_impl`` is registered (or ``auto``), and what the chosen kernel needs of
    the shapes holds; ConfigError naming the field."""
    m = cfg.model
    choice("model.attention_impl", m.attention_impl, attention_impl_names())
    for name in ("attention_block_q", "attention_block_kv"):
        value = getattr(m, name)
        positive(f"model.{name}", value)
        if value % LANES:
            raise ConfigError(f"model.{name}={value} must be a multiple of {LANES} "
                              f"(the TPU lane width splash attention tiles by)")
    if m.attention_impl == "splash":
        error = _splash_seq_error(m, cfg.train.seq_len, "train.seq_len")
        if error:
            raise ConfigError(error)
    if m.attention_impl == "cudnn" and m.dtype != "bfloat16":
        raise ConfigError(f"model.dtype={m.dtype!r} must be 'bfloat16' for "
                          f"model.attention_impl='cudnn' (cuDNN's fused attention has no float32 "
                          f"kernel); use model.attention_impl='gpu' for float32")


def repeat_kv(x_BxLxGxK: Array, n_heads: int) -> Array:
    """Grouped-query attention's key/value heads [.., G, K] repeated to [.., n_heads, K]: query
    head h reads key/value head h // (n_heads / G), as Hugging Face's ``repeat_kv``. Identity when
    G == n_heads (no copy, so multi-head graphs are unchanged)."""
    groups = x_BxLxGxK.shape[2]
    return x_BxLxGxK if groups == n_heads else jnp.repeat(x_BxLxGxK, n_heads // groups, axis=2)


# -------------------------------------------------------------------- sharding (shard_map)
def per_shard(local: AttentionFn, q_BxLxHxK: Array, k_BxLxGxK: Array, v_BxLxGxK: Array,
              *, mesh=None, spec: Optional[P] = None) -> Array:
    """``local(q, k, v)`` on each device's batch rows and heads under ``mesh`` (default: the
    context mesh), inside ``jax.shard_map``; without a multi-device mesh, ``local`` as is.

    spec: mesh PartitionSpec of the [B, L, H, K] queries (default: the logical
        ("batch", "length", "heads", "kv") by the active rules); the length and head_dim entries
        are ignored (a kernel needs whole sequences). Key/value heads are split like the query
        heads when the head shards divide G (each shard then holds its queries' groups), else
        repeated to H first. ValueError naming the dimension when B or H does not divide.

    ``check_vma=False``: the Pallas kernels do not type their outputs' varying mesh axes (and
    interpret mode cannot); every operand is split over the same axes, so the backward pass is
    exact and adds no collective.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or mesh.size == 1:
        return local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
    if spec is None:
        spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "kv"))
    spec = tuple(spec or ()) + (None,) * (4 - len(spec or ()))
    batch_axes, head_axes = spec_axes(spec[0]), spec_axes(spec[2])
    n_heads, groups = q_BxLxHxK.shape[2], k_BxLxGxK.shape[2]
    for dim, name, axes in ((q_BxLxHxK.shape[0], "batch B", batch_axes),
                            (n_heads, "heads H (model.n_heads)", head_axes)):
        if dim % shard_ways(mesh, axes):
            raise ValueError(f"attention under a mesh: {name}={dim} is not divisible by the "
                             f"{shard_ways(mesh, axes)} shards of mesh axes {list(axes)}")
    if groups % shard_ways(mesh, head_axes):
        k_BxLxGxK, v_BxLxGxK = repeat_kv(k_BxLxGxK, n_heads), repeat_kv(v_BxLxGxK, n_heads)
    split = P(spec[0], None, spec[2], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(split, split, split), out_specs=split,
                         check_vma=False)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)


# --------------------------------------------------------------------------------- splash
def splash_block_fraction(seq_len: int, block_q: int, block_kv: int) -> float:
    """Share of the (L/block_q × L/block_kv) score blocks a causal splash kernel computes: those
    with some key position ≤ some query position (the rest are skipped)."""
    nq, nkv = seq_len // block_q, seq_len // block_kv
    q_last = (np.arange(nq) + 1) * block_q - 1  # each query block's last position
    kv_first = np.arange(nkv) * block_kv
    return float((kv_first[None, :] <= q_last[:, None]).sum() / (nq * nkv))


@functools.lru_cache(maxsize=32)
def _splash_kernel(n_heads: int, seq_len: int, block_q: int, block_kv: int, interpret: bool):
    """A causal splash-attention kernel for [H, L, K] queries. Mask processing is numpy work at
    trace time, so kernels are cached per shape; their block tables are made concrete arrays
    (not values of whichever trace built them first) so that every trace can reuse them."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # noqa: PLC0415

    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len))] * n_heads)
    blocks = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                           block_q_dkv=block_q, block_kv_dkv=block_kv,
                           block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name=RESIDUALS_NAME, interpret=interpret)


@register_attention_impl("splash")
def splash_attention(cfg: ModelConfig) -> AttentionFn:
    """Splash attention with a causal block mask (module docstring); interpreted off TPU."""

    def local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK):
        batch, seq_len, n_heads, head_dim = q_BxLxHxK.shape
        error = _splash_seq_error(cfg, seq_len, "sequence length")
        if error:
            raise ValueError(error)
        kernel = _splash_kernel(n_heads, seq_len, *splash_blocks(cfg, seq_len),
                                target_platform() != "tpu")
        # splash takes [H, L, K] per sequence and does not scale the scores: q / √K first.
        q_BxHxLxK = (q_BxLxHxK * jnp.asarray(head_dim ** -0.5, q_BxLxHxK.dtype)
                     ).transpose(0, 2, 1, 3)
        k_BxGxLxK, v_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3)
        out_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK)
        return out_BxHxLxK.transpose(0, 2, 1, 3)

    return lambda q, k, v: per_shard(local, q, k, v)


# ------------------------------------------------------------------------------------ gpu
@register_attention_impl("gpu")
def gpu_attention(cfg: ModelConfig) -> AttentionFn:
    """The Pallas GPU flash kernel, causal (blocks above the diagonal skipped), forward and
    backward in Triton; interpreted off GPU."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_mha  # noqa: PLC0415

    def local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK):
        n_heads, head_dim = q_BxLxHxK.shape[2:]
        return gpu_mha.mha(q_BxLxHxK, repeat_kv(k_BxLxGxK, n_heads),
                           repeat_kv(v_BxLxGxK, n_heads), None,
                           sm_scale=head_dim ** -0.5, causal=True,
                           interpret=target_platform() != "gpu")

    return lambda q, k, v: per_shard(local, q, k, v)


@register_attention_impl("cudnn")
def cudnn_attention(cfg: ModelConfig) -> AttentionFn:
    """cuDNN's fused causal attention (``jax.nn.dot_product_attention``, GQA native)."""

    def local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK):
        if target_platform() != "gpu":
            raise ValueError(f"model.attention_impl='cudnn' needs a GPU (target platform: "
                             f"{target_platform()}); use 'gpu' (Pallas, interpreted off GPU) "
                             f"or 'xla'")
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, is_causal=True,
                                            implementation="cudnn")

    return lambda q, k, v: per_shard(local, q, k, v)


# ------------------------------------------------------------------------ executed FLOPs
# Matmuls of one (query block × key block) score tile per training step, in units of
# 2·bq·bkv·K FLOPs: forward QKᵀ and PV; the einsum path's backward dV, dP, dQ, dK; splash's
# backward runs a dq kernel (QKᵀ, dP, dQ) and a dkv kernel (QKᵀ, dP, dV, dK), recomputing the
# scores in each.
TILE_MATMULS = {"xla": {"fwd": 2, "bwd": 4}, "splash": {"fwd": 2, "bwd": 7}}
# Remat policies under which the attention forward is not run again in the backward pass: with
# "none" nothing is recomputed; "save_qkv_attention" keeps the kernel's output and log-sum-exp,
# which only a fused kernel tags (the einsum path's probabilities are recomputed under it).
FORWARD_KEPT = {"xla": ("none",), "splash": ("none", "save_qkv_attention")}


def train_flops_per_token(cfg: ModelConfig, seq_len: int, impl: str) -> float:
    """Attention-product FLOPs (QKᵀ, PV and their gradients, all layers) a training step
    executes per token with implementation ``impl`` (``xla`` or ``splash``) under
    ``cfg.remat_policy``. The einsum path computes every score, masked or not (its forward and
    backward are the 12·N·L·H·K of :func:`sparsejax.flops.train_flops_per_token`); splash only
    the causal blocks (:func:`splash_block_fraction`), with more matmuls per block."""
    choice("impl", impl, list(TILE_MATMULS))
    unit = 2.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim  # one L×L×K product / token
    matmuls = TILE_MATMULS[impl]
    count = matmuls["fwd"] * (1 if cfg.remat_policy in FORWARD_KEPT[impl] else 2) + matmuls["bwd"]
    share = 1.0 if impl == "xla" else splash_block_fraction(seq_len, *splash_blocks(cfg, seq_len))
    return unit * count * share
