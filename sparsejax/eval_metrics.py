"""The evaluation metrics: one registry entry per metric, read by everything that names one.

A :class:`Metric` says what ``eval.py --metrics NAME`` measures at each checkpoint (``measure``),
what it needs from the dense pass (``needs_hidden``), which settings it reads (``options``: the
:class:`sparsejax.eval_options.EvalOptions` fields, whose flags and help live on the fields),
what it does once per run (``search``), and how reports name it (``label``). The names accepted
by ``--metrics`` and ``EvalOptions.metrics``, eval.py's help, the order of the metrics in
``results.json``, the checkpoint loop of :func:`sparsejax.evaluation.evaluate` and the labels of
the summary table and plots (:func:`sparsejax.results.metric_label`) all read :data:`METRICS`.

A metric measures in the evaluator's forward passes (:class:`sparsejax.evaluation.Evaluator`:
the dense pass, threshold masks on σ(gate) or σ(gate)·up, per-token and global top-k). A metric
with a mask of its own brings its pass kinds in its entry (``passes``: built on first use, so
this module still imports no JAX), an in-FFN mask registered there with ``ffn.register_eval_mask``.
README §Evaluation, "Adding a metric", shows one.

No JAX import: ``eval_options`` validates metric names with this registry where JAX is not
loaded (sweep specs, eval.py's argument errors). Definitions of the built-in metrics:
docs/sparsity_metrics_and_laws.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Metric:
    """One evaluation metric.

    name: what ``--metrics`` and ``results.json`` call it.
    measure: ``measure(ctx) -> MetricResult`` at one checkpoint; ``ctx`` is an
        :class:`sparsejax.evaluation.CheckpointContext` (the step's evaluator, parameters, dense
        pass, options, this metric's run-level ``search`` result, and ``report``, which turns a
        pass into a :class:`sparsejax.results.MetricResult` with the metric's parameters).
    help: one line for eval.py's list of metrics.
    label: the report label from one checkpoint's result entry (its parameters), e.g.
        ``FAT-ε=0.01``; None: the name.
    options: the ``EvalOptions`` fields the metric reads (their flags are listed with it).
    needs_hidden: the dense pass keeps every layer's σ(gate)·up for it (CETT's threshold search).
    after_warmup: measured at checkpoints after ``train.warmup_steps`` only, and refused when
        none is selected.
    search: ``search(ctx) -> dict`` run once before the checkpoints (``ctx``:
        :class:`sparsejax.evaluation.RunContext`); its result is passed to every ``measure`` and
        written at the top level of ``results.json`` under the metric's name (null when the
        metric was not asked for).
    csv_params: parameters of its result written as rows of ``results.csv`` too (quantity =
        the parameter's name), e.g. the CETT value a search found.
    passes: ``passes() -> [sparsejax.evaluation.SparsePass, ...]``: pass kinds only this metric
        measures in, built and registered when the evaluator first needs a pass kind it does not
        know (JAX is imported by then); the place to register an in-FFN keep function too.
    """

    name: str
    measure: Callable[[Any], Any]
    help: str = ""
    label: Optional[Callable[[dict], str]] = None
    options: tuple[str, ...] = ()
    needs_hidden: bool = False
    after_warmup: bool = False
    search: Optional[Callable[[Any], dict]] = None
    csv_params: tuple[str, ...] = ()
    passes: Optional[Callable[[], Any]] = None


# The registry, in registration order: the order of ``results.json``'s metrics and eval.py's list.
METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS`; a name registered twice is a ValueError."""
    if metric.name in METRICS:
        raise ValueError(f"evaluation metric {metric.name!r} is already registered")
    if not metric.name.isidentifier():
        raise ValueError(f"evaluation metric name {metric.name!r} must be an identifier "
                         "(it is a --metrics item, a JSON key and a CSV value)")
    METRICS[metric.name] = metric
    return metric


def names() -> tuple[str, ...]:
    return tuple(METRICS)


def label(name: str, result: dict) -> str:
    """The report label of ``name`` from one of its result entries; the name itself for a metric
    without a label or one no longer registered (a results file of another version)."""
    metric = METRICS.get(name)
    if metric is None or metric.label is None:
        return name
    return metric.label(result)


def csv_params(name: str) -> tuple[str, ...]:
    """The parameters of ``name``'s results written as CSV rows (none for an unknown name)."""
    metric = METRICS.get(name)
    return () if metric is None else metric.csv_params


def searched() -> tuple[str, ...]:
    """Metrics with a run-level search: each is a top-level key of ``results.json``."""
    return tuple(name for name, m in METRICS.items() if m.search is not None)


# ------------------------------------------------------------------------- the CETT-PPL search
@dataclasses.dataclass
class CettPplSearch:
    cett: float
    target_ratio: float
    evaluations: list[tuple[float, float]]  # (c, perplexity ratio) in the order evaluated


def bisect_cett(ppl_ratio_at: Callable[[float], float], target_ratio: float,
                tolerance: float = 1e-3) -> CettPplSearch:
    """The reference's outer search (``calc_cett_for_target_ppl_ratio``) on c in [0, 1]:
    c goes up while the perplexity ratio is below the target; returns the bracket midpoint.

    The reference's tolerance is 1e-6 in its code; the paper uses 1e-3 (10 steps).
    """
    lo, hi = 0.0, 1.0
    evaluations = []
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        ratio = float(ppl_ratio_at(mid))
        evaluations.append((mid, ratio))
        if ratio < target_ratio:
            lo = mid
        else:
            hi = mid
    return CettPplSearch((lo + hi) / 2, target_ratio, evaluations)


def ppl_ratio(sparse_loss: float, dense_loss: float) -> float:
    """exp(loss_sparse − loss_dense): the sparse/dense perplexity ratio
    (docs/sparsity_metrics_and_laws.md §CETT-PPL)."""
    return math.exp(sparse_loss - dense_loss)


def target_ppl_ratio(options) -> float:
    """CETT-PPL-p%'s perplexity-ratio target 1 + p/100."""
    return 1 + options.ppl_p / 100


def _cett_ppl_search(run) -> dict:
    """Joint mode: bisection on c for the mean perplexity ratio over the last ``joint_last``
    post-warm-up checkpoints (docs/sparsity_metrics_and_laws.md §CETT-PPL), each in its own
    settings; steps a live trainer deletes meanwhile are left out (noted)."""
    options = run.options
    if options.cett_ppl_mode != "joint":
        return {"mode": "per_checkpoint"}
    target = target_ppl_ratio(options)
    joint = run.post_warmup_steps[-options.joint_last:]
    run.say(f"CETT-PPL-{options.ppl_p:g}%: searching c jointly on steps {joint}")
    before = run.forward_passes()
    cached = run.dense_passes(joint, "CETT-PPL joint search")

    def mean_ratio(c: float) -> float:
        ratios = [ppl_ratio(run.at(step).cett_pass(params, dense.hidden, c)[0].loss, dense.loss)
                  for step, params, dense in cached]
        value = float(np.mean(ratios))
        run.say(f"  c={c:.4f}: perplexity ratio {value:.5f} (target {target:.4f})")
        return value

    search = bisect_cett(mean_ratio, target, options.tolerance)
    return {"mode": "joint", "cett": search.cett, "joint_steps": [s for s, _, _ in cached],
            "target_ppl_ratio": target, "iterations": len(search.evaluations),
            "evaluations": search.evaluations, "forward_passes": run.forward_passes() - before}


def _cett_ppl(ctx):
    """The CETT pass at the c that gives a perplexity ratio of 1 + p/100: the joint search's c, or
    one searched at this checkpoint (``per_checkpoint``, with its evaluations)."""
    options, ev = ctx.options, ctx.ev
    target = target_ppl_ratio(options)
    search = None
    if options.cett_ppl_mode == "joint":
        c = ctx.search["cett"]
    else:
        before = ev.forward_passes
        search = bisect_cett(
            lambda c: ppl_ratio(ev.cett_pass(ctx.params, ctx.dense.hidden, c)[0].loss,
                                ctx.dense.loss), target, options.tolerance)
        c = search.cett
    sparse, t_layers = ev.cett_pass(ctx.params, ctx.dense.hidden, c)
    result = ctx.report(sparse, cett=c, p=options.ppl_p, target_ppl_ratio=target,
                        thresholds=t_layers)
    if search is not None:
        result.params.update(search_evaluations=search.evaluations,
                             search_forward_passes=ev.forward_passes - before)
    return result


def _cett(ctx):
    sparse, t_layers = ctx.ev.cett_pass(ctx.params, ctx.dense.hidden, ctx.options.cett)
    return ctx.report(sparse, cett=ctx.options.cett, thresholds=t_layers)


# --------------------------------------------------------------------------- built-in metrics
register_metric(Metric(
    "zero", lambda ctx: ctx.report(ctx.dense),
    help="σ(gate) ≠ 0 in the dense model (the ReLU family's exact zeros)"))
register_metric(Metric(
    "fat", lambda ctx: ctx.report(ctx.ev.fat(ctx.params, ctx.options.fat_eps),
                                  eps=ctx.options.fat_eps),
    help="sparse pass dropping |σ(gate)| < ε", label=lambda r: f"FAT-ε={r['eps']:g}",
    options=("fat_eps",)))
register_metric(Metric(
    "topk", lambda ctx: ctx.report(ctx.ev.topk(ctx.params), k=ctx.ev.topk_k,
                                   fraction=ctx.ev.topk_fraction),
    help="sparse pass keeping each token's k largest |σ(gate)|",
    label=lambda r: f"top-k (k={r['k']})", options=("topk",)))
register_metric(Metric(
    "topk_global", lambda ctx: ctx.report(ctx.ev.topk_global(ctx.params),
                                          fraction=ctx.ev.topk_fraction),
    help="sparse pass keeping a layer's top fraction of |σ(gate)| over all tokens (the "
         "reference's top-k)", label=lambda r: f"global top {r['fraction']:.0%}",
    options=("topk",)))
register_metric(Metric(
    "cett", _cett, help="sparse pass at a fixed CETT (cumulative error of tail truncation)",
    label=lambda r: f"CETT={r['cett']:g}",
    options=("cett", "cett_search", "cett_zero_rule", "max_cache_gib"), needs_hidden=True,
    csv_params=("cett",)))
register_metric(Metric(
    "cett_ppl", _cett_ppl, help="CETT pass at the perplexity ratio 1 + p/100 (the paper's metric)",
    label=lambda r: f"CETT-PPL-{r['p']:g}%",
    options=("ppl_p", "tolerance", "cett_ppl_mode", "joint_last", "cett_search", "cett_zero_rule",
             "max_cache_gib"),
    needs_hidden=True, after_warmup=True, search=_cett_ppl_search, csv_params=("cett",)))
