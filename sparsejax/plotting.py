"""All of sparsejax's figures, in one style: the training activation-ratio plot, eval.py's
plots, and paper-style figures for the scaling laws of :mod:`sparsejax.laws` (Sparsing Law,
arXiv 2411.02335).

Every function builds a standalone :class:`matplotlib.figure.Figure` (no pyplot state, so it is
safe under the Agg backend, in tests and in notebooks), styles it the same way — labelled axes
with units, grid, legend, title — and, when ``out_path`` (a path *stem*) is given, saves
``<stem>.png`` and ``<stem>.pdf``.

Artists, for callers and tests that inspect figures: measured points are scatter collections
(one per series), fitted laws are lines (one per fit), bootstrap confidence bands are
``fill_between`` collections (one per fit that carries bootstrap samples). A fit named like a series
takes that series' colour and shares its legend entry; generic "fitted law" / "CI" keys explain the
line and band styles.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sparsejax import laws, results as results_lib

_CURVE_POINTS = 200
_BAND_ALPHA = 0.2


def _new_axes(title: str):
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, log_x: bool, out_path, key_handles=()) -> Figure:
    """Labels, scale, legend (plus ``key_handles``: generic entries not drawn on the axes), saving."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
        # Matplotlib labels every minor tick of an axis spanning a decade or two, and labels such as
        # "3×10⁻⁵" then run into each other: label only the 2s and 5s between the decades.
        lo, hi = ax.get_xlim()
        if 0 < lo < hi and np.log10(hi / lo) < 3:
            ax.xaxis.set_minor_formatter(ticker.FuncFormatter(_minor_log_label))
    handles = ax.get_legend_handles_labels()[0] + list(key_handles)
    if handles:
        ax.legend(handles=handles, fontsize="small")
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


def _minor_log_label(x: float, _pos=None) -> str:
    if not np.isfinite(x) or x <= 0:
        return ""
    exponent = int(np.floor(np.log10(x) + 1e-9))
    mantissa = round(x / 10.0**exponent, 6)
    return f"${mantissa:g}\\times10^{{{exponent}}}$" if mantissa in (2.0, 5.0) else ""


def mark_synthetic(fig: Figure, text: str = "SYNTHETIC") -> Figure:
    """Stamp ``text`` across the figure (large, diagonal, semi-transparent red), so that a figure
    drawn from synthetic data cannot be mistaken for a result. Returns the figure."""
    fig.text(0.5, 0.5, text, transform=fig.transFigure, ha="center", va="center", rotation=30,
             fontsize=48, fontweight="bold", color="red", alpha=0.25, zorder=10)
    return fig


def save_figure(fig: Figure, out_path, formats: tuple[str, ...] = ("png", "pdf")) -> Path:
    """Write ``<out_path>.png`` and ``<out_path>.pdf`` (or ``formats``); returns the stem.

    Each file is rendered in memory and written whole (``rundir.atomic_write``: a temporary file
    renamed over the target, or one upload to an object store), so a reader, or a crash
    mid-write, never sees a truncated figure.
    """
    from sparsejax import rundir, storage

    # a stem, not a filename: "fig_0.1B" must not lose ".1B" to a suffix swap
    stem = storage.path(out_path) if storage.is_remote(out_path) else Path(out_path)
    if not storage.is_remote(out_path):
        stem.parent.mkdir(parents=True, exist_ok=True)
    for ext in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=150)
        rundir.atomic_write(f"{stem}.{ext}", buf.getvalue())
    return stem


def _colours(labels) -> dict[str, str]:
    """One colour per label, shared by a series and the fit of the same name."""
    unique = list(dict.fromkeys(labels))
    return {label: f"C{i % 10}" for i, label in enumerate(unique)}


def _grid(lo: float, hi: float, log: bool) -> np.ndarray:
    return np.geomspace(lo, hi, _CURVE_POINTS) if log else np.linspace(lo, hi, _CURVE_POINTS)


