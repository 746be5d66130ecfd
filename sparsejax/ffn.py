"""The FFN implementations behind ``model.ffn_impl``, and their registry.

An implementation is ``ffn_impl(x, weights, sparsity) -> (y, aux)``: it receives one layer's
weights (:class:`FfnWeights`, owned by :class:`sparsejax.model.FeedForward`) and what to mask and
measure (:class:`sparsejax.sparsity.Sparsity`), and reports the activations and in-block
statistics in :class:`FfnAux`. A factory ``factory(cfg) -> ffn_fn`` registers under a name with
:func:`register_ffn_impl`; ``model.ffn_impl`` picks it, and neither the block nor the transformer
changes. Two ship: ``reference`` (einsum) and ``block_sparse`` (:mod:`sparsejax.kernels`).

Masks: training-time top-k (optionally with the Q-Sparse straight-through estimator) is part of
the forward pass; evaluation masks (per-neuron thresholds, and the masks of :data:`EVAL_MASKS`
named in ``Sparsity.eval_masks``, e.g. the reference's global top-k) apply after the statistics
are taken, so an evaluator can tell "dropped by the mask" from "exactly zero". Both use the one
``sparsity.active`` / ``sparsity.topk_keep`` rule. A new evaluation mask is one
:func:`register_eval_mask` function; a training input without ``eval_masks`` compiles none.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sparsejax import activations, objectives, sparsity as sparsity_lib
from sparsejax.sparsity_plan import SparsityPlan
from sparsejax.config import Config, ConfigError, ModelConfig, choice, positive, term_text
from sparsejax.sparsity import Sparsity

Array = jax.Array

class FfnWeights(NamedTuple):
    """One layer's FFN weights, already in the compute dtype (``w_gate`` None for a plain FFN)."""

    w_in_DxF: Array
    w_gate_DxF: Optional[Array]
    w_out_FxD: Array


class FfnAux(NamedTuple):
    """What an FFN implementation reports besides its output.

    ``activation``/``hidden`` are full [B, L, F] tensors for evaluation; under jit they cost
    nothing unless sown into a mutable ``intermediates`` collection (dead code otherwise).
    ``active_count_F``/``active_sum`` are the in-block statistics (None unless requested).
    ``stats``: further in-block scalars by name (``reg_<name>`` regulariser sums, differentiable;
    ``chunk_active``/``chunks`` chunk statistics), sown into ``stats`` as they are.
    """

    activation_BxLxF: Array
    hidden_BxLxF: Array
    active_count_F: Optional[Array] = None
    active_sum: Optional[Array] = None
    stats: Optional[dict] = None


FfnFn = Callable[[Array, FfnWeights, Sparsity], tuple[Array, FfnAux]]
FFN_IMPLS: dict[str, Callable[[ModelConfig], FfnFn]] = {}
# What an implementation supports beyond the dense forward: ``topk`` (a per-token top-k mask in
# training, sparsity.topk) and ``traced`` (per-step coefficients of the sparsity plan: a scheduled
# top-k k or threshold, in-block regulariser sums). Checked by :func:`check_config`.
FFN_FEATURES: dict[str, frozenset[str]] = {}


def register_ffn_impl(name: str, *, supports: tuple[str, ...] = ("topk", "traced")):
    """Decorator: register ``factory(cfg) -> ffn_fn`` under ``model.ffn_impl=name``, with the
    features it supports (``topk``, ``traced``)."""
    def deco(factory):
        FFN_IMPLS[name] = factory
        FFN_FEATURES[name] = frozenset(supports)
        return factory
    return deco


def ffn_impl_names() -> list[str]:
    return sorted(FFN_IMPLS)


