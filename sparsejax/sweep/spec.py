"""Sweep specs: points of a grid axis, crossed into runs (no JAX or SciPy import).

A sweep file (``configs/sweeps/*.py``) defines ``get_sweep() -> Sweep``; grids are built by
crossing axes of :class:`Point` (activation × size × width/depth × tokens) with :func:`cross`.
Loading a sweep file and calling ``get_sweep()`` imports neither JAX nor SciPy; configs are
built and validated later, by :func:`sparsejax.sweep.resolved.resolve`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

from sparsejax.eval_options import EvalOptions

DEFAULT_PLOTS = ("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens")
PLOT_KINDS = DEFAULT_PLOTS + ("limit_vs_width_depth",)


class SweepError(ValueError):
    """A bad sweep file, run or argument; the message names the run and field."""


def load_sweep(path) -> "Sweep":
    """``get_sweep()`` of a sweep file (errors name the file and line, as for config files)."""
    from sparsejax import config as config_lib

    return config_lib.call_file_function(path, "get_sweep", Sweep, SweepError, "sweep")


@dataclasses.dataclass(frozen=True)
class Point:
    """One value of a grid axis: a name part, ``--set`` overrides and the grid metadata it fixes."""

    label: str
    overrides: tuple[str, ...] = ()
    config: str | None = None  # base config file (relative to the repository), if this axis picks it
    activation: str | None = None
    size: str | None = None
    width: int | None = None  # d_model
    depth: int | None = None  # n_layers


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: base config file + overrides, and its declared grid metadata."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    activation: str | None = None
    size: str = ""
    width: int | None = None
    depth: int | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    runs: tuple[Run, ...]
    # What eval.py measures for every run; validated when the sweep file is loaded.
    eval: EvalOptions = EvalOptions()
    # activation -> law name in sparsejax.laws.LAWS; None: the paper's law of each activation
    # (laws.PUBLISHED_LAW).
    laws: Mapping[str, str] | None = None
    plots: tuple[str, ...] = DEFAULT_PLOTS


def cross(*axes: Sequence[Point], config: str | None = None, common: Sequence[str] = ()) -> tuple[Run, ...]:
    """All combinations of the axes' points; names join the labels with "_".

    Overrides are ``common`` then each point's, in axis order (later wins, as on the command line);
    a later point's config/metadata replaces an earlier one's.
    """
    runs = []
    for combo in itertools.product(*axes):
        name = "_".join(p.label for p in combo)
        fields = {"config": config, "activation": None, "size": "", "width": None, "depth": None}
        overrides = list(common)
        for point in combo:
            overrides += point.overrides
            fields.update({k: getattr(point, k) for k in fields if getattr(point, k) is not None})
        if fields["config"] is None:
            raise SweepError(f"run {name!r}: no base config (pass config= or a Point with config)")
        runs.append(Run(name=name, overrides=tuple(overrides), **fields))
    return tuple(runs)


def activation_points(names: Sequence[str]) -> list[Point]:
    return [Point(n, (f"model.activation={n}",), activation=n) for n in names]


def shape_point(label: str, *, d_model: int, n_layers: int, n_heads: int, head_dim: int, d_ff: int,
                config: str | None = None, size: str | None = None) -> Point:
    """A model shape given by overrides (for sizes that have no config file)."""
    overrides = (f"model.d_model={d_model}", f"model.n_layers={n_layers}", f"model.n_heads={n_heads}",
                 f"model.head_dim={head_dim}", f"model.d_ff={d_ff}")
    return Point(label, overrides, config=config, size=size or label, width=d_model, depth=n_layers)


def proxy_size_point(size: str) -> Point:
    """A CPU proxy size (config.PROXY_SIZES) through its config file ``configs/<size>_relu.py``."""
    from sparsejax import config as config_lib

    if size not in config_lib.PROXY_SIZES:
        raise SweepError(f"proxy size {size!r} unknown; allowed: {sorted(config_lib.PROXY_SIZES)}")
    d_model, n_layers, *_ = config_lib.PROXY_SIZES[size]
    return Point(size, config=f"configs/{size}_relu.py", size=size, width=d_model, depth=n_layers)


def paper_size_points(sizes: Sequence[str]) -> list[Point]:
    """Sparsing Law sizes (docs/sparsity_metrics_and_laws.md §Paper models) through
    ``configs/sparsing_law_<size>.py``."""
    points = []
    for size in sizes:
        from sparsejax import config as config_lib

        if size not in config_lib.PAPER_SIZES:
            raise SweepError(f"paper size {size!r} unknown; allowed: {sorted(config_lib.PAPER_SIZES)}")
        d_model, n_layers, *_ = config_lib.PAPER_SIZES[size]
        points.append(Point(size, config=f"configs/sparsing_law_{size}.py", size=size.upper(),
                            width=d_model, depth=n_layers))
    return points


def steps_points(steps: Sequence[int]) -> list[Point]:
    """A training-length (tokens) axis."""
    return [Point(f"{s}steps", (f"train.steps={s}",)) for s in steps]


def depth_for_width(d_model: int, target_non_embedding: int, *, head_dim: int = 128,
                    ffn_ratio: float = 2.5) -> tuple[int, float]:
    """Layers that bring a d_model-wide model (heads of ``head_dim``, d_ff = ffn_ratio·d_model,
    docs/sparsity_metrics_and_laws.md §Paper models) closest to ``target_non_embedding``
    parameters; returns (depth, relative error)."""
    from sparsejax import config as config_lib, flops

    shape = config_lib.ModelConfig(d_model=d_model, n_layers=1, n_heads=max(1, d_model // head_dim),
                                   head_dim=head_dim, d_ff=int(round(ffn_ratio * d_model)))
    per_layer = flops.param_counts(shape).non_embedding - d_model  # the final norm is not per layer
    depth = max(1, round((target_non_embedding - d_model) / per_layer))
    got = depth * per_layer + d_model
    return depth, got / target_non_embedding - 1.0


def width_depth_points(widths: Sequence[int], target_non_embedding: int, *, head_dim: int = 128,
                       size: str = "") -> list[Point]:
    """Width/depth axis at fixed non-embedding parameters (Sparsing Law width/depth study;
    docs/sparsity_metrics_and_laws.md §Laws)."""
    points = []
    for d_model in widths:
        depth, _ = depth_for_width(d_model, target_non_embedding, head_dim=head_dim)
        points.append(shape_point(f"w{d_model}_l{depth}", d_model=d_model, n_layers=depth,
                                  n_heads=max(1, d_model // head_dim), head_dim=head_dim,
                                  d_ff=int(round(2.5 * d_model)), size=size or None))
    return points
