"""Sweeps: grids of training runs, run one after another, collected into a tidy table and fitted.

A sweep file (``configs/sweeps/*.py``) defines ``get_sweep() -> Sweep``; grids are built by
crossing axes of :class:`Point` (activation × size × width/depth × tokens) with :func:`cross`.

    python -m sparsejax.sweep configs/sweeps/cpu_proxy.py --out runs/cpu_proxy
        [--print-commands] [--skip-eval] [--only RUN,...] [--set key=value ...]
        [--n-boot 200] [--fit-workers N] [--collect-only] [--no-progress]

For each run, ``train.py`` then ``eval.py`` run in subprocesses (workdir ``OUT/runs/<run>``,
output in ``train.log`` / ``eval.log`` there). Resumable: a run whose training finished (marker
``sweep_train_done.json``, written only after train.py exits 0, holding the config) and whose
eval results are newer than the marker is skipped; a half-finished run is simply started again
and train.py resumes from its checkpoints. A failing run is recorded and the sweep goes on.

Then OUT gets ``sweep.json`` (the resolved runs), ``results.csv``/``.json`` (tidy: one row per
run, step and metric, see :data:`COLUMNS`), ``fits.json`` (one Sparsing Law fit per run and
activation-ratio metric, docs/sparsity_metrics_and_laws.md §Laws) and ``plots/`` (PNG + PDF,
:mod:`sparsejax.plotting`).
Exit codes: 0 every run done, 1 a run failed (the summary lists them), 2 bad sweep file/arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from sparsejax import activations, config as config_lib, flops, laws, lifecycle, writers

REPO = pathlib.Path(__file__).resolve().parents[1]
MARKER = "sweep_train_done.json"
COLUMNS = ("run", "activation", "size", "params", "width", "depth", "tokens", "step", "metric", "value")
# The ratio laws take D = training tokens / 1e9 (docs/sparsity_metrics_and_laws.md §Laws).
TOKENS_PER_D = 1e9
DEFAULT_LAWS = {"relu": "relu_ratio", "silu": "silu_ratio"}
DEFAULT_PLOTS = ("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens")
PLOT_KINDS = DEFAULT_PLOTS + ("limit_vs_width_depth",)
EVAL_QUANTITIES = ("ratio", "ppl_ratio", "dead_share")  # eval.py quantity q of metric m -> "m_q"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SweepError(ValueError):
    """A bad sweep file, run or argument; the message names the run and field."""


# --------------------------------------------------------------------------------------------
# Sweep spec: points of an axis, crossed into runs
# --------------------------------------------------------------------------------------------
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
    eval_metrics: tuple[str, ...] = ("zero", "fat", "cett_ppl")
    eval_args: tuple[str, ...] = ()  # extra eval.py arguments, e.g. ("--p", "1")
    laws: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LAWS))
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
    if size not in config_lib.PROXY_SIZES:
        raise SweepError(f"proxy size {size!r} unknown; allowed: {sorted(config_lib.PROXY_SIZES)}")
    d_model, n_layers, *_ = config_lib.PROXY_SIZES[size]
    return Point(size, config=f"configs/{size}_relu.py", size=size, width=d_model, depth=n_layers)


def paper_size_points(sizes: Sequence[str]) -> list[Point]:
    """Sparsing Law sizes (docs/sparsity_metrics_and_laws.md §Paper models) through
    ``configs/sparsing_law_<size>.py``."""
    points = []
    for size in sizes:
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


# --------------------------------------------------------------------------------------------
# Loading and resolving: every run's config is built and validated before anything runs
# --------------------------------------------------------------------------------------------
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


def load_sweep(path: str | pathlib.Path) -> Sweep:
    return config_lib.call_file_function(path, "get_sweep", Sweep, SweepError, "sweep")


def _config_path(config: str) -> pathlib.Path:
    path = pathlib.Path(config)
    return path if path.is_absolute() else REPO / path


def _load_config(run: Run, overrides: Sequence[str]) -> config_lib.Config:
    try:
        return config_lib.load(_config_path(run.config), overrides)
    except config_lib.ConfigError as err:
        raise SweepError(f"run {run.name!r}: {err}") from None


def resolve(sweep: Sweep, global_overrides: Sequence[str] = ()) -> tuple[ResolvedRun, ...]:
    """Validate the sweep and build every run's config; SweepError names the run and the field."""
    from sparsejax.evaluation import METRICS

    if not _NAME_RE.match(sweep.name):
        raise SweepError(f"sweep name {sweep.name!r} must match {_NAME_RE.pattern}")
    for metric in sweep.eval_metrics:
        if metric not in METRICS:
            raise SweepError(f"eval_metrics: {metric!r} unknown; allowed: {list(METRICS)}")
    for act, law in sweep.laws.items():
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
            config_dict=json.loads(json.dumps(config_lib.to_dict(cfg)))))
    return tuple(resolved)