def check_config(cfg: Config) -> None:
    """``model.ffn_impl`` is registered, its tile sizes fit, and it supports what the config asks
    of it (a trained top-k, scheduled sparsity terms); ConfigError naming the field."""
    m = cfg.model
    choice("model.ffn_impl", m.ffn_impl, ffn_impl_names())
    features = FFN_FEATURES[m.ffn_impl]
    if m.ffn_impl == "block_sparse":
        positive("model.ffn_block_t", m.ffn_block_t)
        positive("model.ffn_block_f", m.ffn_block_f)
        if m.d_ff % m.ffn_block_f:
            raise ConfigError(f"model.ffn_block_f={m.ffn_block_f} must divide model.d_ff={m.d_ff} "
                              f"for model.ffn_impl='block_sparse'")
    able = lambda feature: [n for n in ffn_impl_names() if feature in FFN_FEATURES[n]]  # noqa: E731
    plan = SparsityPlan.of(cfg)
    if plan.topk_k and "topk" not in features:
        raise ConfigError(f"{term_text('topk', cfg.sparsity.topk)} must be 0 with "
                          f"model.ffn_impl={m.ffn_impl!r} (a tile mask cannot express a per-token "
                          f"top-k); use one of {able('topk')}")
    if plan.traced and "traced" not in features:
        allowed = able("traced")
        want = repr(allowed[0]) if len(allowed) == 1 else f"one of {allowed}"
        raise ConfigError(f"sparsity.{next(iter(plan.traced))} needs model.ffn_impl={want} (got "
                          f"{m.ffn_impl!r}): the block-sparse kernels take no traced top-k, "
                          f"threshold or penalty")


def _apply_training_topk(activation_BxLxF: Array, hidden_BxLxF: Array, sp: Sparsity) -> Array:
    """The training-time top-k of the plan's input: a static k (``lax.top_k`` or
    ``approx_max_k``) and/or a scheduled k (rank-vs-k, so k changes between steps without
    recompiling), kept by the one ``sparsity.topk_keep`` rule; STE if asked."""
    if not sp.trained_topk:
        return hidden_BxLxF
    score_BxLxF = jnp.abs(activation_BxLxF).astype(jnp.float32)
    keep_BxLxF = jnp.ones_like(score_BxLxF)
    if sp.topk_k:
        keep_BxLxF = sparsity_lib.topk_keep(score_BxLxF, sp.topk_k, approximate=sp.topk_approx,
                                            recall=sp.topk_recall)
    if "topk_k" in sp.coefficients:
        keep_BxLxF = keep_BxLxF * sparsity_lib.topk_keep_traced(score_BxLxF, sp.coefficients["topk_k"])
    keep_BxLxF = jax.lax.stop_gradient(keep_BxLxF).astype(hidden_BxLxF.dtype)
    if sp.topk_ste:
        # Q-Sparse straight-through estimator: forward is masked, backward is dense.
        return hidden_BxLxF + jax.lax.stop_gradient(hidden_BxLxF * keep_BxLxF - hidden_BxLxF)
    return hidden_BxLxF * keep_BxLxF


# Evaluation-time FFN masks by name (``Sparsity.eval_masks``): ``keep(activation_BxLxF,
# hidden_BxLxF, parameter) -> bool [B, L, F]``, the neurons the sparse forward keeps.
EVAL_MASKS: dict[str, Callable[[Array, Array, object], Array]] = {}


def register_eval_mask(name: str):
    """Decorator: register ``keep(activation_BxLxF, hidden_BxLxF, parameter)`` as the evaluation
    mask ``name`` of ``Sparsity.eval_masks`` (its parameter is static: one compile per value)."""
    def deco(keep):
        if name in EVAL_MASKS:
            raise ValueError(f"evaluation mask {name!r} is already registered")
        EVAL_MASKS[name] = keep
        return keep
    return deco


@register_eval_mask("global_topk")
def global_topk_keep(activation_BxLxF: Array, hidden_BxLxF: Array, fraction: float) -> Array:
    """The reference's evaluation top-k (``prune_topk``): the top ``fraction`` of |σ(gate)| over all
    tokens × neurons of this call's batch, per layer."""
    d_ff = activation_BxLxF.shape[-1]
    return sparsity_lib.global_topk_active(activation_BxLxF.reshape(-1, d_ff),
                                           fraction).reshape(activation_BxLxF.shape)


