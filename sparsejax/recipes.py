"""A config's training-time sparsity recipe, as the train step uses it (docs/recipes.md).

The ``recipe`` config section holds one schedule per term (:class:`sparsejax.config.RecipeConfig`).
This module turns it into what the step needs:

* which terms are on (:class:`Recipe`, static: decides what is compiled);
* their values at a step, computed in-graph from the step counter (:func:`coefficients`), so a
  stage change never recompiles and a resumed run continues exactly: the step is part of the
  train state, the schedule part of the config;
* the model's share of them, broadcast per layer into ``Sparsity.coefficients``
  (:func:`model_coefficients`): a traced top-k ``k`` and activation ``threshold``;
* the regularisers the FFN blocks reduce and their weights in the objective.

Step convention: training step t (1-based, the step being trained) uses the schedules at t;
a model *after* t steps (evaluation, a checkpoint of step t) is used with the values at t too.
"""

from __future__ import annotations

import dataclasses

from sparsejax import schedules, sparsity as sparsity_lib
from sparsejax.config import Config
from sparsejax.schedules import Schedule

# Recipe field -> the objectives.REGULARISERS entry whose weight it schedules.
PENALTIES = {"l1": "l1", "chunk": "chunk"}
# Recipe field -> the Sparsity coefficient the FFN reads (a traced scalar per layer).
MODEL_COEFFICIENTS = {"topk": "topk_k", "activation_threshold": "activation_threshold"}
FIELDS = tuple(PENALTIES) + tuple(MODEL_COEFFICIENTS)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The static part of a config's recipe: which terms are on, and their schedules."""

    schedules: dict  # field -> Schedule, only the terms that are on
    d_ff: int
    n_layers: int
    chunk_len: int
    chunk_tau: float

    @property
    def active(self) -> bool:
        return bool(self.schedules)

    @property
    def regularisers(self) -> tuple[str, ...]:
        return tuple(PENALTIES[f] for f in PENALTIES if f in self.schedules)

    @property
    def topk(self) -> bool:
        return "topk" in self.schedules


def of(cfg: Config) -> Recipe:
    r = cfg.recipe
    on = {f: topk_counts(getattr(r, f), cfg.model.d_ff) if f == "topk" else getattr(r, f)
          for f in FIELDS if not schedules.is_default(getattr(r, f))}
    return Recipe(on, cfg.model.d_ff, cfg.model.n_layers, r.chunk_len, r.chunk_tau)


def topk_counts(s: Schedule, d_ff: int) -> Schedule:
    """The top-k schedule in neuron counts: 0 -> d_ff (dense), a fraction -> the one fraction -> k
    rule (``sparsity.topk_count``, evaluated on the host in float64 so a stage's k is exactly the
    k that evaluation uses for that fraction), an integer -> itself."""
    counts = tuple(float(d_ff if v == 0 else sparsity_lib.config_topk_k(float(v), d_ff))
                   for v in s.values)
    return dataclasses.replace(s, values=counts)


def coefficients(recipe: Recipe, step) -> dict:
    """In-graph values at ``step`` (an int or a traced integer): ``{field: float32 scalar}`` for
    the terms that are on; the top-k k is rounded to an int32 count in [1, d_ff]."""
    import jax.numpy as jnp  # noqa: PLC0415 - keep the recipe's static part importable without JAX

    out = {}
    for field, s in recipe.schedules.items():
        v = schedules.value(s, step)
        if field == "topk":
            v = jnp.clip(jnp.round(v), 1, recipe.d_ff).astype(jnp.int32)
        out[field] = v
    return out


def model_coefficients(recipe: Recipe, coefs: dict) -> dict:
    """``Sparsity.coefficients``: the model's terms broadcast to a leading [n_layers] axis (the
    input's per-layer convention, sliced per block or scanned)."""
    import jax.numpy as jnp  # noqa: PLC0415

    return {name: jnp.broadcast_to(coefs[field], (recipe.n_layers,))
            for field, name in MODEL_COEFFICIENTS.items() if field in coefs}


def stage_boundaries(cfg: Config) -> list[int]:
    """Every boundary step of the recipe's schedules (for the activation-ratio plot)."""
    r = cfg.recipe
    return sorted({int(b) for f in FIELDS for b in getattr(r, f).boundaries
                   if not schedules.is_default(getattr(r, f))})


METRIC_NAMES = {  # the step's metric of each term's current value (docs/recipes.md §Metrics)
    "l1": "l1_coef", "chunk": "chunk_coef", "topk": "topk_k",
    "activation_threshold": "activation_threshold",
}
