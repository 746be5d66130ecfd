"""Decoder-only transformer (Flax Linen) with swappable FFN activations, FFN implementations and
top-k FFN sparsity, optionally scanned over layers and rematerialised.

Pre-norm RMSNorm blocks, RoPE, causal multi-head attention, gated or plain FFN, tied embeddings.
Options that imported checkpoints need (:mod:`sparsejax.hf_import`), off by default and usable
in training: grouped-query attention (``model.n_kv_heads``), an untied output projection
(``model.tie_embeddings=False``), and MiniCPM's embedding, residual and logit scalings
(``model.scale_emb``, ``model.scale_depth``, ``model.dim_model_base``; :func:`residual_scale`,
:func:`logit_scale`) with µP's initialisation when ``model.mup`` is on (:mod:`sparsejax.mup`), and
RoPE frequency scalings (``model.rope_type``: linear, Llama 3.1's
llama3; :data:`ROPE_TYPES`). The output projection and its logit scale are exposed as
:func:`output_projection` and :func:`logit_scale` for losses that take the final hidden state.
Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv``,
``norm``; plus ``layers`` on the stacked parameters of ``model.scan_layers``) that
:mod:`sparsejax.sharding` maps to mesh axes by rules, MaxText style.

The FFN is a dispatch point: :class:`FeedForward` owns its weights and calls the implementation
that ``model.ffn_impl`` names in :data:`sparsejax.ffn.FFN_IMPLS` (``ffn_impl(x, weights,
sparsity) -> (y, aux)``); a new implementation registers there and needs no change to
:class:`Block` or :class:`Transformer`. What to mask and measure arrives as one
:class:`sparsejax.sparsity.Sparsity` input.

Collections, filled only when the caller makes them mutable (otherwise ``sow`` is a no-op):

* ``stats`` (training): per layer the active-token count per neuron ``active_count_F`` and its
  sum ``active_sum``, reduced inside the block when ``sparsity.stats_weights_BxL`` is given;
* ``intermediates`` (evaluation): ``activation`` σ(W_gate x) (plain FFN: σ(W_in x)), [B, L, F],
  and ``hidden`` σ(gate)·up after any training-time top-k mask but before an evaluation mask.

Read them, and per-layer weights, through :class:`Model` / :func:`ffn_intermediates` /
:func:`layer_stats` / :func:`w_out_per_layer`, which handle both layer layouts (``layer_{i}``
subtrees, or one ``layers`` subtree with a leading [N] axis under ``model.scan_layers``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import einops
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from sparsejax import mup
from sparsejax.attention import RESIDUALS_NAME, attention_fn, register_attention_impl, repeat_kv
from sparsejax.config import Config, ModelConfig, choice
from sparsejax.ffn import FFN_IMPLS, FfnWeights, ffn_impl_names
from sparsejax.sparsity import MASK_TARGETS, Sparsity  # noqa: F401 - re-exported

Array = jax.Array
PyTree = Any
SCAN_NAME = "layers"  # the scanned blocks' subtree, and the logical axis of their stacked params


def _dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def _init(std: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class Kernel(nn.Module):
    """One float32 weight of the given shape and logical axes, returned cast to ``dtype``.

    A module (not a bare ``self.param``) so parameter paths stay ``<name>/kernel`` — checkpoints
    of earlier versions restore unchanged and initial values (drawn per path) are the same.
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> Array:
        return self.param("kernel", _init(self.std, self.axes), self.shape, jnp.float32
                          ).astype(self.dtype)