def _apply_eval_masks(activation_BxLxF: Array, hidden_BxLxF: Array, sp: Sparsity) -> Array:
    """Evaluation-time sparse forward: per-neuron thresholds (FAT-ε on |σ(gate)|, CETT on
    |σ(gate)·up|) by the one ``sparsity.active`` rule, then each mask of ``sp.eval_masks``."""
    if sp.thresholds is not None:
        measured = activation_BxLxF if sp.mask_target == "activation" else hidden_BxLxF
        keep = sparsity_lib.active(measured, sp.thresholds)
        hidden_BxLxF = jnp.where(keep, hidden_BxLxF, jnp.zeros_like(hidden_BxLxF))
    for name, parameter in sp.eval_masks:
        if name not in EVAL_MASKS:
            raise ValueError(f"Sparsity.eval_masks names {name!r}; registered evaluation masks: "
                             f"{sorted(EVAL_MASKS)}")
        keep = EVAL_MASKS[name](activation_BxLxF, hidden_BxLxF, parameter)
        hidden_BxLxF = jnp.where(keep, hidden_BxLxF, jnp.zeros_like(hidden_BxLxF))
    return hidden_BxLxF


def _aux(activation_BxLxF, hidden_BxLxF, sp: Sparsity) -> FfnAux:
    if not sp.wants_stats:
        return FfnAux(activation_BxLxF, hidden_BxLxF)
    count_F, total = sparsity_lib.layer_stats(activation_BxLxF, hidden_BxLxF, sp)
    stats = {}
    for name in sp.regularisers:
        # Reduced here, so the objective's terms never need a [B, L, F] tensor out of the block.
        stats[f"reg_{name}"] = objectives.REGULARISERS[name].layer_sum(
            activation_BxLxF, sp.stats_weights_BxL, sp.chunk_len, sp.chunk_tau)
    if sp.chunk_len:
        mask = sparsity_lib.active(activation_BxLxF, sp.stats_threshold,
                                   sparsity_lib.trained_keep(hidden_BxLxF, sp.trained_topk))
        stats["chunk_active"], stats["chunks"] = sparsity_lib.chunk_stats(
            mask, sp.stats_weights_BxL, sp.chunk_len)
    return FfnAux(activation_BxLxF, hidden_BxLxF, count_F, total, stats or None)


def _activation_fn(cfg: ModelConfig, sp: Sparsity):
    """σ with the plan's threshold: the scheduled one when ``sp`` carries it, else the static."""
    threshold = sp.coefficients.get("activation_threshold", sp.threshold)
    return activations.make(cfg.activation, threshold=threshold, alpha=cfg.activation_alpha)


@register_ffn_impl("reference")
def reference_ffn(cfg: ModelConfig) -> FfnFn:
    """The einsum FFN: ``W_out[σ(W_gate x) ⊙ W_in x]`` or ``W_out σ(W_in x)``, training top-k,
    evaluation masks (docs/sparsity_metrics_and_laws.md §Activation ratio)."""
    spec = activations.get(cfg.activation)

    def ffn(x_BxLxD, w: FfnWeights, sp: Sparsity):
        act_fn = _activation_fn(cfg, sp)
        x_BxLxD = x_BxLxD.astype(w.w_in_DxF.dtype)
        up_BxLxF = checkpoint_name(jnp.einsum("bld,df->blf", x_BxLxD, w.w_in_DxF), "ffn_up")
        if w.w_gate_DxF is not None:
            gate_BxLxF = checkpoint_name(jnp.einsum("bld,df->blf", x_BxLxD, w.w_gate_DxF), "ffn_gate")
            activation_BxLxF = act_fn(gate_BxLxF)
            if spec.gate_and_up:
                up_BxLxF = act_fn(up_BxLxF)
            hidden_BxLxF = activation_BxLxF * up_BxLxF
        else:
            activation_BxLxF = act_fn(up_BxLxF)
            hidden_BxLxF = activation_BxLxF
        hidden_BxLxF = _apply_training_topk(activation_BxLxF, hidden_BxLxF, sp)
        # Reported before the evaluation mask, so an evaluator can tell "dropped by the mask" from
        # "exactly zero" (docs/sparsity_metrics_and_laws.md §Reference procedure).
        aux = _aux(activation_BxLxF, hidden_BxLxF, sp)
        hidden_BxLxF = _apply_eval_masks(activation_BxLxF, hidden_BxLxF, sp)
        hidden_BxLxF = nn.with_logical_constraint(hidden_BxLxF, ("batch", "length", "mlp"))
        hidden_BxLxF = checkpoint_name(hidden_BxLxF, "ffn_hidden")
        return jnp.einsum("blf,fd->bld", hidden_BxLxF, w.w_out_FxD), aux

    return ffn


