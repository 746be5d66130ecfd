"""The train and eval steps: top-level ``loss_fn``, ``train_step``, ``eval_step``, and the one
place that jits them with their shardings (:func:`make_step_functions`).

The training state is a plain pytree ``{"params", "opt_state", "step"}``. Every sharding comes
from one :class:`sparsejax.sharding.ShardingPlan` (parameters and optimizer moments by their
logical axis names, batches by the ``batch`` rule), so ``jax.jit`` with ``in_shardings`` /
``out_shardings`` runs the same step on one CPU, 8 fake CPU devices or a pod, and the trainer
feeds batches sharded exactly as the step was compiled for (``StepFunctions.plan``).

The three step functions are pure functions of a static :class:`StepSetup` (model, optimizer,
sharding plan, sparsity plan) and arrays, as in nanodo and MaxText; :func:`make_step_functions` binds
the setup and adds the jit/sharding wrapper.

Activation statistics (docs/sparsity_metrics_and_laws.md §Activation ratio) are reduced inside
each block (``sparsity.layer_stats``) to a count of tokens per neuron and its sum, so nothing of
size [tokens × d_ff] leaves a layer; the step turns them into ``[n_layers]`` ratios. A neuron is
active for a token by the one rule of :func:`sparsejax.sparsity.active`: σ(gate) ≠ 0 (ReLU
family, exact zeros) or |σ(gate)| ≥ ``sparsity.fat_eps`` + 1e-18 (other activations: FAT-ε), and,
under top-k, kept by the mask — the evaluator's *zero* and FAT-ε criteria, tested equal.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sparsejax import model as model_lib, objectives, sharding
from sparsejax.sparsity_plan import METRIC_NAMES, SparsityPlan
from sparsejax.config import Config
from sparsejax.loss import model_loss

PyTree = Any
# Regulariser -> its metric (the LM loss keeps the name ``loss``; docs/recipes.md §Metrics).
REGULARISER_METRICS = {name: r.metric for name, r in objectives.REGULARISERS.items()}
# Every metric the sparsity plan adds to the step's (trainer.py writes those present).
SPARSITY_METRICS = ("objective", *REGULARISER_METRICS.values(), *METRIC_NAMES.values(),
                  "train_chunk_sparsity")


def all_finite(*trees) -> jax.Array:
    """One boolean: every floating-point leaf of ``trees`` is finite (a cheap in-graph check)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)
             if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.all(jnp.stack(flags))