class Projection(nn.Module):
    """``einsum(x, w)`` with a float32 weight of the given shape and logical axes, cast to dtype."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str
    std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _init(self.std, self.axes), self.shape, jnp.float32)
        return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


# ------------------------------------------------------------------------ RoPE frequencies
def _freq_default(cfg: ModelConfig) -> np.ndarray:
    half = cfg.head_dim // 2
    return cfg.rope_theta ** (-np.arange(half, dtype=np.float64) / half)


def _freq_linear(cfg: ModelConfig) -> np.ndarray:
    """Position interpolation (Chen et al. 2023): positions / factor, i.e. frequencies / factor."""
    return _freq_default(cfg) / cfg.rope_factor


def _freq_llama3(cfg: ModelConfig) -> np.ndarray:
    """Llama 3.1's frequency scaling (transformers ``_compute_llama3_parameters``): wavelengths
    longer than original_max_len / low_freq_factor are stretched by ``factor``, shorter than
    original_max_len / high_freq_factor kept, and interpolated in between."""
    freq = _freq_default(cfg)
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    wavelen = 2 * np.pi / freq
    scaled = np.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


ROPE_TYPES: dict[str, Callable[[ModelConfig], np.ndarray]] = {
    "default": _freq_default, "linear": _freq_linear, "llama3": _freq_llama3}


def rope_type_names() -> list[str]:
    return list(ROPE_TYPES)


def rope_frequencies(cfg: ModelConfig) -> Optional[np.ndarray]:
    """The rotary frequencies [head_dim/2] of ``model.rope_type`` (float64), or None for
    "default" (then :func:`rope_tables` computes θ^(-j/(K/2)) itself, as before)."""
    return None if cfg.rope_type == "default" else ROPE_TYPES[cfg.rope_type](cfg)


def rope_tables(positions_BxL: Optional[Array], seq_len: int, head_dim: int,
                theta: float, freq_K2: Optional[np.ndarray] = None) -> tuple[Array, Array]:
    """(sin, cos) of the rotary angles, [B or 1, L, 1, head_dim/2], computed once per forward pass.

    ``freq_K2``: the rotary frequencies (:func:`rope_frequencies`); None: θ^(-j/(K/2)).
    Default positions (0..L-1) give numpy constants: every layer's rotation then reads a table
    instead of recomputing sin/cos inside its fusions (XLA duplicates the transcendentals into
    each consumer; ~5% of a small CPU step).
    """
    half = head_dim // 2
    if positions_BxL is None:
        if freq_K2 is None:
            freq_K2 = theta ** (-np.arange(half, dtype=np.float64) / half)
        angle_LxK2 = np.arange(seq_len, dtype=np.float64)[:, None] * freq_K2
        return (jnp.asarray(np.sin(angle_LxK2), jnp.float32)[None, :, None, :],
                jnp.asarray(np.cos(angle_LxK2), jnp.float32)[None, :, None, :])
    freq_K2 = (theta ** (-jnp.arange(half, dtype=jnp.float32) / half) if freq_K2 is None
               else jnp.asarray(freq_K2, jnp.float32))
    angle_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * freq_K2
    return jnp.sin(angle_BxLxK2)[:, :, None, :], jnp.cos(angle_BxLxK2)[:, :, None, :]


def apply_rope(x_BxLxHxK: Array, sin_cos: tuple[Array, Array]) -> Array:
    """Rotary position embedding (Su et al. 2021), rotating the two halves of each head."""
    sin, cos = sin_cos
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxK.dtype)


def rope(x_BxLxHxK: Array, positions_BxL: Array, theta: float) -> Array:
    """RoPE at explicit positions (tests, callers without precomputed tables)."""
    return apply_rope(x_BxLxHxK, rope_tables(positions_BxL, x_BxLxHxK.shape[1],
                                             x_BxLxHxK.shape[-1], theta))


def causal_attention(q_BxLxHxK: Array, k_BxLxHxK: Array, v_BxLxHxK: Array) -> Array:
    """softmax(q kᵀ / √K, causal) v with float32 scores and softmax, written out as einsums.

    Not ``jax.nn.dot_product_attention``: its XLA path adds a group axis (for GQA) and transposes
    around it, which on CPU costs a few % of a small step; this form is what nanodo uses. Neither
    is a fused (flash) kernel: both hold the [B, H, L, L] scores.
    """
    length = q_BxLxHxK.shape[1]
    q_BxLxHxK = q_BxLxHxK * jnp.asarray(q_BxLxHxK.shape[-1] ** -0.5, q_BxLxHxK.dtype)
    scores_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK, k_BxLxHxK,
                                preferred_element_type=jnp.float32)
    causal_LxL = np.tril(np.ones((length, length), bool))
    scores_BxHxLxL = jnp.where(causal_LxL, scores_BxHxLxL, jnp.finfo(jnp.float32).min)
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1).astype(v_BxLxHxK.dtype)
    return jnp.einsum("bhqt,bthk->bqhk", probs_BxHxLxL, v_BxLxHxK)


# ------------------------------------------------------------------- decoding with a KV cache
@flax.struct.dataclass
class Decode:
    """A forward pass that reads and writes the key/value cache (``cache`` collection).

    The call's T tokens occupy cache slots ``index … index+T-1`` of every row; row b's own tokens
    start at slot ``start_B[b]`` (left padding before it is never attended to). ``cache_len``
    (static) is the cache's fixed number of slots. ``ffn`` (static) names a decode-time FFN in
    :data:`sparsejax.decode_ffn.DECODE_FFNS` ("" = the model's ``ffn_impl``), with its static
    ``capacity`` (neurons read per step: one for all layers, or one per layer; scanned layers
    share one shape, so under ``scan_layers`` the largest). ``step_fallback`` (static): the
    decode FFN only flags a layer whose active neurons exceed its capacity (``decode_fallback``
    in ``stats``) instead of running that layer densely, and the caller reruns the whole step
    densely when any layer flags (:class:`sparsejax.decode.Decoder` does), so the common step
    carries no per-layer branch. ``kernel`` (static): how the sparse FFN reads its rows, a name of
    :data:`sparsejax.decode_ffn.DECODE_KERNELS` (``xla``: gather to ``capacity``; ``cpu``: the C++
    row reader, no capacity). None instead of a ``Decode``: the training forward pass, whose
    graph this class does not touch.
    """

    index: Array
    start_B: Array
    cache_len: int = flax.struct.field(pytree_node=False, default=0)
    ffn: str = flax.struct.field(pytree_node=False, default="")
    capacity: int | tuple[int, ...] = flax.struct.field(pytree_node=False, default=0)
    step_fallback: bool = flax.struct.field(pytree_node=False, default=False)
    kernel: str = flax.struct.field(pytree_node=False, default="xla")

    def layer(self, i: Optional[int]) -> "Decode":
        """Layer i's input (None: the scanned layers', the largest capacity)."""
        if isinstance(self.capacity, int):
            return self
        return self.replace(capacity=max(self.capacity) if i is None else self.capacity[i])


def cached_attention(q_BxTxHxK: Array, k_BxSxGxK: Array, v_BxSxGxK: Array, index: Array,
                     start_B: Array) -> Array:
    """Attention of T new queries (slots ``index …``) over the whole fixed-size cache [B, S]:
    slot s is visible to the query in slot i when ``start_B[b] <= s <= i``. Grouped-query heads
    are read by a [G, H/G] split of the queries (no copy of the cache per query head); float32
    scores and softmax as :func:`causal_attention`."""
    length, dim = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
    groups, slots = k_BxSxGxK.shape[2], k_BxSxGxK.shape[1]
    q_BxTxGxRxK = einops.rearrange(q_BxTxHxK * jnp.asarray(dim ** -0.5, q_BxTxHxK.dtype),
                                   "b t (g r) k -> b t g r k", g=groups)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK,
                        preferred_element_type=jnp.float32)
    slot_S, query_T = jnp.arange(slots), index + jnp.arange(length)
    visible_BxTxS = ((slot_S[None, None, :] <= query_T[None, :, None])
                     & (slot_S[None, None, :] >= start_B[:, None, None]))
    scores = jnp.where(visible_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxK.dtype)
    return einops.rearrange(jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK),
                            "b t g r k -> b t (g r) k")


@register_attention_impl("xla")
def xla_attention(cfg: ModelConfig) -> Callable[[Array, Array, Array], Array]:
    """``model.attention_impl=xla`` (:mod:`sparsejax.attention`): :func:`causal_attention`, with
    grouped-query key/value heads repeated to the query heads given."""
    del cfg  # nothing to configure

    def attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK):
        n_heads = q_BxLxHxK.shape[2]
        return causal_attention(q_BxLxHxK, repeat_kv(k_BxLxGxK, n_heads),
                                repeat_kv(v_BxLxGxK, n_heads))

    return attend


class FeedForward(nn.Module):
    """Owns the FFN weights; the computation is ``FFN_IMPLS[cfg.ffn_impl]``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, sparsity: Optional[Sparsity] = None,
                 decode: Optional[Decode] = None) -> Array:
        cfg = self.cfg
        dtype = _dtype(cfg)
        sp = Sparsity() if sparsity is None else sparsity
        choice("model.ffn_impl", cfg.ffn_impl, ffn_impl_names())  # a model built unvalidated
        stds = mup.init_stds(cfg)
        w_in = lambda name: Kernel((cfg.d_model, cfg.d_ff), ("embed", "mlp"), stds.matrix,  # noqa
                                   dtype, name=name)()
        out_std = stds.branch_out
        weights = FfnWeights(
            w_in_DxF=w_in("w_in"),
            w_gate_DxF=w_in("w_gate") if cfg.ffn_type == "gated" else None,
            w_out_FxD=Kernel((cfg.d_ff, cfg.d_model), ("mlp", "embed"), out_std, dtype,
                             name="w_out")())
        if decode is not None and decode.ffn:  # a decode-time FFN (sparsejax.decode_ffn)
            from sparsejax import decode_ffn  # noqa: PLC0415 - only decoding needs it

            y_BxLxD, aux = decode_ffn.apply(self, cfg, decode, x_BxLxD, weights, sp)
        else:
            y_BxLxD, aux = FFN_IMPLS[cfg.ffn_impl](cfg)(x_BxLxD, weights, sp)
        self.sow("intermediates", "activation", aux.activation_BxLxF)
        self.sow("intermediates", "hidden", aux.hidden_BxLxF)
        if aux.active_count_F is not None:
            self.sow("stats", "active_count_F", aux.active_count_F)
            self.sow("stats", "active_sum", aux.active_sum)
        for name, value in (aux.stats or {}).items():  # sparsity-plan terms (sparsejax.ffn.FfnAux)
            self.sow("stats", name, value)
        return checkpoint_name(y_BxLxD, "ffn_out")


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, rope_sin_cos: tuple[Array, Array],
                 decode: Optional[Decode] = None) -> Array:
        cfg = self.cfg
        dtype = _dtype(cfg)
        stds = mup.init_stds(cfg)

        def proj(name, heads, heads_axis="heads"):
            return Projection((cfg.d_model, heads, cfg.head_dim), ("embed", heads_axis, "kv"),
                              "bld,dhk->blhk", stds.matrix, dtype, name=name)

        # Grouped-query key/value heads get their own logical axis "kv_heads": it has no rule in
        # the default mesh.rules (replicated), since n_kv_heads need not divide the tensor axis.
        kv_axis = "heads" if cfg.kv_heads == cfg.n_heads else "kv_heads"
        q_BxLxHxK = apply_rope(checkpoint_name(proj("query", cfg.n_heads)(x_BxLxD), "query"),
                               rope_sin_cos)
        k_BxLxGxK = apply_rope(checkpoint_name(proj("key", cfg.kv_heads, kv_axis)(x_BxLxD), "key"),
                               rope_sin_cos)
        v_BxLxGxK = checkpoint_name(proj("value", cfg.kv_heads, kv_axis)(x_BxLxD), "value")
        if decode is None:  # model.attention_impl (sparsejax.attention)
            out_BxLxHxK = attention_fn(cfg)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
        else:  # write this call's keys/values into their cache slots, attend over the cache
            shape = (x_BxLxD.shape[0], decode.cache_len, cfg.kv_heads, cfg.head_dim)
            cached = [self.variable("cache", name, jnp.zeros, shape, k_BxLxGxK.dtype)
                      for name in ("cached_key", "cached_value")]
            for var, new in zip(cached, (k_BxLxGxK, v_BxLxGxK)):
                var.value = jax.lax.dynamic_update_slice(
                    var.value, new.astype(var.value.dtype), (0, decode.index, 0, 0))
            out_BxLxHxK = cached_attention(q_BxLxHxK, cached[0].value, cached[1].value,
                                           decode.index, decode.start_B)
        out_BxLxD = Projection((cfg.n_heads, cfg.head_dim, cfg.d_model), ("heads", "kv", "embed"),
                               "blhk,hkd->bld", stds.branch_out, dtype, name="out")(out_BxLxHxK)
        return checkpoint_name(out_BxLxD, "attn_out")


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale_D).astype(self.dtype)


