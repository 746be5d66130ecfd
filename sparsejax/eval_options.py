"""What an evaluation measures and how: :class:`EvalOptions`, validated once, with no JAX import.

One definition of the evaluation settings for ``eval.py`` (its flags and defaults come from
here), ``evaluation.evaluate_run`` and sweeps (a sweep file holds an ``EvalOptions``, checked
when the sweep is resolved, not after hours of training). :func:`to_argv` turns options into
``eval.py`` flags; ``eval.py`` parses them back with the same :data:`FLAGS` table.
Definitions of the metrics: docs/sparsity_metrics_and_laws.md.
"""

from __future__ import annotations

import dataclasses

METRICS = ("zero", "fat", "topk", "topk_global", "cett", "cett_ppl")
CETT_PPL_MODES = ("joint", "per_checkpoint")
CETT_SEARCHES = ("incremental", "reference")
# What a CETT threshold of 0 does to exact zeros (sparsejax.cett, "ReLU and t = 0"): "floor" adds
# the FAT-ε floor 1e-18 to every per-neuron threshold (exact zeros inactive); "reference" keeps
# the reference's strict test against t / ‖W_out[i]‖ (exact zeros active at t = 0).
CETT_ZERO_RULES = ("floor", "reference")
DEAD_MIN_RATE = 1e-3  # dead = active on < 0.1% of tokens (docs §Dead neurons)


class EvalError(ValueError):
    """A bad evaluation option, or evaluation input that cannot be used."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    metrics: tuple[str, ...] = ("zero", "fat", "cett_ppl")
    fat_eps: float = 0.01  # FAT-ε threshold on |σ(gate)| (CATS / ProSparse use 0.01)
    topk: float = 0.3  # per-token top-k: a fraction of d_ff (< 1) or a neuron count (>= 1)
    cett: float = 0.2  # target of the fixed-CETT metric
    ppl_p: float = 1.0  # CETT-PPL-p%: perplexity ratio target 1 + p/100 (paper: p = 1)
    tolerance: float = 1e-3  # outer bisection tolerance on c, as in the paper
    cett_ppl_mode: str = "joint"
    joint_last: int = 5
    eval_batches: int = 0  # 0: the run's train.eval_batches
    dead_min_rate: float = DEAD_MIN_RATE
    cett_search: str = "incremental"
    # "floor": exact zeros inactive under a CETT threshold of 0; "reference": the reference's rule
    # (they count as active there): cett.CETT_ZERO_RULES.
    cett_zero_rule: str = "floor"
    max_cache_gib: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        self.validate()

    def validate(self) -> "EvalOptions":
        """Raise EvalError naming the first field outside its allowed values (run at construction)."""
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise EvalError(f"metrics={list(self.metrics)} is not allowed; choose one or more of "
                            f"{list(METRICS)}")
        if self.cett_ppl_mode not in CETT_PPL_MODES:
            raise EvalError(f"cett_ppl_mode={self.cett_ppl_mode!r}; allowed: {list(CETT_PPL_MODES)}")
        if self.cett_search not in CETT_SEARCHES:
            raise EvalError(f"cett_search={self.cett_search!r}; allowed: {list(CETT_SEARCHES)}")
        if self.cett_zero_rule not in CETT_ZERO_RULES:
            raise EvalError(f"cett_zero_rule={self.cett_zero_rule!r}; allowed: {list(CETT_ZERO_RULES)}")
        checks = [("fat_eps", self.fat_eps >= 0, ">= 0"), ("topk", self.topk > 0, "> 0"),
                  ("cett", 0 <= self.cett <= 1, "in [0, 1]"), ("ppl_p", self.ppl_p > 0, "> 0"),
                  ("tolerance", 0 < self.tolerance < 1, "in (0, 1)"),
                  ("joint_last", self.joint_last >= 1, ">= 1"),
                  ("eval_batches", self.eval_batches >= 0, ">= 0"),
                  ("dead_min_rate", 0 < self.dead_min_rate < 1, "in (0, 1)"),
                  ("max_cache_gib", self.max_cache_gib >= 0, ">= 0")]
        for name, ok, allowed in checks:
            if not ok:
                raise EvalError(f"{name}={getattr(self, name)!r} is not allowed; must be {allowed}")
        if self.topk >= 1 and self.topk != int(self.topk):
            raise EvalError(f"topk={self.topk} must be a fraction < 1 or a whole number of neurons")
        return self


# eval.py flag of each field (metrics is a comma-separated list).
FLAGS = {"metrics": "--metrics", "fat_eps": "--fat-eps", "topk": "--topk", "cett": "--cett",
         "ppl_p": "--p", "tolerance": "--tolerance", "cett_ppl_mode": "--cett-ppl-mode",
         "joint_last": "--joint-last", "eval_batches": "--eval-batches",
         "dead_min_rate": "--dead-min-rate", "cett_search": "--cett-search",
         "cett_zero_rule": "--cett-zero-rule",
         "max_cache_gib": "--max-cache-gib"}


def to_argv(options: EvalOptions) -> list[str]:
    """The eval.py flags that reproduce ``options`` (every field, so defaults cannot drift)."""
    argv = []
    for field, flag in FLAGS.items():
        value = getattr(options, field)
        argv += [flag, ",".join(value) if field == "metrics" else str(value)]
    return argv


def from_flags(values: dict) -> EvalOptions:
    """EvalOptions from parsed eval.py flags keyed by field name (metrics as 'a,b,c')."""
    kwargs = dict(values)
    kwargs["metrics"] = tuple(m.strip() for m in str(kwargs["metrics"]).split(",") if m.strip())
    return EvalOptions(**kwargs)