def select(runs: Sequence[ResolvedRun], only: str | None) -> list[ResolvedRun]:
    if not only:
        return list(runs)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {r.name for r in runs}]
    if unknown:
        raise SweepError(f"--only: unknown run(s) {unknown}; runs: {[r.name for r in runs]}")
    return [r for r in runs if r.name in wanted]


# --------------------------------------------------------------------------------------------
# Commands and the sequential runner
# --------------------------------------------------------------------------------------------
def train_command(run: ResolvedRun, workdir, *, python: str = sys.executable,
                  script=REPO / "train.py") -> list[str]:
    cmd = [python, str(script), "--config", str(_config_path(run.config)), "--workdir", str(workdir),
           "--no-progress"]
    for override in run.overrides:
        cmd += ["--set", override]
    return cmd


def eval_command(run: ResolvedRun, workdir, metrics: Sequence[str], extra: Sequence[str] = (), *,
                 python: str = sys.executable, script=REPO / "eval.py") -> list[str]:
    workdir = pathlib.Path(workdir)
    return [python, str(script), "--workdir", str(workdir), "--checkpoints", "all",
            "--metrics", ",".join(metrics), "--out", str(workdir / "eval" / "results.json"),
            "--no-progress", *extra]


def tpu_script(sweep: Sweep, runs: Sequence[ResolvedRun], out: str) -> str:
    """Bash script launching the sweep on a TPU VM; OUT must be a path every host sees."""
    lines = ["#!/usr/bin/env bash",
             f"# sweep {sweep.name}: {len(runs)} runs. Set TPU_NAME and ZONE; {out} must be a path",
             "# every host sees (e.g. a bucket mounted with gcsfuse). Eval runs on worker 0 only.",
             "set -euo pipefail", ': "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"']
    for run in runs:
        workdir = f"{out}/runs/{run.name}"
        train = ["python", "train.py", "--config", run.config, "--workdir", workdir, "--no-progress"]
        for override in run.overrides:
            train += ["--set", override]
        evaluate = ["python", "eval.py", "--workdir", workdir, "--checkpoints", "all", "--metrics",
                    ",".join(sweep.eval_metrics), "--out", f"{workdir}/eval/results.json",
                    "--no-progress", *sweep.eval_args]
        for worker, cmd in (("all", train), ("0", evaluate)):
            lines.append(f'gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker={worker} '
                         f'--command="cd sparsejax && {shlex.join(cmd)}"')
    return "\n".join(lines) + "\n"


def train_done(workdir: pathlib.Path, run: ResolvedRun) -> bool:
    """The run's training marker exists, is readable and names this config.

    A damaged marker (torn by a crash) counts as not done: training is started again, resumes
    from the run's checkpoints, and rewrites the marker.
    """
    marker = workdir / MARKER
    try:
        content = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and content.get("config") == run.config_dict


def eval_done(workdir: pathlib.Path, metrics: Sequence[str]) -> bool:
    """Eval results exist, are newer than the training marker and hold every wanted metric."""
    results, marker = workdir / "eval" / "results.json", workdir / MARKER
    if not (results.exists() and marker.exists()) or results.stat().st_mtime < marker.stat().st_mtime:
        return False
    try:
        return set(metrics) <= set(json.loads(results.read_text()).get("metrics", []))
    except json.JSONDecodeError:
        return False