def _draw_fit(ax, result: laws.FitResult, x_grid, x_eval, scale: float, colour: str, label: str | None):
    """Line of the fitted law, plus its bootstrap band when the result carries samples.

    ``x_grid`` is where to draw, ``x_eval`` what the law takes there (they differ for two-variable
    laws evaluated at fixed N). ``label=None`` keeps the fit out of the legend (its colour already
    matches a labelled series). Returns the band's level, or None without a band.
    """
    level = None
    if result.n_boot_ok >= 2:
        central, lo, hi = laws.predict_band(result, x_eval)
        level = result.level
        band_label = f"{label} {level:.0%} CI" if label else "_band"
        ax.fill_between(
            x_grid, lo * scale, hi * scale, color=colour, alpha=_BAND_ALPHA, linewidth=0, label=band_label
        )
    else:
        central = laws.predict(result, x_eval)
    ax.plot(x_grid, central * scale, color=colour, label=f"{label} fit" if label else "_fit")
    return level


def _draw_fits(ax, fits: Mapping, series: Mapping, x_grid, x_evals: Mapping, scale, colours) -> list:
    """Draws every fit; a fit sharing its series' label joins that legend entry by colour, and
    generic "fitted law" / "CI" keys are returned for the legend instead of one entry per fit."""
    levels, shared = set(), False
    for label, result in fits.items():
        in_series = label in series
        shared |= in_series
        legend_label = None if in_series else label
        level = _draw_fit(ax, result, x_grid, x_evals[label], scale, colours[label], legend_label)
        if in_series and level is not None:
            levels.add(level)
    keys = [Line2D([], [], color="0.3", label="fitted law")] if shared else []
    keys += [Patch(color="0.3", alpha=_BAND_ALPHA, label=f"{lvl:.0%} bootstrap CI") for lvl in sorted(levels)]
    return keys


def _x_range(series: Mapping, x_range, what: str) -> tuple[float, float]:
    if x_range is not None:
        return float(x_range[0]), float(x_range[1])
    if not series:
        raise ValueError(f"no series given: pass {what} to say where to draw the fits")
    xs = np.concatenate([np.asarray(x, dtype=float) for x, _ in series.values()])
    return float(xs.min()), float(xs.max())


def plot_ratio_vs_tokens(
    series: Mapping[str, tuple],
    fits: Mapping[str, laws.FitResult] | None = None,
    *,
    tokens_range: tuple[float, float] | None = None,
    log_x: bool = True,
    title: str = "Activation ratio vs training tokens",
    out_path=None,
) -> Figure:
    """Activation ratio (%) against training tokens (B), as in the Sparsing Law paper.

    series: label -> (D in billions of tokens, activation ratio in [0, 1]); one scatter each.
    fits: label -> :class:`~sparsejax.laws.FitResult` of a ratio law (``relu_ratio`` /
    ``silu_ratio``); one line each over ``tokens_range`` (default: the span of the series — pass a
    wider range to extrapolate), with a shaded bootstrap band if the fit has samples.
    """
    fits = fits or {}
    colours = _colours([*series, *fits])
    fig, ax = _new_axes(title)
    for label, (D, ratio) in series.items():
        ax.scatter(D, np.asarray(ratio) * 100, s=14, color=colours[label], label=label)
    D_grid = _grid(*_x_range(series, tokens_range, "tokens_range"), log_x)
    keys = _draw_fits(ax, fits, series, D_grid, {label: D_grid for label in fits}, 100, colours)
    return _finish(fig, ax, "training tokens (B)", "activation ratio (%)", log_x, out_path, keys)


def plot_limit_vs_width_depth(
    ratios,
    limits,
    fit: laws.FitResult | None = None,
    *,
    log_x: bool = False,
    title: str = "Limit activation ratio vs width/depth",
    out_path=None,
) -> Figure:
    """Limit activation ratio A0 (%) against width/depth ratio at fixed parameter count.

    ratios: width/depth (d_model / n_layers) per model; limits: A0 in [0, 1] per model. ``fit``
    (typically ``power_offset``) is drawn over the span of ``ratios``, with its band if
    bootstrapped. Sparsing Law (docs/sparsity_metrics_and_laws.md §Laws): the limit rises roughly linearly
    up to width/depth ≈ 114, then flattens.
    """
    ratios = np.asarray(ratios, dtype=float)
    fig, ax = _new_axes(title)
    ax.scatter(ratios, np.asarray(limits) * 100, s=18, color="C0", label="measured limit")
    if fit is not None:
        x_grid = _grid(ratios.min(), ratios.max(), log_x)
        _draw_fit(ax, fit, x_grid, x_grid, 100, "C1", fit.law.name)
    return _finish(fig, ax, "width / depth (d_model / layers)", "limit activation ratio (%)", log_x, out_path)