class Block(nn.Module):
    """One pre-norm layer. ``scanned``: return ``(x, None)`` as an ``nn.scan`` body must."""

    cfg: ModelConfig
    scanned: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, rope_sin_cos, sparsity: Sparsity, decode: Optional[Decode] = None):
        cfg = self.cfg
        dtype = _dtype(cfg)
        branch = _scaled(residual_scale(cfg))
        h = RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + branch(Attention(cfg, name="attn")(h, rope_sin_cos, decode))
        h = RMSNorm(cfg.norm_eps, dtype, name="ffn_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + branch(FeedForward(cfg, name="ffn")(h, sparsity, decode))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        return (x_BxLxD, None) if self.scanned else x_BxLxD


# ---------------------------------------------------------------- MiniCPM scalings, output head
def residual_scale(cfg: ModelConfig) -> float:
    """Multiplier of each residual branch: MiniCPM's scale_depth / sqrt(n_layers), else 1."""
    return cfg.scale_depth / cfg.n_layers ** 0.5 if cfg.scale_depth > 0 else 1.0


def logit_scale(cfg: ModelConfig) -> float:
    """Multiplier of the final hidden state before the output projection: MiniCPM's
    dim_model_base / d_model (its ``lm_head(h / (hidden_size / dim_model_base))``), else 1."""
    return cfg.dim_model_base / cfg.d_model if cfg.dim_model_base > 0 else 1.0


def _scaled(scale: float) -> Callable[[Array], Array]:
    """x ↦ x·scale, or the identity at 1 (so default models trace the same graph as before)."""
    if scale == 1.0:
        return lambda x: x
    return lambda x: x * jnp.asarray(scale, x.dtype)


def output_projection(params: PyTree, cfg: ModelConfig) -> Array:
    """The output projection W [D, V] (float32, unboxed): logits = (final hidden × logit_scale) W.
    The embedding table transposed when tied, else the ``unembed`` kernel."""
    params = nn.meta.unbox(params)
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["unembed"]["kernel"]


# ----------------------------------------------------------------------------- remat policies
# MaxText-style names -> the ``jax.checkpoint`` policy of each block ("none": no remat). Tags are
# the ``checkpoint_name``s above: query/key/value/attn_out, ffn_up/ffn_gate/ffn_hidden/ffn_out.
_cp = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "none": None,
    # Save nothing: recompute the whole block in the backward pass (least memory).
    "full": _cp.nothing_saveable,
    # Save every matmul output without batch dimensions (all projections; attention's batched
    # QKᵀ/AV products are recomputed).
    "minimal": _cp.dots_with_no_batch_dims_saveable,
    # Save the attention projections and both block outputs; recompute the three [B, L, F]
    # tensors of the FFN, the largest activations of a 2.5×-wide FFN.
    "save_dots_except_ffn_hidden": _cp.save_only_these_names(
        "query", "key", "value", "attn_out", "ffn_out"),
    # Save only Q, K, V (MaxText "save_qkv_proj").
    "save_qkv_proj": _cp.save_only_these_names("query", "key", "value"),
    # Q, K, V and a fused attention kernel's residuals (its output and log-sum-exp, tagged by
    # sparsejax.attention): the backward pass runs only the kernel's backward, not its forward
    # again. Same as save_qkv_proj for attention_impl=xla (no residuals tagged).
    "save_qkv_attention": _cp.save_only_these_names("query", "key", "value", RESIDUALS_NAME),
}