def _finite(obj):
    """JSON-safe copy: NaN/Inf become null (strict JSON readers reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=1, allow_nan=False))
    tmp.replace(path)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM a child's process group (the trainer saves a checkpoint), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _run_logged(cmd: list[str], log_path: pathlib.Path, *, echo: bool, env) -> int:
    """Run cmd from the repository root; output to log_path (and the console when echo).

    The child gets its own process group and is stopped with the sweep: when the sweep is
    interrupted or terminated, its SIGTERM reaches the trainer, which checkpoints and exits; if
    the sweep is killed outright, the kernel sends the child SIGTERM (``lifecycle.die_with_parent``).
    """
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=lifecycle.child_env(dict(env)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    print(f"    {line}", end="", flush=True)
            return proc.wait()
        finally:
            stop_process_group(proc)


@dataclasses.dataclass
class Outcome:
    run: str
    status: str  # "done", "skipped" or "failed"
    seconds: float = 0.0
    message: str = ""


def execute(sweep: Sweep, runs: Sequence[ResolvedRun], out: pathlib.Path, *, skip_eval: bool = False,
            progress: bool = True, env: Mapping[str, str] | None = None,
            train_cmd: Callable = train_command, eval_cmd: Callable = eval_command,
            log: Callable[[str], None] = print) -> list[Outcome]:
    """Train (and evaluate) each run in turn; a failure is recorded and the next run starts.

    ``train_cmd(run, workdir)`` / ``eval_cmd(run, workdir, metrics, extra)`` build the commands
    (injectable for tests).
    """
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    outcomes, t_sweep = [], time.perf_counter()
    for i, run in enumerate(runs, 1):
        workdir = out / "runs" / run.name
        workdir.mkdir(parents=True, exist_ok=True)
        head = f"[{i}/{len(runs)}] {run.name}"
        need_train = not train_done(workdir, run)
        need_eval = not skip_eval and not eval_done(workdir, sweep.eval_metrics)
        if not (need_train or need_eval):
            log(f"{head}: complete, skipped")
            outcomes.append(Outcome(run.name, "skipped"))
            continue
        t_run, failure = time.perf_counter(), ""
        if need_train:
            log(f"{head}: training ({run.steps} steps, {run.params / 1e6:.2f}M non-embedding params)")
            t0 = time.perf_counter()
            cmd = train_cmd(run, workdir)
            rc = _run_logged(cmd, workdir / "train.log", echo=progress, env=env)
            if rc == 0:
                _write_json(workdir / MARKER, {"run": run.name, "config": run.config_dict, "command": cmd,
                                               "seconds": time.perf_counter() - t0,
                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
            else:
                failure = f"train.py exited {rc} (log: {workdir / 'train.log'})"
        if not failure and need_eval:
            log(f"{head}: evaluating ({','.join(sweep.eval_metrics)})")
            cmd = eval_cmd(run, workdir, sweep.eval_metrics, sweep.eval_args)
            rc = _run_logged(cmd, workdir / "eval.log", echo=progress, env=env)
            if rc != 0:
                failure = f"eval.py exited {rc} (log: {workdir / 'eval.log'})"
        seconds = time.perf_counter() - t_run
        if failure:
            tail = (workdir / ("eval.log" if "eval.py" in failure else "train.log")).read_text()
            log(f"{head}: FAILED: {failure}\n" + "".join(f"    | {x}\n" for x in tail.splitlines()[-8:]))
        log(f"{head}: {'failed' if failure else 'done'} in {seconds:.0f}s "
            f"(sweep elapsed {time.perf_counter() - t_sweep:.0f}s)")
        outcomes.append(Outcome(run.name, "failed" if failure else "done", seconds, failure))
    return outcomes


# --------------------------------------------------------------------------------------------
# Collect: tidy rows from metrics.jsonl and eval/results.json
# --------------------------------------------------------------------------------------------
def _row(run: ResolvedRun, tokens: float, step: int, metric: str, value: float) -> dict:
    return {"run": run.name, "activation": run.activation, "size": run.size, "params": run.params,
            "width": run.width, "depth": run.depth, "tokens": float(tokens), "step": int(step),
            "metric": metric, "value": float(value)}


def metrics_rows(run: ResolvedRun, records: Sequence[dict]) -> list[dict]:
    """train_loss and train_activation_ratio (in-graph: zero-based for the ReLU family, FAT-ε with
    ε = train.fat_eps otherwise) per logged step, and eval_loss; the last record of a step wins."""
    train, evals = {}, {}
    for r in records:
        (train if "loss" in r else evals if "eval_loss" in r else {})[r["step"]] = r
    tokens = {s: r.get("tokens_seen", s * run.tokens_per_step) for s, r in train.items()}
    rows = []
    for s in sorted(train):
        rows.append(_row(run, tokens[s], s, "train_loss", train[s]["loss"]))
        if "activation_ratio" in train[s]:
            rows.append(_row(run, tokens[s], s, "train_activation_ratio", train[s]["activation_ratio"]))
    for s in sorted(evals):
        rows.append(_row(run, tokens.get(s, s * run.tokens_per_step), s, "eval_loss", evals[s]["eval_loss"]))
    return rows


def eval_rows(run: ResolvedRun, results: dict) -> list[dict]:
    """``<metric>_<quantity>`` per checkpoint of eval.py's results.json, plus eval_dense_loss."""
    rows = []
    for ckpt in results.get("checkpoints", []):
        step, tokens = ckpt["step"], ckpt["tokens_seen"]
        rows.append(_row(run, tokens, step, "eval_dense_loss", ckpt["dense_loss"]))
        for metric, res in ckpt.get("results", {}).items():
            rows += [_row(run, tokens, step, f"{metric}_{q}", res[q]) for q in EVAL_QUANTITIES
                     if isinstance(res.get(q), (int, float))]
    return rows