# ------------------------------------------------------------------------------- the setup
@dataclasses.dataclass(frozen=True)
class StepSetup:
    """What the step functions need besides arrays; static for one (config, mesh).

    ``log_activations``: report the per-layer activation ratios (statistics are also collected,
    unreported, when a regulariser of the sparsity plan needs the token weights inside the blocks).
    """

    model: model_lib.Model
    tx: optax.GradientTransformation
    plan: sharding.ShardingPlan
    sparsity: SparsityPlan
    log_activations: bool
    grad_accum: int
    loss_tile_len: int
    fault_nan_at_step: int

    @classmethod
    def of(cls, cfg: Config, plan: sharding.ShardingPlan, tx: optax.GradientTransformation, *,
           log_activations: bool = True) -> "StepSetup":
        return cls(model=model_lib.Model(cfg.model, sharding.rules(cfg.mesh)), tx=tx, plan=plan,
                   sparsity=SparsityPlan.of(cfg), log_activations=log_activations, grad_accum=cfg.train.grad_accum,
                   loss_tile_len=cfg.train.loss_tile_len,
                   fault_nan_at_step=cfg.train.fault_nan_at_step)

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_ff(self) -> int:
        return self.model.cfg.d_ff

    @property
    def stats_on(self) -> bool:
        # Regularisers are reduced over the token weights inside the blocks, so they need them.
        return self.log_activations or bool(self.sparsity.regularisers)

    def init_annotated(self, key: jax.Array, seq_len: int) -> PyTree:
        """A fresh state whose parameters (and moments) carry their logical axis names."""
        params = self.model.init_annotated(key, seq_len)
        return {"params": params, "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32)}


# --------------------------------------------------------------------------- step functions
def loss_fn(setup: StepSetup, params: PyTree, batch: dict, coefs: Optional[dict] = None,
            scales: Optional[dict] = None) -> tuple[jax.Array, dict]:
    """(objective sum, aux) of one batch: the objective is ``Σ_tokens LM loss + Σ_r λ_r · scale_r
    · R_r`` (R_r: regulariser r's sum over tokens and layers); dividing it by the batch's token
    count gives the per-token objective. ``scale_r`` = tokens / (r's own count), known for the
    whole batch up front (it depends on the token weights only), so that micro-batch sums add up
    exactly under gradient accumulation. Without traced terms (``coefs`` None) it is the LM
    loss sum.
    """
    model, plan = setup.model, setup.sparsity
    collected = None
    if setup.stats_on:
        sp = plan.model_input(coefs, stats_weights_BxL=batch["weights"])
        mean_loss, tokens, collected = model_loss(model, params, batch, sparsity=sp,
                                                  collect=("stats",),
                                                  loss_tile_len=setup.loss_tile_len)
        act_sum_N, count_NxF = model.layer_stats(collected)
    else:
        mean_loss, tokens, _ = model_loss(model, params, batch, sparsity=plan.model_input(coefs),
                                          loss_tile_len=setup.loss_tile_len)
        act_sum_N, count_NxF = jnp.zeros(setup.n_layers), jnp.zeros((setup.n_layers, setup.d_ff))
    loss_sum = mean_loss * tokens
    aux = {"tokens": tokens, "act_sum_N": act_sum_N, "count_NxF": count_NxF}
    if not plan.active:
        return loss_sum, aux
    objective = loss_sum
    aux["loss_sum"] = loss_sum
    for name in plan.regularisers:
        total = jnp.sum(model.layer_stat(collected, f"reg_{name}"))
        aux[f"reg_{name}"] = total
        objective = objective + coefs[name] * scales[name] * total
    if plan.stats_chunk_len and collected is not None:
        aux["chunk_active"] = jnp.sum(model.layer_stat(collected, "chunk_active"))
        aux["chunks"] = jnp.sum(model.layer_stat(collected, "chunks"))
    return objective, aux


def _gradients(setup: StepSetup, params: PyTree, batch: dict, coefs, scales):
    """((objective sum, aux sums), gradient sum) over the batch, in ``grad_accum`` micro-batches."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, setup), has_aux=True)
    accum = setup.grad_accum
    if accum == 1:
        # No accumulation loop: a one-trip scan still costs a zero-filled gradient buffer and
        # an add per parameter, and keeps XLA from fusing across the loop boundary.
        return grad_fn(params, batch, coefs, scales)
    # Micro-batch j takes rows j, j + accum, ...: every micro-batch spans all batch shards.
    micro = jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
            setup.plan.micro_batch), batch)

    def accumulate(carry, mb):
        (objective_sum, aux), grads = grad_fn(params, mb, coefs, scales)
        g_acc, o_acc, aux_acc = carry
        return (jax.tree.map(jnp.add, g_acc, grads), o_acc + objective_sum,
                jax.tree.map(jnp.add, aux_acc, aux)), None

    aux_shape = jax.eval_shape(lambda mb: loss_fn(setup, params, mb, coefs, scales)[1],
                               jax.tree.map(lambda x: x[0], micro))
    zeros = (jax.tree.map(jnp.zeros_like, params), 0.0,
             jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape))
    (grad_sum, objective_sum, aux), _ = jax.lax.scan(accumulate, zeros, micro)
    return (objective_sum, aux), grad_sum


def train_step(setup: StepSetup, state: PyTree, batch: dict) -> tuple[PyTree, dict]:
    """One optimizer step on ``batch``: (new state, metrics)."""
    plan, params = setup.sparsity, state["params"]
    coefs, scales, counts = None, None, {}
    if plan.active:
        # Step t (1-based) trains with the schedules' values at t: in-graph, from the state.
        coefs = plan.coefficients(state["step"] + 1)
        counts = {name: objectives.REGULARISERS[name].count(batch["weights"], plan.chunk_len)
                  for name in plan.regularisers}
        all_tokens = jnp.maximum(objectives.token_count(batch["weights"]), 1.0)
        scales = {name: all_tokens / jnp.maximum(c, 1.0) for name, c in counts.items()}
    (objective_sum, aux), grad_sum = _gradients(setup, params, batch, coefs, scales)
    tokens, act_sum_N, count_NxF = aux["tokens"], aux["act_sum_N"], aux["count_NxF"]
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    if setup.fault_nan_at_step:
        # Only the gradients: the loss of the step stays finite, as in a real divergence
        # where the parameters break one step before the loss shows it.
        poison = jnp.where(state["step"] + 1 == setup.fault_nan_at_step, jnp.nan, 1.0)
        grads = jax.tree.map(lambda g: g * poison, grads)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    # ``loss`` is the LM loss alone, with or without sparsity terms (comparable across runs).
    loss_sum = aux["loss_sum"] if plan.active else objective_sum
    loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens,
               # A checkpoint is written only after steps whose flag is true (trainer.py).
               "finite": all_finite(loss, grad_norm, new_params)}
    if plan.active:
        metrics.update(sparsity_metrics(setup, coefs, counts, aux, objective_sum / denom))
    if setup.log_activations:
        ratio_N = act_sum_N / (denom * setup.d_ff)
        metrics.update(activation_ratio_layers=ratio_N, activation_ratio=jnp.mean(ratio_N),
                       dead_in_batch_layers=jnp.mean(count_NxF == 0, axis=1))
    return new_state, metrics


def sparsity_metrics(setup: StepSetup, coefs: dict, counts: dict, aux: dict, objective) -> dict:
    """The objective, each regulariser per its own count (``l1``: per token, summed over neurons
    and layers; ``chunk_loss``: per chunk token, summed over layers), each term's current value,
    and the training chunk sparsity (this batch, sparsity.chunk_len, the statistics' active rule)."""
    out = {"objective": objective}
    for name in setup.sparsity.regularisers:
        out[REGULARISER_METRICS[name]] = aux[f"reg_{name}"] / jnp.maximum(counts[name], 1.0)
    for field, value in coefs.items():
        out[METRIC_NAMES[field]] = value
    if "chunk_active" in aux:
        out["train_chunk_sparsity"] = 1.0 - aux["chunk_active"] / jnp.maximum(
            aux["chunks"] * setup.d_ff, 1.0)
    return out


def eval_step(setup: StepSetup, state: PyTree, batch: dict) -> dict:
    """LM loss sum, token count and per-layer active sums of one validation batch."""
    plan = setup.sparsity
    # The model as trained at its last step: the traced terms' values at that step.
    coefs = plan.coefficients(state["step"]) if plan.active else None
    scales = ({name: jnp.float32(0.0) for name in plan.regularisers}
              if plan.active else None)  # evaluation reports the LM loss alone
    objective_sum, aux = loss_fn(setup, state["params"], batch, coefs, scales)
    loss_sum = aux.get("loss_sum", objective_sum)
    return {"loss_sum": loss_sum, "tokens": aux["tokens"], "act_sum_layers": aux["act_sum_N"]}


# ------------------------------------------------------------------ the jit/sharding wrapper
@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """Compiled entry points and the state's shardings for one (config, mesh)."""

    init: Callable[[jax.Array], PyTree]
    train: Callable[[PyTree, dict], tuple[PyTree, dict]]
    evaluate: Callable[[PyTree, dict], dict]
    state_shardings: PyTree
    abstract_state: PyTree
    plan: sharding.ShardingPlan

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.plan.mesh


def make_step_functions(cfg: Config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation,
                        *, log_activations: bool = True) -> StepFunctions:
    """Bind ``cfg``'s :class:`StepSetup` to the step functions and jit them with the shardings of
    its :class:`~sparsejax.sharding.ShardingPlan` (state donated to the train step)."""
    plan = sharding.ShardingPlan(mesh, cfg.mesh)
    setup = StepSetup.of(cfg, plan, tx, log_activations=log_activations)
    seq_len = cfg.train.seq_len
    # No mesh context for init: Flax would constrain DenseGeneral kernels in their flat init shape.
    state_shardings, abstract_state = plan.abstract(
        jax.eval_shape(lambda key: setup.init_annotated(key, seq_len), jax.random.key(0)))

    def traced(fn):
        # Logical constraints inside the model resolve against this mesh (the model's rules are
        # entered by Model.apply).
        def wrapper(*args):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(setup, *args)
        return wrapper

    init = jax.jit(lambda key: setup.model.unbox(setup.init_annotated(key, seq_len)),
                   out_shardings=state_shardings)
    train = jax.jit(traced(train_step), in_shardings=(state_shardings, plan.batch),
                    out_shardings=(state_shardings, plan.replicated), donate_argnums=(0,))
    evaluate = jax.jit(traced(eval_step), in_shardings=(state_shardings, plan.batch),
                       out_shardings=plan.replicated)
    return StepFunctions(init, train, evaluate, state_shardings, abstract_state, plan)