@register_ffn_impl("block_sparse", supports=())
def block_sparse_ffn(cfg: ModelConfig) -> FfnFn:
    """The (token block × neuron block) tile FFN of :mod:`sparsejax.kernels`.

    The tile mask comes from σ(gate) by the zero rule, so for the ReLU family the output *is* the
    dense FFN (skipped tiles are exactly zero); the kernel choice (TPU Mosaic, GPU Triton, or the
    pure-JAX reference on CPU) is ``kernels.pick_impl("auto")``'s. σ(gate) is computed once here,
    densely and outside the gradient, for the mask and the statistics (the kernels would compute
    it for their mask anyway). Evaluation masks are element-wise, which a tile mask cannot
    express: passes with thresholds or ``eval_masks`` run the reference FFN on the same weights.
    Training-time top-k is refused by config validation for the same reason. Under a
    multi-device mesh it runs per shard in ``shard_map`` (:mod:`sparsejax.kernels.sharded`).
    """
    from sparsejax import kernels  # noqa: PLC0415 - Pallas imports only when this impl is chosen

    spec = activations.get(cfg.activation)
    reference = reference_ffn(cfg)
    block_t, block_f = cfg.ffn_block_t, cfg.ffn_block_f

    def ffn(x_BxLxD, w: FfnWeights, sp: Sparsity):
        if sp.thresholds is not None or sp.eval_masks:
            return reference(x_BxLxD, w, sp)
        act_fn = _activation_fn(cfg, sp)  # a static threshold only: the config refuses traced ones
        x_BxLxD = x_BxLxD.astype(w.w_in_DxF.dtype)
        src_DxF = w.w_in_DxF if w.w_gate_DxF is None else w.w_gate_DxF
        activation_BxLxF = act_fn(jnp.einsum("bld,df->blf", x_BxLxD, src_DxF))
        # Under a multi-device mesh the mask and kernel run per shard inside shard_map (a Pallas
        # kernel is opaque to GSPMD); its specs are the hidden activations' logical shardings
        # resolved by the active rules, so the mesh axes live in mesh.rules only.
        y_BxLxD = kernels.sharded.block_sparse_ffn(
            x_BxLxD, jax.lax.stop_gradient(activation_BxLxF), w.w_in_DxF, w.w_gate_DxF,
            w.w_out_FxD, act_fn, hidden_spec=nn.logical_to_mesh_axes(("batch", "length", "mlp")),
            block_t=block_t, block_f=block_f, gate_and_up=spec.gate_and_up, impl="auto")
        # hidden only for evaluators that sow it (dead code in training: no top-k here).
        if w.w_gate_DxF is None:
            hidden_BxLxF = activation_BxLxF
        else:
            up_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w.w_in_DxF)
            hidden_BxLxF = activation_BxLxF * (act_fn(up_BxLxF) if spec.gate_and_up else up_BxLxF)
        return y_BxLxD, _aux(activation_BxLxF, hidden_BxLxF, sp)

    return ffn