def collect(out: pathlib.Path, runs: Sequence[ResolvedRun]) -> list[dict]:
    rows = []
    for run in runs:
        workdir = out / "runs" / run.name
        if (workdir / "metrics.jsonl").exists():
            rows += metrics_rows(run, writers.read_jsonl(workdir / "metrics.jsonl"))
        if (workdir / "eval" / "results.json").exists():
            rows += eval_rows(run, json.loads((workdir / "eval" / "results.json").read_text()))
    return rows


def write_table(rows: Sequence[dict], out: pathlib.Path) -> None:
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(_finite(list(rows))))


# --------------------------------------------------------------------------------------------
# Fit the Sparsing Law ratio laws per run and ratio metric (docs/sparsity_metrics_and_laws.md)
# --------------------------------------------------------------------------------------------
def ratio_metrics(rows: Sequence[dict]) -> list[str]:
    """Activation-ratio metrics present in rows: train_activation_ratio and ``<eval metric>_ratio``."""
    from sparsejax.evaluation import METRICS

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
    """Bootstrap block length: the in-graph ratio is logged every few steps and its noise is serially
    correlated, so it is resampled in ten runs of neighbouring points (moving-block bootstrap); the
    eval metrics, one point per checkpoint, are resampled point by point."""
    return max(1, n_points // 10) if metric == "train_activation_ratio" else 1


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


# --------------------------------------------------------------------------------------------
# Plots (sparsejax.plotting; PNG + PDF)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Manifest and CLI
# --------------------------------------------------------------------------------------------
def write_manifest(sweep: Sweep, runs: Sequence[ResolvedRun], out: pathlib.Path) -> None:
    _write_json(out / "sweep.json", {"name": sweep.name, "eval_metrics": list(sweep.eval_metrics),
                                     "laws": dict(sweep.laws), "plots": list(sweep.plots),
                                     "runs": [dataclasses.asdict(r) for r in runs]})


def load_manifest(out: str | pathlib.Path) -> tuple[dict, tuple[ResolvedRun, ...]]:
    """(manifest, runs) of a sweep directory written by this module."""
    path = pathlib.Path(out) / "sweep.json"
    if not path.exists():
        raise SweepError(f"{path} does not exist: not a sweep directory (run python -m sparsejax.sweep)")
    manifest = json.loads(path.read_text())
    runs = tuple(ResolvedRun(**{**r, "overrides": tuple(r["overrides"])}) for r in manifest["runs"])
    return manifest, runs


def analyse(out: pathlib.Path, runs: Sequence[ResolvedRun], law_by_activation: Mapping[str, str],
            plots: Sequence[str] = DEFAULT_PLOTS, *, n_boot: int = 200,
            workers: int = 1) -> tuple[list[dict], list[LawFit]]:
    """Collect, fit and plot a sweep directory; writes results.csv/.json, fits.json and plots/."""
    rows = collect(out, runs)
    write_table(rows, out)
    fits = fit_runs(rows, runs, law_by_activation, n_boot=n_boot, workers=workers)
    _write_json(out / "fits.json", [f.to_dict() for f in fits])
    make_plots(rows, runs, fits, out / "plots", plots)
    return rows, fits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsejax.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file defining get_sweep(), e.g. configs/sweeps/cpu_proxy.py")
    p.add_argument("--out", required=True, help="sweep directory (run workdirs, tables, fits, plots)")
    p.add_argument("--print-commands", action="store_true",
                   help="print the local commands and a TPU-VM launch script; run nothing")
    p.add_argument("--skip-eval", action="store_true", help="train only (fits use the in-graph ratio)")
    p.add_argument("--only", default=None, help="comma-separated run names to train/evaluate")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every run, after the run's own (repeatable)")
    p.add_argument("--collect-only", action="store_true", help="only collect, fit and plot OUT")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per fit (0: no CIs)")
    p.add_argument("--fit-workers", type=int, default=os.cpu_count() or 1,
                   help="processes fitting the laws in parallel (default: one per CPU core)")
    p.add_argument("--train-script", default=str(REPO / "train.py"), help=argparse.SUPPRESS)
    p.add_argument("--eval-script", default=str(REPO / "eval.py"), help=argparse.SUPPRESS)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="do not echo the runs' output (progress lines are still printed)")
    return p.parse_args(argv)


