"""Decoder-only transformer (Flax Linen) with swappable FFN activations and top-k FFN sparsity.

Pre-norm RMSNorm blocks, RoPE, causal multi-head attention, gated or plain FFN, tied embeddings.
Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv``,
``norm``) that :mod:`sparsejax.sharding` maps to mesh axes by rules, MaxText style.

What the sparsity metrics need is sown into the ``intermediates`` collection only when the
caller asks for it (``mutable=["intermediates"]``); otherwise ``sow`` is a no-op and costs
nothing. Per layer ``i`` the FFN sows

* ``layer_{i}/ffn/activation``: σ(W_gate x) (plain FFN: σ(W_in x)), shape [B, L, F], the quantity
  the zero / top-k / FAT-ε criteria of docs/sparsity_metrics_and_laws.md §Criteria look at;
* ``layer_{i}/ffn/hidden``: σ(gate)·up (plain: σ(W_in x)) after any training-time top-k mask
  but before an evaluation threshold mask — CETT scores are |hidden|·‖W_out[i]‖
  (docs/sparsity_metrics_and_laws.md §CETT).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import activations, metrics
from sparsejax.config import ModelConfig

Array = jax.Array

# Evaluation-time neuron masks: which FFN quantity a per-neuron threshold is compared with.
MASK_TARGETS = ("activation", "hidden")


def _dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def _init(std: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class Projection(nn.Module):
    """``einsum(x, w)`` with a float32 weight of the given shape and logical axes, cast to dtype.

    Written with ``self.param`` rather than ``nn.DenseGeneral`` so each kernel is created in its
    final shape: logical sharding constraints then apply to the right rank.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str
    std: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _init(self.std, self.axes), self.shape, jnp.float32)
        return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


def rope(x_BxLxHxK: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021), rotating the two halves of each head."""
    half = x_BxLxHxK.shape[-1] // 2
    freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * freq_K2
    sin, cos = jnp.sin(angle_BxLxK2)[:, :, None, :], jnp.cos(angle_BxLxK2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxK.dtype)


def topk_mask(score_TxF: Array, k: int, *, approximate: bool = False, recall: float = 0.95) -> Array:
    """0/1 mask of exactly k entries per row: the k largest scores (ties broken by lower index).

    ``approximate`` uses ``lax.approx_max_k`` (TPU-friendly partial reduction, Chern et al. 2022)
    with the given recall target; it still marks exactly k entries per row.
    """
    d_ff = score_TxF.shape[-1]
    if not 1 <= k <= d_ff:
        raise ValueError(f"top-k k={k} must be in [1, d_ff={d_ff}]")
    if k == d_ff:
        return jnp.ones_like(score_TxF)
    if approximate:
        _, index_TxK = jax.lax.approx_max_k(score_TxF, k, recall_target=recall)
    else:
        _, index_TxK = jax.lax.top_k(score_TxF, k)
    rows = score_TxF.reshape(-1, d_ff)
    index_NxK = index_TxK.reshape(-1, k)
    mask_NxF = jnp.zeros_like(rows).at[jnp.arange(rows.shape[0])[:, None], index_NxK].set(1)
    return mask_NxF.reshape(score_TxF.shape)


class FeedForward(nn.Module):
    """Gated ``W_out[σ(W_gate x) ⊙ W_in x]`` or plain ``W_out σ(W_in x)`` FFN
    (docs/sparsity_metrics_and_laws.md §Activation ratio)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, neuron_threshold_F: Optional[Array] = None,
                 mask_target: str = "activation", global_topk: float = 0.0) -> Array:
        cfg = self.cfg
        dtype = _dtype(cfg)
        spec = activations.get(cfg.activation)
        act_fn = activations.make(cfg.activation, threshold=cfg.activation_threshold,
                                  alpha=cfg.activation_alpha)
        def w_in(name):
            return Projection((cfg.d_model, cfg.d_ff), ("embed", "mlp"), "bld,df->blf",
                              cfg.init_std, dtype, name=name)

        up_BxLxF = w_in("w_in")(x_BxLxD)
        if cfg.ffn_type == "gated":
            activation_BxLxF = act_fn(w_in("w_gate")(x_BxLxD))
            if spec.gate_and_up:
                up_BxLxF = act_fn(up_BxLxF)
            hidden_BxLxF = activation_BxLxF * up_BxLxF
        else:
            activation_BxLxF = act_fn(up_BxLxF)
            hidden_BxLxF = activation_BxLxF

        k = cfg.topk_k
        if k and k < cfg.d_ff:
            keep_BxLxF = jax.lax.stop_gradient(topk_mask(
                jnp.abs(activation_BxLxF).astype(jnp.float32), k,
                approximate=cfg.topk_mode == "approx", recall=cfg.topk_recall)).astype(dtype)
            if cfg.topk_ste:
                # Q-Sparse straight-through estimator: forward is masked, backward is dense.
                hidden_BxLxF = hidden_BxLxF + jax.lax.stop_gradient(
                    hidden_BxLxF * keep_BxLxF - hidden_BxLxF)
            else:
                hidden_BxLxF = hidden_BxLxF * keep_BxLxF

        # Sown before the evaluation mask below, so an evaluator can tell "dropped by the mask"
        # from "exactly zero" and measure the activity of a sparse pass itself
        # (docs/sparsity_metrics_and_laws.md §Reference procedure).
        self.sow("intermediates", "activation", activation_BxLxF)
        self.sow("intermediates", "hidden", hidden_BxLxF)
        if neuron_threshold_F is not None:
            # Evaluation-time sparse forward (FAT-ε on |σ(gate)|, CETT on |σ(gate)·up|): neurons
            # strictly below their threshold are dropped, so a threshold of 0 is the dense model.
            if mask_target not in MASK_TARGETS:
                raise ValueError(f"mask_target={mask_target!r}; allowed: {MASK_TARGETS}")
            measured = activation_BxLxF if mask_target == "activation" else hidden_BxLxF
            hidden_BxLxF = jnp.where(jnp.abs(measured) >= neuron_threshold_F.astype(measured.dtype),
                                     hidden_BxLxF, jnp.zeros_like(hidden_BxLxF))
        if global_topk:
            # The reference's evaluation top-k (``prune_topk``): keep the top fraction of
            # |σ(gate)| over all tokens × neurons of this call's batch, per layer.
            keep_BxLxF = metrics.global_topk_active_TxF(
                activation_BxLxF.reshape(-1, cfg.d_ff), global_topk).reshape(activation_BxLxF.shape)
            hidden_BxLxF = jnp.where(keep_BxLxF, hidden_BxLxF, jnp.zeros_like(hidden_BxLxF))

        hidden_BxLxF = nn.with_logical_constraint(hidden_BxLxF, ("batch", "length", "mlp"))
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2 residual-branch scaling
        return Projection((cfg.d_ff, cfg.d_model), ("mlp", "embed"), "blf,fd->bld", out_std, dtype,
                          name="w_out")(hidden_BxLxF)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, positions_BxL: Array) -> Array:
        cfg = self.cfg
        dtype = _dtype(cfg)
        def proj(name):
            return Projection((cfg.d_model, cfg.n_heads, cfg.head_dim), ("embed", "heads", "kv"),
                              "bld,dhk->blhk", cfg.init_std, dtype, name=name)

        q_BxLxHxK = rope(proj("query")(x_BxLxD), positions_BxL, cfg.rope_theta)
        k_BxLxHxK = rope(proj("key")(x_BxLxD), positions_BxL, cfg.rope_theta)
        v_BxLxHxK = proj("value")(x_BxLxD)
        out_BxLxHxK = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        return Projection((cfg.n_heads, cfg.head_dim, cfg.d_model), ("heads", "kv", "embed"),
                          "blhk,hkd->bld", out_std, dtype, name="out")(out_BxLxHxK)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale_D).astype(self.dtype)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, neuron_threshold_F=None, mask_target="activation",
                 global_topk=0.0):
        cfg = self.cfg
        dtype = _dtype(cfg)
        h = RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + Attention(cfg, name="attn")(h, positions_BxL)
        h = RMSNorm(cfg.norm_eps, dtype, name="ffn_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + FeedForward(cfg, name="ffn")(h, neuron_threshold_F, mask_target,
                                                               global_topk)
        return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))


