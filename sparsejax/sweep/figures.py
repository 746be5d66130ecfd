"""A sweep's figures (:mod:`sparsejax.plotting`; PNG + PDF): ratio vs tokens with fitted laws,
limit ratio vs parameters or width/depth, loss vs tokens."""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from sparsejax import laws
from sparsejax.sweep.fits import TOKENS_PER_D, LawFit
from sparsejax.sweep.resolved import ResolvedRun
from sparsejax.sweep.spec import DEFAULT_PLOTS


def plot_ratio_fits(fits: Sequence[LawFit], title: str, out_path: pathlib.Path | None = None):
    """Measured points of each fit's run and its fitted law (with bootstrap band) against tokens.

    The y axis is set by the data: a poorly constrained fit's band can run off to 10⁴ %.
    """
    from sparsejax import plotting

    fits = [f for f in fits if len(f.D)]
    fig = plotting.plot_ratio_vs_tokens({f.run.name: (f.D, f.ratio) for f in fits},
                                        {f.run.name: f.result for f in fits if f.status == "ok"}, title=title)
    pct = 100 * np.concatenate([f.ratio for f in fits])
    pad = 0.1 * np.ptp(pct) + 0.5
    fig.axes[0].set_ylim(max(0.0, pct.min() - pad), min(100.0 + pad, pct.max() + pad))
    if out_path is not None:
        plotting.save_figure(fig, out_path)
    return fig


def make_plots(rows: Sequence[dict], runs: Sequence[ResolvedRun], fits: Sequence[LawFit],
               plots_dir: pathlib.Path, kinds: Sequence[str] = DEFAULT_PLOTS) -> list[pathlib.Path]:
    """ratio vs tokens (per activation and metric, fitted curves per run), limit A0 vs params,
    loss vs tokens, limit vs width/depth; returns the PNG paths. A limit A0 that the fit pinned to
    a bound of the law is not plotted as a limit."""
    from sparsejax import plotting

    stems = []
    by_key = {(f.run.activation, f.metric): [] for f in fits}
    for f in fits:
        by_key[(f.run.activation, f.metric)].append(f)
    for (act, metric), group in by_key.items():
        ok = [f for f in group if f.status == "ok"]
        if "ratio_vs_tokens" in kinds and any(len(f.D) for f in group):
            stem = plots_dir / f"ratio_vs_tokens_{act}_{metric}"
            plot_ratio_fits(group, f"{act}: {metric} vs training tokens", stem)
            stems.append(stem)
        ok = sorted((f for f in ok if "A0" not in f.at_bounds()), key=lambda f: f.run.width / f.run.depth)
        if "limit_vs_width_depth" in kinds and len(ok) >= 2:  # a limit pinned to a bound is no data
            wd = np.array([f.run.width / f.run.depth for f in ok])
            limits = np.array([f.result.params["A0"] for f in ok])
            trend = laws.bootstrap("power_offset", wd, limits, n_boot=100) if len(ok) >= 4 else None
            stem = plots_dir / f"limit_vs_width_depth_{act}_{metric}"
            plotting.plot_limit_vs_width_depth(wd, limits, trend if trend and trend.success else None,
                                               title=f"{act}: limit of {metric} vs width/depth", out_path=stem)
            stems.append(stem)
    if "limit_vs_params" in kinds:
        for metric in sorted({f.metric for f in fits}):
            series, ci = {}, {}
            for act in sorted({f.run.activation for f in fits}):
                ok = sorted((f for f in fits if f.metric == metric and f.run.activation == act
                             and f.status == "ok" and "A0" not in f.at_bounds()), key=lambda f: f.run.params)
                if ok:
                    series[act] = ([f.run.params / 1e9 for f in ok], [f.result.params["A0"] for f in ok])
                    if all(f.result.ci for f in ok):
                        ci[act] = tuple(np.array([f.result.ci["A0"][i] for f in ok]) for i in (0, 1))
            if series:
                stem = plots_dir / f"limit_vs_params_{metric}"
                plotting.plot_limit_vs_params(series, ci, title=f"Limit of {metric} vs parameters",
                                              out_path=stem)
                stems.append(stem)
    if "loss_vs_tokens" in kinds:
        series = {}
        for run in runs:
            pts = [(r["tokens"], r["value"]) for r in rows if r["run"] == run.name and r["metric"] == "train_loss"]
            if pts:
                series[run.name] = (np.array([p[0] for p in pts]) / TOKENS_PER_D, [p[1] for p in pts])
        if series:
            stem = plots_dir / "loss_vs_tokens"
            plotting.plot_loss_vs_tokens(series, title="Training loss vs tokens", out_path=stem)
            stems.append(stem)
    return [pathlib.Path(f"{s}.png") for s in stems]
