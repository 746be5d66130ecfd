"""Resolving a sweep: every run's config built and validated before anything runs."""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Mapping, Sequence

from sparsejax import config as config_lib, flops, laws
from sparsejax import configure
from sparsejax.eval_options import EvalOptions
from sparsejax.sweep.spec import PLOT_KINDS, Run, Sweep, SweepError

REPO = pathlib.Path(__file__).resolve().parents[2]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def law_map(sweep: Sweep) -> Mapping[str, str]:
    """activation -> law name: the sweep's own, or the paper's law of each activation."""
    return dict(laws.PUBLISHED_LAW) if sweep.laws is None else dict(sweep.laws)


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """A run with its validated config: what the runner executes and the collector labels rows with."""

    name: str
    config: str
    overrides: tuple[str, ...]  # name=<run>, the run's own, then the sweep-wide --set ones
    activation: str
    size: str
    width: int
    depth: int
    params: int  # non-embedding parameters (the paper names models by this count)
    tokens_per_step: int
    steps: int
    warmup_steps: int
    config_dict: dict


def config_path(config: str) -> pathlib.Path:
    path = pathlib.Path(config)
    return path if path.is_absolute() else REPO / path


def _load_config(run: Run, overrides: Sequence[str]) -> config_lib.Config:
    try:
        return configure.load(config_path(run.config), overrides)
    except config_lib.ConfigError as err:
        raise SweepError(f"run {run.name!r}: {err}") from None


def resolve(sweep: Sweep, global_overrides: Sequence[str] = ()) -> tuple[ResolvedRun, ...]:
    """Validate the sweep and build every run's config; SweepError names the run and the field."""
    if not _NAME_RE.match(sweep.name):
        raise SweepError(f"sweep name {sweep.name!r} must match {_NAME_RE.pattern}")
    if not isinstance(sweep.eval, EvalOptions):
        raise SweepError(f"eval={sweep.eval!r} must be an EvalOptions (sparsejax.sweep.EvalOptions)")
    for act, law in law_map(sweep).items():
        if law not in laws.LAWS:
            raise SweepError(f"laws[{act!r}]={law!r} unknown; allowed: {sorted(laws.LAWS)}")
    for kind in sweep.plots:
        if kind not in PLOT_KINDS:
            raise SweepError(f"plots: {kind!r} unknown; allowed: {list(PLOT_KINDS)}")
    if not sweep.runs:
        raise SweepError(f"sweep {sweep.name!r} has no runs")
    names = [r.name for r in sweep.runs]
    if len(set(names)) != len(names):
        raise SweepError(f"duplicate run names: {sorted({n for n in names if names.count(n) > 1})}")
    resolved = []
    for run in sweep.runs:
        if not _NAME_RE.match(run.name):
            raise SweepError(f"run name {run.name!r} must match {_NAME_RE.pattern} (it names a directory)")
        own = _load_config(run, run.overrides)
        for field, value, path in (("activation", own.model.activation, "model.activation"),
                                   ("width", own.model.d_model, "model.d_model"),
                                   ("depth", own.model.n_layers, "model.n_layers")):
            declared = getattr(run, field)
            if declared is not None and declared != value:
                raise SweepError(f"run {run.name!r}: declared {field}={declared!r} but {path}={value!r}")
        overrides = (f"name={run.name}", *run.overrides, *global_overrides)
        cfg = _load_config(run, overrides)
        m, t = cfg.model, cfg.train
        resolved.append(ResolvedRun(
            name=run.name, config=run.config, overrides=overrides, activation=m.activation,
            size=run.size, width=m.d_model, depth=m.n_layers,
            params=flops.param_counts(m).non_embedding, tokens_per_step=t.batch_size * t.seq_len,
            steps=t.steps, warmup_steps=t.warmup_steps,
            config_dict=config_lib.to_json_dict(cfg)))
    return tuple(resolved)


def select(runs: Sequence[ResolvedRun], only: str | None) -> list[ResolvedRun]:
    if not only:
        return list(runs)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {r.name for r in runs}]
    if unknown:
        raise SweepError(f"--only: unknown run(s) {unknown}; runs: {[r.name for r in runs]}")
    return [r for r in runs if r.name in wanted]