class Transformer(nn.Module):
    """Token ids [B, L] -> logits [B, L, V] (float32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL: Array, positions_BxL: Optional[Array] = None,
                 neuron_thresholds_NxF: Optional[Array] = None,
                 mask_target: str = "activation", global_topk: float = 0.0) -> Array:
        """``neuron_thresholds_NxF``: optional per-layer, per-neuron evaluation thresholds;
        ``global_topk``: optional evaluation-time global top-k fraction (0 = off)."""
        cfg = self.cfg
        dtype = _dtype(cfg)
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                         embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="embed")
        x_BxLxD = embed(tokens_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        for i in range(cfg.n_layers):
            threshold_F = None if neuron_thresholds_NxF is None else neuron_thresholds_NxF[i]
            x_BxLxD = Block(cfg, name=f"layer_{i}")(x_BxLxD, positions_BxL, threshold_F, mask_target,
                                                    global_topk)
        x_BxLxD = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x_BxLxD)
        if cfg.tie_embeddings:
            logits = embed.attend(x_BxLxD)
        else:
            logits = Projection((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), "bld,dv->blv",
                                cfg.init_std, dtype, name="unembed")(x_BxLxD)
        return logits.astype(jnp.float32)


def ffn_intermediates(state: dict, n_layers: int) -> tuple[list[Array], list[Array]]:
    """(activation per layer, hidden per layer) from an ``intermediates`` collection."""
    acts, hiddens = [], []
    for i in range(n_layers):
        ffn = state["intermediates"][f"layer_{i}"]["ffn"]
        acts.append(ffn["activation"][0])
        hiddens.append(ffn["hidden"][0])
    return acts, hiddens


def w_out_per_layer(params: dict, n_layers: int) -> list[Array]:
    """W_out [F, D] of each layer, unboxed from logical-partitioning metadata."""
    params = nn.meta.unbox(params)
    return [params[f"layer_{i}"]["ffn"]["w_out"]["kernel"] for i in range(n_layers)]


def abstract_params(cfg: ModelConfig, seq_len: int, mesh: jax.sharding.Mesh, mesh_cfg) -> dict:
    """Parameter shapes, dtypes and shardings (``ShapeDtypeStruct``s) without allocating any.

    What a reader of checkpoints needs to restore parameters without building an optimizer.
    """
    from sparsejax import sharding  # noqa: PLC0415 - sharding is a leaf; keeps model import-light

    boxed = jax.eval_shape(
        lambda key: Transformer(cfg).init(key, jnp.zeros((1, seq_len), jnp.int32))["params"],
        jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, mesh_cfg)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(boxed), shardings)
