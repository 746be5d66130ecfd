"""Sharded, jitted train and eval steps with in-graph activation-ratio statistics.

The training state is a plain pytree ``{"params", "opt_state", "step"}``. Its shardings come from
the parameters' logical axis names (optimizer moments inherit them), so ``jax.jit`` with
``in_shardings``/``out_shardings`` runs the same step on one CPU, 8 fake CPU devices or a pod.

Activation statistics (docs/sparsity_metrics_and_laws.md §Activation ratio) are reduced inside
each block (``sparsity.layer_stats``) to a count of tokens per neuron and its sum, so nothing of
size [tokens × d_ff] leaves a layer; the step turns them into ``[n_layers]`` ratios. A neuron is
active for a token by the one rule of :func:`sparsejax.sparsity.active`: σ(gate) ≠ 0 (ReLU
family, exact zeros) or |σ(gate)| ≥ ``train.fat_eps`` + 1e-18 (other activations: FAT-ε), and,
under top-k, kept by the mask — the evaluator's *zero* and FAT-ε criteria, tested equal.

The model is reached through :class:`sparsejax.model.Model` only; batch shardings come from the
``batch`` logical rule (``sharding.batch_spec``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from sparsejax import (activations, model as model_lib, objectives, recipes, sharding,
                       sparsity as sparsity_lib)
from sparsejax.config import Config
from sparsejax.loss import model_loss

PyTree = Any
# Regulariser -> its metric (the LM loss keeps the name ``loss``; docs/recipes.md §Metrics).
REGULARISER_METRICS = {"l1": "l1", "chunk": "chunk_loss"}
# Every metric a recipe adds to the step's (trainer.py writes those present).
RECIPE_METRICS = ("objective", *REGULARISER_METRICS.values(), *recipes.METRIC_NAMES.values(),
                  "train_chunk_sparsity")


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """Compiled entry points and the state's shardings for one (config, mesh)."""

    init: Callable[[jax.Array], PyTree]
    train: Callable[[PyTree, dict], tuple[PyTree, dict]]
    evaluate: Callable[[PyTree, dict], dict]
    state_shardings: PyTree
    abstract_state: PyTree
    mesh: jax.sharding.Mesh


def stats_threshold(exact_zeros: bool, fat_eps: float):
    """The training statistics' rule for ``sparsity.active``: zero (None) or FAT-ε."""
    return None if exact_zeros else sparsity_lib.fat_threshold(fat_eps)


def active_mask(activation_BxLxF: jax.Array, hidden_BxLxF: jax.Array, *, exact_zeros: bool,
                fat_eps: float, topk: bool) -> jax.Array:
    """Which neurons count as active for each token (see module docstring)."""
    return sparsity_lib.active(activation_BxLxF, stats_threshold(exact_zeros, fat_eps),
                               sparsity_lib.trained_keep(hidden_BxLxF, topk))