def remat_policy_names() -> list[str]:
    return list(REMAT_POLICIES)


def check_config(cfg: Config) -> None:
    """The model registries' choices: ``model.rope_type`` and ``model.remat_policy``."""
    choice("model.rope_type", cfg.model.rope_type, rope_type_names())
    choice("model.remat_policy", cfg.model.remat_policy, remat_policy_names())


def _block_class(cfg: ModelConfig):
    choice("model.remat_policy", cfg.remat_policy, remat_policy_names())  # a model built unvalidated
    if cfg.remat_policy == "none":
        return Block
    # prevent_cse only matters outside scan (MaxText: prevent_cse = not scan_layers).
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy],
                    prevent_cse=not cfg.scan_layers)


class OutputHead(NamedTuple):
    """What the logits are made of: ``logit_scale · h_BxLxD @ w`` (float32), ``w`` the output
    projection as stored: [V, D] (``vocab_major``, the tied embedding table) or [D, V]."""

    h_BxLxD: Array
    w: Array
    vocab_major: bool
    logit_scale: float = 1.0


class Transformer(nn.Module):
    """Token ids [B, L] -> logits [B, L, V] (float32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL: Array, positions_BxL: Optional[Array] = None,
                 sparsity: Optional[Sparsity] = None, return_hidden: bool = False,
                 decode: Optional[Decode] = None) -> Array:
        """``sparsity``: what to mask and measure, with per-layer fields on a leading [N] axis
        (:class:`sparsejax.sparsity.Sparsity`); None = the dense model, no statistics.
        ``return_hidden``: an :class:`OutputHead` (final hidden states and output projection)
        instead of logits, for :func:`sparsejax.loss.tiled_next_token_loss`.
        ``decode``: read and write the key/value cache (:class:`Decode`; ``positions_BxL``
        required), as :mod:`sparsejax.decode` does."""
        cfg = self.cfg
        dtype = _dtype(cfg)
        sp = Sparsity() if sparsity is None else sparsity
        rope_sin_cos = rope_tables(positions_BxL, tokens_BxL.shape[1], cfg.head_dim, cfg.rope_theta,
                                   rope_frequencies(cfg))
        stds = mup.init_stds(cfg)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                         embedding_init=_init(stds.embedding, ("vocab", "embed")), name="embed")
        x_BxLxD = _scaled(cfg.scale_emb)(embed(tokens_BxL))
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        block = _block_class(cfg)
        if decode is not None:
            x_BxLxD = _decode_blocks(cfg, x_BxLxD, rope_sin_cos, sp, decode)
        elif cfg.scan_layers:
            scanned = nn.scan(
                block, variable_axes={"params": 0, "intermediates": 0, "stats": 0},
                split_rngs={"params": True}, in_axes=(nn.broadcast, sp.scan_axes()),
                length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: SCAN_NAME})
            x_BxLxD, _ = scanned(cfg, scanned=True, name=SCAN_NAME)(x_BxLxD, rope_sin_cos, sp)
        else:
            for i in range(cfg.n_layers):
                x_BxLxD = block(cfg, name=f"layer_{i}")(x_BxLxD, rope_sin_cos, sp.layer(i))
        x_BxLxD = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x_BxLxD)
        x_BxLxD = _scaled(logit_scale(cfg))(x_BxLxD)  # logits = (h · logit_scale) W
        # ---- output head (``return_hidden``: the final hidden states for the vocabulary-tiled loss) ----
        if return_hidden:
            # The projection at the parameter path of the logits branch below (same init).
            if cfg.tie_embeddings:
                return OutputHead(x_BxLxD, embed.embedding, vocab_major=True)
            w_DxV = Kernel((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), stds.matrix,
                           name=mup.UNEMBED)()
            return OutputHead(x_BxLxD, w_DxV, vocab_major=False)
        # ---- end output head ----
        if cfg.tie_embeddings:
            logits = embed.attend(x_BxLxD)
        else:
            logits = Projection((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), "bld,dv->blv",
                                stds.matrix, dtype, name=mup.UNEMBED)(x_BxLxD)
        return logits.astype(jnp.float32)


def _decode_blocks(cfg: ModelConfig, x_BxLxD, rope_sin_cos, sp: Sparsity, decode: Decode):
    """The blocks of a cached (decoding) pass, in the same parameter layout as training's: no
    remat (nothing is differentiated), the ``cache`` collection stacked like the parameters."""
    if cfg.scan_layers:
        scanned = nn.scan(
            Block, variable_axes={"params": 0, "intermediates": 0, "stats": 0, "cache": 0},
            split_rngs={"params": True}, in_axes=(nn.broadcast, sp.scan_axes(), nn.broadcast),
            length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: SCAN_NAME})
        return scanned(cfg, scanned=True, name=SCAN_NAME)(x_BxLxD, rope_sin_cos, sp,
                                                          decode.layer(None))[0]
    for i in range(cfg.n_layers):
        x_BxLxD = Block(cfg, name=f"layer_{i}")(x_BxLxD, rope_sin_cos, sp.layer(i), decode.layer(i))
    return x_BxLxD


# ------------------------------------------------------------------- per-layer accessors
def _per_layer(tree: dict, n_layers: int) -> list[dict]:
    """Layer subtrees of a params / collection tree, in either layout."""
    if SCAN_NAME in tree:
        stacked = tree[SCAN_NAME]
        return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n_layers)]
    return [tree[f"layer_{i}"] for i in range(n_layers)]


def _sown(value):
    # ``sow`` stores a tuple of the values sown; under scan the stacked tuple has one entry too.
    return value[0] if isinstance(value, tuple) else value


def ffn_intermediates(state: dict, n_layers: int) -> tuple[list[Array], list[Array]]:
    """(activation per layer, hidden per layer) from an ``intermediates`` collection."""
    layers = _per_layer(state["intermediates"], n_layers)
    return ([_sown(layer["ffn"]["activation"]) for layer in layers],
            [_sown(layer["ffn"]["hidden"]) for layer in layers])


def layer_stats(state: dict, n_layers: int) -> tuple[Array, Array]:
    """(active sum per layer [N], active-token count per neuron [N, F]) from a ``stats``
    collection. Ratio of layer l = sum_l / (tokens × d_ff); count 0 = dead in the batch."""
    stats = state["stats"]
    if SCAN_NAME in stats:  # already stacked [N, ...]: no per-layer split needed
        ffn = stats[SCAN_NAME]["ffn"]
        return _sown(ffn["active_sum"]), _sown(ffn["active_count_F"])
    layers = _per_layer(stats, n_layers)
    return (jnp.stack([_sown(layer["ffn"]["active_sum"]) for layer in layers]),
            jnp.stack([_sown(layer["ffn"]["active_count_F"]) for layer in layers]))


def layer_stat(state: dict, n_layers: int, name: str) -> Array:
    """One scalar statistic the FFN blocks sowed into ``stats`` (e.g. ``reg_l1``), per layer [N]."""
    stats = state["stats"]
    if SCAN_NAME in stats:
        return _sown(stats[SCAN_NAME]["ffn"][name])
    return jnp.stack([_sown(layer["ffn"][name]) for layer in _per_layer(stats, n_layers)])


def w_out_per_layer(params: dict, n_layers: int) -> list[Array]:
    """W_out [F, D] of each layer, unboxed from logical-partitioning metadata."""
    return [layer["ffn"]["w_out"]["kernel"] for layer in _per_layer(nn.meta.unbox(params), n_layers)]


def is_scanned(params: dict) -> bool:
    return SCAN_NAME in params


def convert_layout(params: dict, n_layers: int, scan_layers: bool) -> dict:
    """Params (unboxed) in the requested layout: stack ``layer_{i}`` into ``layers`` [N, ...] or
    split it back. Values are unchanged, so a checkpoint of either layout serves either model."""
    if is_scanned(params) == scan_layers:
        return params
    rest = {k: v for k, v in params.items() if k != SCAN_NAME and not k.startswith("layer_")}
    if scan_layers:
        stacked = jax.tree.map(lambda *a: jnp.stack(a),
                               *[params[f"layer_{i}"] for i in range(n_layers)])
        return {**rest, SCAN_NAME: stacked}
    return {**rest, **{f"layer_{i}": layer for i, layer in enumerate(_per_layer(params, n_layers))}}


# ------------------------------------------------------------------------------- the façade
@dataclasses.dataclass(frozen=True)
class Model:
    """What step, sharding and evaluation need from the model, without calling ``nn.*``.

    ``rules``: logical-axis rules (``sharding.rules(cfg.mesh)``) active while tracing ``apply``
    so the model's logical constraints resolve; empty: no constraints (single device).
    """

    cfg: ModelConfig
    rules: tuple = ()

    @property
    def module(self) -> Transformer:
        return Transformer(self.cfg)

    def init_annotated(self, key: Array, seq_len: int) -> PyTree:
        """Parameters with their logical axis names attached (boxed); see :meth:`logical_specs`."""
        return self.module.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]

    def init(self, key: Array, seq_len: int) -> PyTree:
        return self.unbox(self.init_annotated(key, seq_len))

    @staticmethod
    def unbox(tree: PyTree) -> PyTree:
        """Drop the logical-axis annotations (any tree holding annotated leaves, e.g. opt state)."""
        return nn.meta.unbox(tree)

    @staticmethod
    def logical_specs(tree: PyTree) -> PyTree:
        """Logical ``PartitionSpec`` per leaf of an annotated tree (``PartitionSpec()`` for plain
        leaves such as a step counter)."""
        return nn.get_partition_spec(tree)

    def param_specs(self, seq_len: int) -> PyTree:
        """Logical PartitionSpecs of the parameters, without allocating any."""
        return self.logical_specs(jax.eval_shape(lambda k: self.init_annotated(k, seq_len),
                                                 jax.random.key(0)))

    def apply(self, params: PyTree, tokens_BxL: Array, *, sparsity: Optional[Sparsity] = None,
              collect: tuple[str, ...] = (), return_hidden: bool = False) -> tuple[Array, dict]:
        """(logits, collections): ``collect`` names the collections to fill, ``("stats",)`` in
        training, ``("intermediates",)`` for evaluation's full tensors. ``return_hidden``: an
        :class:`OutputHead` instead of the logits (the vocabulary-tiled loss)."""
        kwargs = dict(sparsity=sparsity, return_hidden=return_hidden)
        with nn.logical_axis_rules(self.rules):
            if collect:
                return self.module.apply({"params": params}, tokens_BxL, **kwargs,
                                         mutable=list(collect))
            return self.module.apply({"params": params}, tokens_BxL, **kwargs), {}

    def ffn_intermediates(self, state: dict) -> tuple[list[Array], list[Array]]:
        return ffn_intermediates(state, self.cfg.n_layers)

    def layer_stats(self, state: dict) -> tuple[Array, Array]:
        return layer_stats(state, self.cfg.n_layers)

    def layer_stat(self, state: dict, name: str) -> Array:
        return layer_stat(state, self.cfg.n_layers, name)

    def ffn_out_weights(self, params: PyTree) -> list[Array]:
        return w_out_per_layer(params, self.cfg.n_layers)

    def convert_layout(self, params: PyTree) -> PyTree:
        return convert_layout(params, self.cfg.n_layers, self.cfg.scan_layers)


def abstract_params(cfg: ModelConfig, seq_len: int, plan) -> dict:
    """Parameter shapes, dtypes and shardings (``ShapeDtypeStruct``s) without allocating any,
    sharded by ``plan`` (a :class:`sparsejax.sharding.ShardingPlan`).

    What a reader of checkpoints needs to restore parameters without building an optimizer.
    """
    model = Model(cfg)
    _, abstract = plan.abstract(jax.eval_shape(lambda key: model.init_annotated(key, seq_len),
                                               jax.random.key(0)))
    return abstract