def plot_limit_vs_params(
    series: Mapping[str, tuple],
    ci: Mapping[str, tuple] | None = None,
    *,
    log_x: bool = True,
    title: str = "Limit activation ratio vs parameter scale",
    out_path=None,
) -> Figure:
    """Limit activation ratio A0 (%) against parameters (B), one line per activation.

    series: label -> (parameters in billions, A0 in [0, 1]); ci: label -> (lo, hi) arrays of A0,
    drawn as error bars. The paper's finding: the limit is insensitive to scale
    (docs/sparsity_metrics_and_laws.md §Laws).
    """
    ci = ci or {}
    colours = _colours(series)
    fig, ax = _new_axes(title)
    for label, (n_params, limits) in series.items():
        limits_pct = np.asarray(limits, dtype=float) * 100
        if label in ci:
            lo, hi = (np.asarray(bound, dtype=float) * 100 for bound in ci[label])
            yerr = np.stack([limits_pct - lo, hi - limits_pct])
            ax.errorbar(
                n_params, limits_pct, yerr=yerr, fmt="o-", capsize=3, color=colours[label], label=label
            )
        else:
            ax.plot(n_params, limits_pct, "o-", color=colours[label], label=label)
    return _finish(fig, ax, "parameters (B)", "limit activation ratio (%)", log_x, out_path)


def plot_ratio_vs_width_depth(
    ratios,
    values,
    line=None,
    *,
    fit_range: tuple[float, float] | None = None,
    log_x: bool = True,
    ylabel: str = "activation ratio (%)",
    title: str = "Activation ratio vs width/depth at fixed parameters",
    out_path=None,
) -> Figure:
    """Measured activation ratios (%) against width/depth, with a fitted straight line and its band.

    ratios: width/depth per run (several runs, e.g. seeds, may share one); values: ratio in [0, 1]
    per run, drawn as points, with the mean of each width/depth as a marker. ``line``: a
    :class:`sparsejax.laws.analysis.LineFit` of ratio (fraction) on width/depth, drawn over
    ``fit_range`` (default: the span of ``ratios``) with its confidence band. Sparsing Law: the
    ratio rises roughly linearly with width/depth below a bottleneck (≈114 at 0.1B).
    """
    ratios, values = np.asarray(ratios, dtype=float), np.asarray(values, dtype=float)
    fig, ax = _new_axes(title)
    ax.scatter(ratios, values * 100, s=16, color="C0", alpha=0.6, label="runs (seeds)")
    uniq = np.unique(ratios)
    ax.plot(uniq, [values[ratios == u].mean() * 100 for u in uniq], "D", color="C0", label="mean")
    if line is not None:
        lo, hi = fit_range if fit_range is not None else (ratios.min(), ratios.max())
        grid = _grid(lo, hi, log_x)
        band_lo, band_hi = line.band(grid)
        ax.fill_between(grid, band_lo * 100, band_hi * 100, color="C1", alpha=_BAND_ALPHA, linewidth=0,
                        label=f"{line.level:.0%} CI of the line")
        ax.plot(grid, line.predict(grid) * 100, color="C1", label="least-squares line")
    return _finish(fig, ax, "width / depth (d_model / layers)", ylabel, log_x, out_path)


def plot_convergence_vs_params(
    series: Mapping[str, tuple],
    *,
    log_x: bool = True,
    title: str = "Tokens until the activation ratio settles vs parameters",
    out_path=None,
) -> Figure:
    """Tokens (B) a run's activation ratio takes to settle against parameters (B), one line per
    activation. series: label -> (parameters in billions, tokens in billions). Sparsing Law: smaller
    models converge to their limit faster."""
    colours = _colours(series)
    fig, ax = _new_axes(title)
    for label, (n_params, tokens) in series.items():
        ax.plot(n_params, tokens, "o-", color=colours[label], label=label)
    return _finish(fig, ax, "parameters (B)", "tokens until settled (B)", log_x, out_path)