def all_finite(*trees) -> jax.Array:
    """One boolean: every floating-point leaf of ``trees`` is finite (a cheap in-graph check)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)
             if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.all(jnp.stack(flags))


def make_step_functions(cfg: Config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation,
                        *, log_activations: bool = True) -> StepFunctions:
    model = model_lib.Model(cfg.model, sharding.rules(cfg.mesh))
    spec = activations.get(cfg.model.activation)
    n_layers, d_ff, accum = cfg.model.n_layers, cfg.model.d_ff, cfg.train.grad_accum
    threshold = stats_threshold(spec.exact_zeros, cfg.train.fat_eps)
    tile_len = cfg.train.loss_tile_len

    def init_annotated(key):
        params = model.init_annotated(key, cfg.train.seq_len)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    # No mesh context for init: Flax would constrain DenseGeneral kernels in their flat init shape.
    abstract_annotated = jax.eval_shape(init_annotated, jax.random.key(0))
    specs = model.logical_specs(abstract_annotated)
    abstract_plain = model.unbox(abstract_annotated)
    sharding.check_divisible(abstract_plain, specs, mesh, cfg.mesh)
    state_shardings = sharding.logical_shardings(specs, mesh, cfg.mesh)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_plain,
        state_shardings)

    # The training-time sparsity recipe (docs/recipes.md). With none configured every branch
    # below is skipped at trace time and the step is exactly the plain LM step.
    recipe = recipes.of(cfg)
    # Regularisers are reduced over the token weights inside the blocks, so they need them.
    stats_on = log_activations or bool(recipe.regularisers)
    chunk_len = recipe.chunk_len if recipe.active else 0

    def loss_and_stats(params, batch, coefs=None, scales=None):
        """(objective sum, aux): the objective is ``Σ_tokens LM loss + Σ_r λ_r · scale_r · R_r``
        (R_r: regulariser r's sum over tokens and layers); dividing it by the batch's token count
        gives the per-token objective. ``scale_r`` = tokens / (r's own count), known for the
        whole batch up front (it depends on the token weights only), so that micro-batch sums
        add up exactly under gradient accumulation."""
        model_coefs = recipes.model_coefficients(recipe, coefs) if recipe.active else {}
        collected = None
        if stats_on:
            sp = sparsity_lib.Sparsity(
                stats_weights_BxL=batch["weights"], stats_threshold=threshold,
                coefficients=model_coefs, regularisers=recipe.regularisers, chunk_len=chunk_len,
                chunk_tau=recipe.chunk_tau)
            mean_loss, tokens, collected = model_loss(model, params, batch, sparsity=sp,
                                                      collect=("stats",), loss_tile_len=tile_len)
            act_sum_N, count_NxF = model.layer_stats(collected)
        else:
            sp = sparsity_lib.Sparsity(coefficients=model_coefs) if model_coefs else None
            mean_loss, tokens, _ = model_loss(model, params, batch, sparsity=sp,
                                              loss_tile_len=tile_len)
            act_sum_N, count_NxF = jnp.zeros(n_layers), jnp.zeros((n_layers, d_ff))
        loss_sum = mean_loss * tokens
        aux = {"tokens": tokens, "act_sum_N": act_sum_N, "count_NxF": count_NxF}
        if not recipe.active:
            return loss_sum, aux
        objective = loss_sum
        aux["loss_sum"] = loss_sum
        for name in recipe.regularisers:
            total = jnp.sum(model.layer_stat(collected, f"reg_{name}"))
            aux[f"reg_{name}"] = total
            objective = objective + coefs[name] * scales[name] * total
        if chunk_len and collected is not None:
            aux["chunk_active"] = jnp.sum(model.layer_stat(collected, "chunk_active"))
            aux["chunks"] = jnp.sum(model.layer_stat(collected, "chunks"))
        return objective, aux

    grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)

    micro_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(cfg.mesh, leading=1))

    def regulariser_counts(weights_BxL):
        """Each regulariser's divisor over the whole batch, from the token weights alone."""
        return {name: objectives.REGULARISERS[name].count(weights_BxL, recipe.chunk_len)
                for name in recipe.regularisers}

    def train_step(state, batch):
        params = state["params"]
        coefs, scales, counts = None, None, {}
        if recipe.active:
            # Step t (1-based) trains with the schedules' values at t: in-graph, from the state.
            coefs = recipes.coefficients(recipe, state["step"] + 1)
            counts = regulariser_counts(batch["weights"])
            all_tokens = jnp.maximum(objectives.token_count(batch["weights"]), 1.0)
            scales = {name: all_tokens / jnp.maximum(c, 1.0) for name, c in counts.items()}
        if accum == 1:
            # No accumulation loop: a one-trip scan still costs a zero-filled gradient buffer and
            # an add per parameter, and keeps XLA from fusing across the loop boundary.
            (objective_sum, aux), grad_sum = grad_fn(params, batch, coefs, scales)
        else:
            # Micro-batch j takes rows j, j + accum, ...: every micro-batch spans all batch shards.
            micro = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                    micro_sharding), batch)

            def accumulate(carry, mb):
                (objective_sum, aux), grads = grad_fn(params, mb, coefs, scales)
                g_acc, o_acc, aux_acc = carry
                return (jax.tree.map(jnp.add, g_acc, grads), o_acc + objective_sum,
                        jax.tree.map(jnp.add, aux_acc, aux)), None

            aux_shape = jax.eval_shape(lambda mb: loss_and_stats(params, mb, coefs, scales)[1],
                                       jax.tree.map(lambda x: x[0], micro))
            zeros = (jax.tree.map(jnp.zeros_like, params), 0.0,
                     jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape))
            (grad_sum, objective_sum, aux), _ = jax.lax.scan(accumulate, zeros, micro)
        tokens, act_sum_N, count_NxF = aux["tokens"], aux["act_sum_N"], aux["count_NxF"]
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        if cfg.train.fault_nan_at_step:
            # Only the gradients: the loss of the step stays finite, as in a real divergence
            # where the parameters break one step before the loss shows it.
            poison = jnp.where(state["step"] + 1 == cfg.train.fault_nan_at_step, jnp.nan, 1.0)
            grads = jax.tree.map(lambda g: g * poison, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        # ``loss`` is the LM loss alone, with or without a recipe (comparable across runs).
        loss_sum = aux["loss_sum"] if recipe.active else objective_sum
        loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens,
                   # A checkpoint is written only after steps whose flag is true (trainer.py).
                   "finite": all_finite(loss, grad_norm, new_params)}
        if recipe.active:
            metrics.update(recipe_metrics(coefs, counts, aux, objective_sum / denom))
        if log_activations:
            ratio_N = act_sum_N / (denom * d_ff)
            metrics.update(activation_ratio_layers=ratio_N, activation_ratio=jnp.mean(ratio_N),
                           dead_in_batch_layers=jnp.mean(count_NxF == 0, axis=1))
        return new_state, metrics

    def recipe_metrics(coefs, counts, aux, objective):
        """The objective, each regulariser per its own count (``l1``: per token, summed over
        neurons and layers; ``chunk_loss``: per chunk token, summed over layers), each term's
        current value, and the training chunk sparsity (this batch, recipe.chunk_len, the
        statistics' active rule)."""
        out = {"objective": objective}
        for name in recipe.regularisers:
            out[REGULARISER_METRICS[name]] = aux[f"reg_{name}"] / jnp.maximum(counts[name], 1.0)
        for field, value in coefs.items():
            out[recipes.METRIC_NAMES[field]] = value
        if "chunk_active" in aux:
            out["train_chunk_sparsity"] = 1.0 - aux["chunk_active"] / jnp.maximum(
                aux["chunks"] * d_ff, 1.0)
        return out

    def eval_step(state, batch):
        # The model as trained at its last step: the recipe's values at that step.
        coefs = recipes.coefficients(recipe, state["step"]) if recipe.active else None
        scales = ({name: jnp.float32(0.0) for name in recipe.regularisers}
                  if recipe.active else None)  # evaluation reports the LM loss alone
        objective_sum, aux = loss_and_stats(state["params"], batch, coefs, scales)
        loss_sum = aux.get("loss_sum", objective_sum)
        return {"loss_sum": loss_sum, "tokens": aux["tokens"], "act_sum_layers": aux["act_sum_N"]}

    batch_shard = sharding.batch_sharding(mesh, cfg.mesh)
    rep = sharding.replicated(mesh)

    def traced(fn):
        # Logical constraints inside the model resolve against this mesh (the model's rules are
        # entered by Model.apply).
        def wrapper(*args):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args)
        return wrapper

    init = jax.jit(lambda key: model.unbox(init_annotated(key)), out_shardings=state_shardings)
    train = jax.jit(traced(train_step), in_shardings=(state_shardings, batch_shard),
                    out_shardings=(state_shardings, rep), donate_argnums=(0,))
    evaluate = jax.jit(traced(eval_step), in_shardings=(state_shardings, batch_shard), out_shardings=rep)
    return StepFunctions(init, train, evaluate, state_shardings, abstract_state, mesh)
