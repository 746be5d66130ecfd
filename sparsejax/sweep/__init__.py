"""Sweeps: grids of training runs, run, collected into a tidy table, fitted and plotted.

A package of one module per concern:

* :mod:`~sparsejax.sweep.spec`: what a sweep file builds (``Point``, ``Run``, ``Sweep``, ``cross``
  and the point helpers); no JAX or SciPy import, so sweep files load instantly;
* :mod:`~sparsejax.sweep.resolved`: every run's config built and validated before anything runs;
* :mod:`~sparsejax.sweep.runner`: the resumable local runner and the command lines;
* :mod:`~sparsejax.sweep.table`: the tidy table; :mod:`~sparsejax.sweep.fits`: law fits;
  :mod:`~sparsejax.sweep.figures`: plots; :mod:`~sparsejax.sweep.cli`: ``python -m sparsejax.sweep``.

The names below are importable from ``sparsejax.sweep``; all but the spec's load on first use.
"""

from __future__ import annotations

import importlib

from sparsejax.eval_options import EvalOptions
from sparsejax.sweep.spec import (DEFAULT_PLOTS, PLOT_KINDS, Point, Run, Sweep, SweepError,
                                  activation_points, cross, depth_for_width, load_sweep,
                                  paper_size_points, proxy_size_point, shape_point, steps_points,
                                  width_depth_points)

_LAZY = {
    "resolved": ("REPO", "ResolvedRun", "law_map", "resolve", "select", "config_path"),
    "runner": ("MARKER", "Outcome", "SINGLE_THREAD_XLA_FLAGS", "eval_command", "eval_done", "execute",
               "single_threaded", "stop_process_group",
               "tpu_script", "train_command", "train_done", "write_json"),
    "table": ("COLUMNS", "EVAL_QUANTITIES", "collect", "eval_rows", "metrics_rows", "write_table"),
    "fits": ("TOKENS_PER_D", "LawFit", "bootstrap_block", "fit_run_metric", "fit_runs",
             "format_fit", "ratio_metrics"),
    "figures": ("make_plots", "plot_ratio_fits"),
    "cli": ("analyse", "load_manifest", "main", "parse_args", "write_manifest"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"sparsejax.sweep.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'sparsejax.sweep' has no attribute {name!r}")


__all__ = ["DEFAULT_PLOTS", "EvalOptions", "PLOT_KINDS", "Point", "Run", "Sweep", "SweepError",
           "activation_points", "cross", "depth_for_width", "load_sweep", "paper_size_points",
           "proxy_size_point", "shape_point", "steps_points", "width_depth_points", *_WHERE]
