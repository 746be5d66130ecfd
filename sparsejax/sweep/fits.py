"""Fitting a sweep: the Sparsing Law ratio law of each run's activation, per ratio metric.

Laws and fitting: :mod:`sparsejax.laws` (docs/sparsity_metrics_and_laws.md §Laws); the ratio
laws take D = training tokens / 1e9. Fits run in parallel spawned processes (the fitter is
single-threaded SciPy, so one process per core is what parallelises it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from sparsejax import activations, laws
from sparsejax.eval_options import METRICS
from sparsejax.sweep.resolved import ResolvedRun

TOKENS_PER_D = 1e9


def ratio_metrics(rows: Sequence[dict]) -> list[str]:
    """Activation-ratio metrics present in rows: train_activation_ratio and ``<eval metric>_ratio``."""
    wanted = ["train_activation_ratio", *(f"{m}_ratio" for m in METRICS)]
    present = {r["metric"] for r in rows}
    return [m for m in wanted if m in present]


@dataclasses.dataclass(frozen=True)
class LawFit:
    run: ResolvedRun
    metric: str
    law: str
    status: str  # "ok", "failed" or "skipped"
    message: str
    D: np.ndarray  # tokens / 1e9 of the fitted points (post-warm-up)
    ratio: np.ndarray
    result: laws.FitResult | None = None

    def trend(self) -> dict:
        """Mean ratio of the first and last tenth of the points (by tokens): falls, rises or flat."""
        if len(self.ratio) < 2:
            return {"first": None, "last": None, "direction": "unknown"}
        k = max(1, len(self.ratio) // 10)
        order = np.argsort(self.D)
        first, last = float(np.mean(self.ratio[order[:k]])), float(np.mean(self.ratio[order[-k:]]))
        direction = "flat" if abs(last - first) < 1e-4 else ("falls" if last < first else "rises")
        return {"first": first, "last": last, "direction": direction}

    def at_bounds(self) -> list[str]:
        """Parameters the fit pinned to a bound of the law (e.g. A0 = 1): not identified by the data.

        The bounded "trf" fallback of :func:`laws.fit` lands on a bound to ~1e-14; a bound of 0 counts
        only when hit exactly (a tiny c may still matter next to a large D^(−α)).
        """
        if self.result is None or not self.result.success:
            return []
        law = laws.get_law(self.law)
        return [name for name, v, lo, hi in zip(law.param_names, self.result.param_array, law.lower, law.upper)
                if any(math.isfinite(b) and abs(v - b) <= 1e-9 * max(abs(b), abs(v)) for b in (lo, hi))]

    def to_dict(self) -> dict:
        r, finite = self.result, lambda v: v if v is not None and math.isfinite(v) else None
        return {"run": self.run.name, "activation": self.run.activation, "size": self.run.size,
                "params": self.run.params, "width": self.run.width, "depth": self.run.depth,
                "metric": self.metric, "law": self.law, "status": self.status,
                "success": self.status == "ok", "message": self.message, "n_points": len(self.D),
                "tokens_min": float(self.D.min() * TOKENS_PER_D) if len(self.D) else None,
                "tokens_max": float(self.D.max() * TOKENS_PER_D) if len(self.D) else None,
                "formula": laws.get_law(self.law).formula if self.law else None,
                "params_fit": {k: finite(v) for k, v in r.params.items()} if r else None,
                "ci_lo": {k: lo for k, (lo, _) in r.ci.items()} if r and r.ci else None,
                "ci_hi": {k: hi for k, (_, hi) in r.ci.items()} if r and r.ci else None,
                "level": r.level if r else None, "n_boot_ok": r.n_boot_ok if r else 0,
                "bootstrap_block": bootstrap_block(self.metric, len(self.D)),
                "r2": finite(r.r2) if r else None, "at_bounds": self.at_bounds(), "trend": self.trend()}


def bootstrap_block(metric: str, n_points: int) -> int:
    """Moving-block bootstrap block length. The in-graph ratio is logged every few steps and its noise
    is serially correlated, so it is resampled in ten runs of neighbouring points. The eval metrics
    have one point per checkpoint; consecutive checkpoints of one run share its trajectory, so with
    the protocol's ~12 log-spaced checkpoints they are resampled in blocks of ≈ n^(1/3) neighbours
    (2 for 11 points), the usual order for a short series; 1 (point by point) below 8 points."""
    if metric == "train_activation_ratio":
        return max(1, n_points // 10)
    return max(1, round(n_points ** (1 / 3))) if n_points >= 8 else 1


def fit_run_metric(run: ResolvedRun, rows: Sequence[dict], metric: str, law_by_activation: Mapping[str, str],
                   *, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> LawFit:
    """Fit the run's activation law to (tokens/1e9, ratio) after warm-up (steps > train.warmup_steps)."""
    pts = sorted((r["tokens"], r["value"]) for r in rows
                 if r["run"] == run.name and r["metric"] == metric and r["step"] > run.warmup_steps)
    D = np.array([p[0] for p in pts], dtype=float) / TOKENS_PER_D
    ratio = np.array([p[1] for p in pts], dtype=float)
    law = law_by_activation.get(run.activation, "")
    skip = None
    if not law:
        skip = f"no law for activation {run.activation!r} (sweep laws: {dict(law_by_activation)})"
    elif metric == "zero_ratio" and not activations.get(run.activation).exact_zeros:
        skip = f"zero criterion is meaningless for {run.activation} (no exact zeros)"
    elif len(D) <= (n_params := laws.get_law(law).n_params):
        # e.g. a sweep that evaluates only its final checkpoint: one point, a curve needs more
        skip = (f"{len(D)} point(s) after warm-up; the {law} law needs {n_params + 1} "
                f"(evaluate more checkpoints to fit this metric)")
    if skip:
        return LawFit(run, metric, law, "skipped", skip, D, ratio)
    block = bootstrap_block(metric, len(D))
    try:
        result = (laws.bootstrap(law, D, ratio, n_boot=n_boot, level=level, seed=seed, block=block)
                  if n_boot else laws.fit(law, D, ratio, seed=seed))
    except ValueError as err:  # too few points, out-of-domain data
        return LawFit(run, metric, law, "failed", str(err), D, ratio)
    return LawFit(run, metric, law, "ok" if result.success else "failed", result.message, D, ratio, result)