def plot_vs_learning_rate(
    series: Mapping[str, tuple],
    *,
    ylabel: str,
    title: str,
    best: Mapping[str, float] | None = None,
    out_path=None,
) -> Figure:
    """A quantity against the learning rate (log x), one line per label: label -> (learning rates,
    values); labels starting "µP" are drawn solid, others dashed (the standard parameterisation).
    ``best``: label -> the label's best learning rate, ringed."""
    colours = _colours([label.split(" ", 1)[-1] for label in series])
    fig, ax = _new_axes(title)
    for label, (lrs, values) in series.items():
        colour = colours[label.split(" ", 1)[-1]]
        ax.plot(lrs, values, "o-" if label.startswith("µP") else "s--", color=colour, label=label)
        if best and label in best:
            i = list(lrs).index(best[label])
            ax.plot([lrs[i]], [values[i]], "o", ms=12, mfc="none", mec=colour, mew=1.5)
    return _finish(fig, ax, "learning rate", ylabel, True, out_path)


def plot_ratio_vs_loss(
    points: Mapping[str, tuple],
    *,
    title: str = "Activation ratio vs loss per activation",
    ratio_label: str = "activation ratio at CETT-PPL-1% (%)",
    out_path=None,
) -> Figure:
    """One labelled point per activation: final loss (x) against activation ratio (%, y), with
    error bars. points: label -> (loss, loss spread, ratio in [0, 1], ratio spread). ReLU² Wins /
    Sparsing Law: ReLU-family activations are much sparser than SiLU/GELU at about the same loss."""
    colours = _colours(points)
    fig, ax = _new_axes(title)
    for label, (loss, loss_err, ratio, ratio_err) in points.items():
        ax.errorbar([loss], [ratio * 100], xerr=[loss_err], yerr=[ratio_err * 100], fmt="o", capsize=3,
                    color=colours[label], label=label)
        ax.annotate(label, (loss, ratio * 100), textcoords="offset points", xytext=(5, 4), fontsize="small")
    return _finish(fig, ax, "final eval loss (nats/token)", ratio_label, False, out_path)


def plot_loss_vs_tokens(
    series: Mapping[str, tuple],
    fits: Mapping[str, laws.FitResult | tuple[laws.FitResult, float]] | None = None,
    *,
    tokens_range: tuple[float, float] | None = None,
    log_x: bool = True,
    log_y: bool = False,
    title: str = "Loss vs training tokens",
    out_path=None,
) -> Figure:
    """Loss against training tokens (B), one scatter per series and one line per fit.

    series: label -> (D in billions of tokens, loss). fits: label -> a FitResult of a one-variable
    law of D, or (FitResult, N) for a law of (N, D) such as ``chinchilla``, drawn at fixed N. The
    plotted D values are passed to the law unchanged, so fit it with D in billions as well.
    """
    fits = fits or {}
    colours = _colours([*series, *fits])
    fig, ax = _new_axes(title)
    for label, (D, loss) in series.items():
        ax.scatter(D, loss, s=14, color=colours[label], label=label)
    D_grid = _grid(*_x_range(series, tokens_range, "tokens_range"), log_x)
    results, x_evals = {}, {}
    for label, spec in fits.items():
        result, n_params = spec if isinstance(spec, tuple) else (spec, None)
        x_names = result.law.x_names
        if n_params is None and len(x_names) == 1:
            x_evals[label] = D_grid
        elif n_params is not None and x_names == ("N", "D"):
            x_evals[label] = np.stack([np.full_like(D_grid, n_params), D_grid], axis=1)
        else:
            raise ValueError(
                f"fit {label!r}: law {result.law.name} takes {x_names}; pass a FitResult of a "
                "law of D alone, or (FitResult, N) for a law of (N, D)"
            )
        results[label] = result
    keys = _draw_fits(ax, results, series, D_grid, x_evals, 1.0, colours)
    if log_y:
        ax.set_yscale("log")
    return _finish(fig, ax, "training tokens (B)", "loss (nats/token)", log_x, out_path, keys)


