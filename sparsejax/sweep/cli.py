"""Sweeps: grids of training runs, run one after another, collected into a tidy table and fitted.

A sweep file (``configs/sweeps/*.py``) defines ``get_sweep() -> Sweep``; grids are built by
crossing axes of :class:`Point` (activation × size × width/depth × tokens) with :func:`cross`.

    python -m sparsejax.sweep configs/sweeps/cpu_proxy.py --out runs/cpu_proxy
        [--print-commands] [--skip-eval] [--only RUN,...] [--set key=value ...]
        [--jobs N] [--n-boot 200] [--fit-workers N] [--collect-only] [--publish DIR] [--no-progress]

For each run, ``train.py`` then ``eval.py`` run in subprocesses (workdir ``OUT/runs/<run>``,
output in ``train.log`` / ``eval.log`` there). Resumable: a run whose training finished (marker
``sweep_train_done.json``, written only after train.py exits 0, holding the config) and whose
eval results are newer than the marker is skipped; a half-finished run is simply started again
and train.py resumes from its checkpoints. A failing run is recorded and the sweep goes on.
``--jobs N`` runs N at a time, each child on one intra-op thread (its output then in its logs only).

Then OUT gets ``sweep.json`` (the resolved runs), ``table.csv``/``.json`` (tidy: one row per
run, step and metric, see :data:`COLUMNS`), ``fits.json`` (one Sparsing Law fit per run and
activation-ratio metric, docs/sparsity_metrics_and_laws.md §Laws) and ``plots/`` (PNG + PDF,
:mod:`sparsejax.plotting`). ``--publish DIR`` then copies the small results of a complete sweep
into DIR (:mod:`sparsejax.sweep.publish`; the findings notebook reads notebooks/results/ by default).
Exit codes: 0 every run done, 1 a run failed or --publish found runs without data (the summary
lists them), 2 bad sweep file/arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import shlex
import signal
import sys
import time
from typing import Mapping, Sequence

from sparsejax import rundir
from sparsejax.launch import targets
from sparsejax.sweep.table import collect, write_table
from sparsejax.sweep.figures import make_plots
from sparsejax.sweep.fits import LawFit, fit_runs, format_fit
from sparsejax.sweep.resolved import REPO, ResolvedRun, law_map, resolve, select
from sparsejax.sweep.spec import load_sweep
from sparsejax.sweep.runner import eval_command, execute, tpu_script, train_command, write_json
from sparsejax.sweep.spec import DEFAULT_PLOTS, Sweep, SweepError


def write_manifest(sweep: Sweep, runs: Sequence[ResolvedRun], out: pathlib.Path) -> None:
    write_json(out / "sweep.json", {"name": sweep.name, "eval": dataclasses.asdict(sweep.eval),
                                    "laws": law_map(sweep), "plots": list(sweep.plots),
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
    """Collect, fit and plot a sweep directory; writes table.csv/.json, fits.json and plots/."""
    rows = collect(out, runs)
    write_table(rows, out)
    fits = fit_runs(rows, runs, law_by_activation, n_boot=n_boot, workers=workers)
    write_json(out / "fits.json", [f.to_dict() for f in fits])
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
    choices = targets.sweep_targets()
    p.add_argument("--launch", choices=choices, default="local",
                   help=f"local: train here, one run after another (default); "
                        f"{' / '.join(c for c in choices if c != 'local')}: submit one job per "
                        f"unfinished run (OUT a gs:// URL; see sparsejax.launch.jobs)")
    p.add_argument("--launch-opts", default="", metavar='"--tpu-type ... [--run]"',
                   help="the target's options, as python -m sparsejax.launch TARGET takes them "
                        "(less --name, which the sweep sets per run), e.g. --tpu-type v5e-256 "
                        f"--cluster C --image IMG --run (--max-restarts defaults to "
                        f"{targets.MAX_RESTARTS})")
    p.add_argument("--publish", default=None, metavar="DIR",
                   help="after a complete sweep, copy its small results (sweep.json, fits.json, a thinned "
                        "table.csv, plateaus.csv, provenance.json) to DIR, e.g. notebooks/results/cpu_scale")
    p.add_argument("--jobs", type=int, default=1,
                   help="local runs at a time, each child single-threaded (default 1: one after "
                        "another, with the machine's threads)")
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


def _check_publish_dir(text: str, out: pathlib.Path) -> None:
    """--publish must name a local directory (existing or creatable) other than the sweep's own."""
    dest = pathlib.Path(text)
    if text.startswith("gs://"):
        raise SweepError(f"--publish {text}: a local directory (the repository's notebooks/results/...), "
                         f"not a bucket")
    if dest.exists() and not dest.is_dir():
        raise SweepError(f"--publish {dest} exists and is not a directory")
    if dest.resolve() == out.resolve():
        raise SweepError(f"--publish {dest} is the sweep directory itself; name another directory")
    parent = next(p for p in (dest.resolve(), *dest.resolve().parents) if p.exists())
    if not os.access(parent, os.W_OK):
        raise SweepError(f"--publish {dest}: {parent} is not writable")


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
        if args.jobs < 1:
            raise SweepError(f"--jobs={args.jobs} must be >= 1")
        if args.jobs > 1 and args.launch != "local":
            raise SweepError(f"--jobs={args.jobs} applies to --launch local; --launch {args.launch} "
                             f"submits one job per run")
        if args.publish:
            _check_publish_dir(args.publish, pathlib.Path(args.out))
    except SweepError as err:
        print(f"sweep error: {err}", file=sys.stderr)
        return 2
    if args.launch != "local" and not args.collect_only:
        from sparsejax.launch import cloud, jobs
        from sparsejax.sweep.runner import MARKER, train_done

        try:
            return jobs.submit_sweep(args.launch, args.launch_opts, sweep.name, selected, args.out,
                                     train_done, MARKER)
        except cloud.CloudError as err:
            print(f"sweep error: {err}", file=sys.stderr)
            return 2
    out = pathlib.Path(args.out).resolve()  # children run from the repository root
    if args.print_commands:
        print(f"# sweep {sweep.name}: {len(selected)} of {len(runs)} runs -> {out}\n# local")
        for run in selected:
            workdir = rundir.sweep_run(out, run.name).root
            print(shlex.join(train_command(run, workdir, script=args.train_script)))
            if not args.skip_eval:
                print(shlex.join(eval_command(run, workdir, sweep.eval, script=args.eval_script)))
        print("\n# TPU VM\n" + tpu_script(sweep, selected, args.out), end="")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(sweep, runs, out)
    outcomes = []
    if not args.collect_only:
        t0 = time.perf_counter()
        outcomes = execute(
            sweep, selected, out, skip_eval=args.skip_eval, progress=args.progress, jobs=args.jobs,
            train_cmd=lambda run, wd: train_command(run, wd, script=args.train_script),
            eval_cmd=lambda run, wd, options: eval_command(run, wd, options, script=args.eval_script))
        print(f"runs finished in {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    rows, fits = analyse(out, runs, law_map(sweep), sweep.plots, n_boot=args.n_boot, workers=args.fit_workers)
    missing = sorted({r.name for r in runs} - {row["run"] for row in rows})
    print(f"collected {len(rows)} rows into {out / 'table.csv'}"
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
    if args.publish:
        if failed or missing:
            print(f"not published to {args.publish}: runs failed or have no data "
                  f"({sorted({o.run for o in failed} | set(missing))})", file=sys.stderr)
            return 1
        from sparsejax.sweep import publish

        publish.publish(out, pathlib.Path(args.publish), rows, runs)
        print(f"published to {args.publish}")
    return 1 if failed else 0