def _exit_on_sigterm(signum, frame):
    # Unwinds through _run_logged, which stops the running child before the sweep exits.
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        sweep = load_sweep(args.sweep)
        runs = resolve(sweep, args.overrides)
        selected = select(runs, args.only)
        if args.n_boot < 0:
            raise SweepError(f"--n-boot={args.n_boot} must be >= 0")
        if args.fit_workers < 1:
            raise SweepError(f"--fit-workers={args.fit_workers} must be >= 1")
    except SweepError as err:
        print(f"sweep error: {err}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out).resolve()  # children run from the repository root
    if args.print_commands:
        print(f"# sweep {sweep.name}: {len(selected)} of {len(runs)} runs -> {out}\n# local")
        for run in selected:
            workdir = out / "runs" / run.name
            print(shlex.join(train_command(run, workdir, script=args.train_script)))
            if not args.skip_eval:
                print(shlex.join(eval_command(run, workdir, sweep.eval_metrics, sweep.eval_args,
                                              script=args.eval_script)))
        print("\n# TPU VM\n" + tpu_script(sweep, selected, args.out), end="")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(sweep, runs, out)
    outcomes = []
    if not args.collect_only:
        t0 = time.perf_counter()
        outcomes = execute(
            sweep, selected, out, skip_eval=args.skip_eval, progress=args.progress,
            train_cmd=lambda run, wd: train_command(run, wd, script=args.train_script),
            eval_cmd=lambda run, wd, m, x: eval_command(run, wd, m, x, script=args.eval_script))
        print(f"runs finished in {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    rows, fits = analyse(out, runs, sweep.laws, sweep.plots, n_boot=args.n_boot, workers=args.fit_workers)
    missing = sorted({r.name for r in runs} - {row["run"] for row in rows})
    print(f"collected {len(rows)} rows into {out / 'results.csv'}"
          + (f"; no data yet for {missing}" if missing else ""))
    print(f"fits ({time.perf_counter() - t0:.0f}s, {out / 'fits.json'}; plots in {out / 'plots'}):")
    for fit in fits:
        print("  " + format_fit(fit))
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    if not args.collect_only:
        print(f"summary: {len(outcomes)} runs: {counts['done']} done, {counts['skipped']} skipped, "
              f"{counts['failed']} failed")
    for o in failed:
        print(f"  FAILED {o.run}: {o.message}")
    return 1 if failed else 0


if __name__ == "__main__":
    # Run main() of the importable module, not of __main__: sweep files import sparsejax.sweep, and
    # their Sweep must be the class main() checks against.
    from sparsejax import sweep as _module

    sys.exit(_module.main())