# --------------------------------------------------------------------------- training and eval
def plot_activation_ratio(records: list, out_path, title: str = "",
                          stages: tuple[int, ...] | list[int] = ()) -> Path:
    """Activation ratio vs tokens seen: one thin line per layer, the layer mean in bold.

    ``records`` are :class:`sparsejax.results.TrainRecord` s (``results.read_training``), in step
    order; writes ``out_path`` (a ``.png`` path).
    ``stages``: steps where a stage of the sparsity schedule begins (``SparsityPlan.stage_boundaries``),
    drawn as dashed vertical lines at the tokens seen by then.
    """
    rows = [r for r in records if r.activation_ratio_layers is not None]
    if not rows:
        raise ValueError("no activation-ratio records to plot (was activation logging off?)")
    tokens = np.array([r.tokens_seen for r in rows], dtype=np.float64)
    per_layer = np.array([r.activation_ratio_layers for r in rows]) * 100
    fig, ax = _new_axes(title or "FFN activation ratio during training")
    colours = [f"C{i % 10}" for i in range(per_layer.shape[1])]
    for i in range(per_layer.shape[1]):
        ax.plot(tokens, per_layer[:, i], lw=0.9, alpha=0.7, color=colours[i], label=f"layer {i}")
    ax.plot(tokens, np.array([r.activation_ratio for r in rows]) * 100, lw=2.5, color="black",
            label="mean over layers")
    steps = np.array([r.step for r in rows], dtype=np.float64)
    inside = [b for b in stages if steps[0] <= b <= steps[-1]]
    for i, b in enumerate(inside):
        ax.axvline(float(np.interp(b, steps, tokens)), color="grey", ls="--", lw=1,
                   label="sparsity stage boundary" if i == 0 else None)
    _finish(fig, ax, "tokens seen", "activation ratio (%)", False, None)
    from sparsejax import storage

    out_path = storage.path(out_path) if storage.is_remote(out_path) else Path(out_path)
    save_figure(fig, out_path.with_suffix(""), formats=("png",))
    return out_path.with_suffix(".png")


def plot_eval_results(results: dict, stem) -> list[Path]:
    """eval.py's figures: ratio vs tokens per metric, per-layer heat maps, chunk sparsity vs
    chunk length; ``<stem>_<name>.png`` each."""
    entries = results["checkpoints"]
    names = [m for m in results["metrics"] if any(m in e["results"] for e in entries)]
    if not names:
        return []
    stem, title = Path(stem), f"{results['config_name']} ({results['activation']})"
    label = lambda name: results_lib.metric_label(name, entries)  # noqa: E731
    written = []

    def save(fig, suffix):
        saved = save_figure(fig, stem.with_name(f"{stem.name}_{suffix}"), formats=("png",))
        written.append(Path(f"{saved}.png"))

    fig, ax = _new_axes(f"{title}: activation ratio vs training tokens")
    for name in names:
        pts = [(e["tokens_seen"], e["results"][name]["ratio"] * 100) for e in entries if name in e["results"]]
        ax.plot(*zip(*pts), "o-", label=label(name))
    _finish(fig, ax, "tokens seen", "activation ratio (%)", False, None)
    save(fig, "ratio_vs_tokens")

    fig = Figure(figsize=(3.2 * len(names) + 1, 3.8), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        rows = [e for e in entries if name in e["results"]]
        grid = np.array([e["results"][name]["ratio_layers"] for e in rows]).T * 100
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(rows)), [str(e["step"]) for e in rows], rotation=60, fontsize=7)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("layer")
        ax.set_title(label(name), fontsize=9)
        fig.colorbar(im, ax=ax, label="activation ratio (%)")
    fig.suptitle(f"{title}: per-layer activation ratio")
    save(fig, "layers")

    last = entries[-1]
    fig, ax = _new_axes(f"{title}: neurons inactive for a whole chunk (step {last['step']})")
    for i, (name, r) in enumerate(last["results"].items()):
        lens = [int(n) for n in r["chunk_sparsity"]]
        ax.plot(lens, [v * 100 for v in r["chunk_sparsity"].values()], "o-", color=f"C{i}",
                label=f"{label(name)}: measured")
        ax.plot(lens, [v * 100 for v in r["chunk_sparsity_independent"].values()], "--",
                color=f"C{i}", alpha=0.7, label=f"{name}: independent-neuron prediction")
    ax.set_xscale("log", base=2)
    _finish(fig, ax, "chunk length L (tokens)", "chunk-level sparsity (%)", False, None)
    save(fig, "chunk_sparsity")
    return written
