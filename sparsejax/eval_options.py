"""What an evaluation measures and how: :class:`EvalOptions`, validated once, with no JAX import.

One definition of the evaluation settings for ``eval.py`` (its flags, help and defaults are the
fields' own: :func:`option`), ``evaluation.evaluate_run`` and sweeps (a sweep file holds an
``EvalOptions``, checked when the sweep is resolved, not after hours of training).
:func:`to_argv` turns options into ``eval.py`` flags; ``eval.py`` parses them back with the same
:data:`FLAGS` table. The metric names are the registry's (:mod:`sparsejax.eval_metrics`).
Definitions of the metrics: docs/sparsity_metrics_and_laws.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from sparsejax.eval_metrics import METRICS  # noqa: F401 - the registry, re-exported by name

CETT_PPL_MODES = ("joint", "per_checkpoint")
CETT_SEARCHES = ("incremental", "reference")
# What a CETT threshold of 0 does to exact zeros (sparsejax.cett, "ReLU and t = 0"): "floor" adds
# the FAT-ε floor 1e-18 to every per-neuron threshold (exact zeros inactive); "reference" keeps
# the reference's strict test against t / ‖W_out[i]‖ (exact zeros active at t = 0).
CETT_ZERO_RULES = ("floor", "reference")
DEAD_MIN_RATE = 1e-3  # dead = active on < 0.1% of tokens (docs §Dead neurons)


def option(default, flag: str, kind: type, help: str | Callable[[], str], *,
           check: Optional[tuple[Callable[[Any], bool], str]] = None,
           choices: Optional[tuple[str, ...]] = None):
    """An ``EvalOptions`` field with its eval.py flag, argument type and help (a string, or a
    function for text that reads a registry), and its allowed values: ``choices``, or ``check``
    = (predicate, what is allowed)."""
    return dataclasses.field(default=default, metadata={
        "flag": flag, "type": kind, "help": help, "check": check, "choices": choices})


class EvalError(ValueError):
    """A bad evaluation option, or evaluation input that cannot be used."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Every evaluation setting, in eval.py's flag order (``results.json`` writes them in it)."""

    metrics: tuple[str, ...] = option(
        ("zero", "fat", "cett_ppl"), "--metrics", str,
        lambda: f"comma-separated subset of {','.join(METRICS)}")
    # FAT-ε threshold on |σ(gate)| (CATS / ProSparse use 0.01)
    fat_eps: float = option(0.01, "--fat-eps", float, "FAT-ε threshold on |σ(gate)|",
                            check=(lambda v: v >= 0, ">= 0"))
    # per-token top-k: a fraction of d_ff (< 1) or a neuron count (>= 1)
    topk: float = option(0.3, "--topk", float, "top-k: fraction of d_ff (<1) or k",
                         check=(lambda v: v > 0, "> 0"))
    cett: float = option(0.2, "--cett", float, "target of the fixed-CETT metric",
                         check=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    # CETT-PPL-p%: perplexity ratio target 1 + p/100 (paper: p = 1)
    ppl_p: float = option(1.0, "--p", float, "CETT-PPL-p%%: perplexity ratio 1 + p/100",
                          check=(lambda v: v > 0, "> 0"))
    # outer bisection tolerance on c, as in the paper
    tolerance: float = option(1e-3, "--tolerance", float, "CETT-PPL bisection tolerance on c",
                              check=(lambda v: 0 < v < 1, "in (0, 1)"))
    cett_ppl_mode: str = option(
        "joint", "--cett-ppl-mode", str, f"{' or '.join(CETT_PPL_MODES)}; joint: one c searched "
        "on the last --joint-last checkpoints (paper)", choices=CETT_PPL_MODES)
    joint_last: int = option(5, "--joint-last", int, "checkpoints of the joint CETT-PPL search",
                             check=(lambda v: v >= 1, ">= 1"))
    eval_batches: int = option(0, "--eval-batches", int, "validation batches (0: the run's "
                               "train.eval_batches; 4 with --hf)", check=(lambda v: v >= 0, ">= 0"))
    dead_min_rate: float = option(DEAD_MIN_RATE, "--dead-min-rate", float, "a neuron active on "
                                  "fewer tokens than this share is dead",
                                  check=(lambda v: 0 < v < 1, "in (0, 1)"))
    cett_search: str = option("incremental", "--cett-search", str,
                              f"{' or '.join(CETT_SEARCHES)} threshold search",
                              choices=CETT_SEARCHES)
    # "floor": exact zeros inactive under a CETT threshold of 0; "reference": the reference's rule
    # (they count as active there): cett.CETT_ZERO_RULES.
    cett_zero_rule: str = option("floor", "--cett-zero-rule", str, "floor: exact zeros inactive "
                                 "under a CETT threshold of 0; reference: the reference's rule "
                                 "(active there)", choices=CETT_ZERO_RULES)
    max_cache_gib: float = option(2.0, "--max-cache-gib", float, "above this, cached FFN "
                                  "intermediates for CETT spill to disk",
                                  check=(lambda v: v >= 0, ">= 0"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        self.validate()

    def validate(self) -> "EvalOptions":
        """Raise EvalError naming the first field outside its allowed values (run at construction):
        the metric names (the registry's), then the fields with choices, then the ranges."""
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise EvalError(f"metrics={list(self.metrics)} is not allowed; choose one or more of "
                            f"{list(METRICS)}")
        fields = dataclasses.fields(self)
        for f in fields:
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise EvalError(f"{f.name}={getattr(self, f.name)!r}; allowed: {list(choices)}")
        for f in fields:
            check = f.metadata.get("check")
            if check is not None and not check[0](getattr(self, f.name)):
                raise EvalError(f"{f.name}={getattr(self, f.name)!r} is not allowed; must be "
                                f"{check[1]}")
        if self.topk >= 1 and self.topk != int(self.topk):
            raise EvalError(f"topk={self.topk} must be a fraction < 1 or a whole number of neurons")
        return self


# eval.py flag of each field (metrics is a comma-separated list), in the fields' order.
FLAGS = {f.name: f.metadata["flag"] for f in dataclasses.fields(EvalOptions)}


def help_text(field: str) -> str:
    """eval.py's help of ``field`` (before its default)."""
    text = next(f for f in dataclasses.fields(EvalOptions) if f.name == field).metadata["help"]
    return text() if callable(text) else text


def argument_type(field: str) -> type:
    return next(f for f in dataclasses.fields(EvalOptions) if f.name == field).metadata["type"]


def flag_value(field: str, value) -> str:
    """``value`` of ``field`` as eval.py's flag spells it."""
    return ",".join(value) if field == "metrics" else str(value)


def to_argv(options: EvalOptions) -> list[str]:
    """The eval.py flags that reproduce ``options`` (every field, so defaults cannot drift)."""
    argv = []
    for field, flag in FLAGS.items():
        argv += [flag, flag_value(field, getattr(options, field))]
    return argv


def from_flags(values: dict) -> EvalOptions:
    """EvalOptions from parsed eval.py flags keyed by field name (metrics as 'a,b,c')."""
    kwargs = dict(values)
    kwargs["metrics"] = tuple(m.strip() for m in str(kwargs["metrics"]).split(",") if m.strip())
    return EvalOptions(**kwargs)