def _fit_job(job) -> LawFit:
    run, rows, metric, law_by_activation, kwargs = job
    return fit_run_metric(run, rows, metric, law_by_activation, **kwargs)


def fit_runs(rows: Sequence[dict], runs: Sequence[ResolvedRun], law_by_activation: Mapping[str, str],
             *, workers: int = 1, **kwargs) -> list[LawFit]:
    """One fit per run and activation-ratio metric present, in (run, metric) order.

    The bootstrap refits dominate the cost (seconds per fit), so with ``workers`` > 1 the fits run in
    that many spawned processes (not forked: the parent may hold JAX's threads); results are the
    same as with one worker, since every fit is seeded.
    """
    metrics = ratio_metrics(rows)
    jobs = []
    for run in runs:
        for metric in metrics:
            mine = [r for r in rows if r["run"] == run.name and r["metric"] == metric]
            if mine:
                jobs.append((run, mine, metric, dict(law_by_activation), kwargs))
    if workers <= 1 or len(jobs) <= 1:
        return [_fit_job(job) for job in jobs]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_fit_job, jobs))


def format_fit(fit: LawFit) -> str:
    head = f"{fit.run.name:<14} {fit.metric:<24} {fit.law or '-':<11}"
    if fit.status != "ok":
        return f"{head} {fit.status.upper()}: {fit.message}"
    r, trend = fit.result, fit.trend()
    parts = []
    for name, value in r.params.items():
        ci = f" [{r.ci[name][0]:.4g}, {r.ci[name][1]:.4g}]" if r.ci else ""
        parts.append(f"{name}={value:.4g}{ci}")
    bounded = f"; at bound (not identified): {', '.join(fit.at_bounds())}" if fit.at_bounds() else ""
    return (f"{head} {', '.join(parts)}; R²={r.r2:.3f}; ratio {trend['first']:.3f} -> "
            f"{trend['last']:.3f} ({trend['direction']}){bounded}")
