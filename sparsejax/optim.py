"""AdamW with the Sparsing Law paper's warmup-stable-decay (WSD) schedule, or cosine / constant.

WSD (Hu et al. 2024, MiniCPM; used by the Sparsing Law paper, docs/sparsity_metrics_and_laws.md
§Paper models): linear warm-up to the peak, constant, then a decay over the last
``decay_fraction`` of the steps to ``min_lr_ratio × peak``. Departure: MiniCPM decays
exponentially; sparsejax decays linearly, so a WSD run's learning rate is piecewise linear and easy
to reason about.
"""

from __future__ import annotations


import optax

from sparsejax import mup
from sparsejax.config import Config, TrainConfig


def learning_rate_schedule(t: TrainConfig) -> optax.Schedule:
    peak, floor = t.learning_rate, t.learning_rate * t.min_lr_ratio
    warmup = min(t.warmup_steps, t.steps)
    if t.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(t.steps, warmup + 1),
                                                  end_value=floor)
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if t.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
    decay_steps = int(round(t.decay_fraction * t.steps))
    stable_steps = max(t.steps - warmup - decay_steps, 0)
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), optax.linear_schedule(peak, floor, max(decay_steps, 1))],
        [warmup, warmup + stable_steps])


def make_optimizer(cfg: Config | TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (weight decay on matrices and embeddings, not on norm
    scales), then the per-class learning-rate multipliers of µP (:func:`sparsejax.mup.lr_multipliers`:
    weight matrices' updates × dim_model_base / d_model when ``model.mup`` is on; nothing is added
    to the chain otherwise, so a standard-parameterisation run's optimizer state is unchanged).

    A :class:`TrainConfig` alone (no model section, so no µP) builds the standard-parameterisation
    optimizer: the form the peer benchmarks call with ``cfg.train``."""
    if isinstance(cfg, TrainConfig):
        cfg = Config(train=cfg)
    t = cfg.train
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    chain.append(optax.adamw(learning_rate_schedule(t), b1=t.b1, b2=t.b2,
                             weight_decay=t.weight_decay, mask=mup.decayed))
    multipliers = mup.lr_multipliers(cfg.model)
    if any(v != 1.0 for v in multipliers.values()):
        # Scaling AdamW's whole update scales its decoupled weight decay too, as a per-group
        # learning rate does in PyTorch (the reference implementation's parameter groups).
        chain.append(optax.multi_transform(
            {name: optax.scale(value) for name, value in multipliers.items()}, mup.classes))
    return optax.chain(*chain)
