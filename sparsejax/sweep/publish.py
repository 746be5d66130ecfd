"""Publishing a finished sweep's small results into the repository (``--publish DIR``).

The finding notebook reads committed results by default, so anyone can re-run the analysis without
retraining and every README number traces to a file. A published directory holds:

* ``sweep.json`` — the resolved runs (configs, parameter counts), as the sweep wrote it;
* ``fits.json`` — the per-run law fits (limit A0 with its moving-block bootstrap interval);
* ``table.csv`` — the tidy table (:data:`sparsejax.sweep.table.COLUMNS`): every eval row (one per
  checkpoint) and the in-graph training rows thinned to at most :data:`MAX_TRAIN_POINTS` steps per
  run (evenly spaced, the last step always kept), so the file stays small;
* ``plateaus.csv`` — each run's plateau test (:func:`sparsejax.sweep.protocol.plateau_verdict`)
  on its CETT-PPL-1% ratio and, for activations with exact zeros, its zero-criterion ratio, at the
  checkpoints after warm-up: verdict, level, change per decade with its interval;
* ``provenance.json`` — the commit (and whether the tree had uncommitted changes), date, machine,
  library versions and each run's training and evaluation seconds.
"""

from __future__ import annotations

import json
import math
import pathlib
import platform
import shutil
import subprocess
import time
from typing import Sequence

from sparsejax import rundir
from sparsejax.sweep.runner import write_json
from sparsejax.sweep import protocol
from sparsejax.sweep.table import TABLE_CSV, write_csv_rows

MAX_TRAIN_POINTS = 200
TRAIN_METRICS = ("train_loss", "train_activation_ratio")


def thin(rows: Sequence[dict], max_points: int = MAX_TRAIN_POINTS) -> list[dict]:
    """All non-training rows, and each run's training rows at <= ``max_points`` steps (last kept)."""
    steps: dict[str, list[int]] = {}
    for r in rows:
        if r["metric"] in TRAIN_METRICS:
            steps.setdefault(r["run"], []).append(r["step"])
    keep = {}
    for run, s in steps.items():
        s = sorted(set(s))
        stride = max(1, -(-len(s) // max_points))
        keep[run] = set(s[len(s) - 1::-stride])
    return [r for r in rows if r["metric"] not in TRAIN_METRICS or r["step"] in keep[r["run"]]]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=pathlib.Path(__file__).resolve().parents[2],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(out: pathlib.Path, run_names: Sequence[str]) -> dict:
    import os

    import jax

    runs = {}
    for name in run_names:
        run = rundir.sweep_run(out, name)
        entry = {}
        if run.sweep_marker.exists():
            marker = json.loads(run.sweep_marker.read_text())
            entry.update(train_seconds=round(marker.get("seconds", 0.0), 1), finished=marker.get("finished"))
        results = run.eval_results
        if results.exists():
            entry["eval_seconds"] = round(json.loads(results.read_text()).get("seconds", 0.0), 1)
        runs[name] = entry
    # The commit checked out when the results were published (the sweep's training ran on the same
    # code unless the tracked files changed meanwhile); untracked files (other published results)
    # do not count as changes.
    return {"commit": _git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "jax": jax.__version__},
            "runs": runs}


PLATEAUS_CSV = "plateaus.csv"
PLATEAU_COLUMNS = ("run", "metric", "verdict", "level", "slope_per_decade", "slope_lo", "slope_hi",
                   "change_of_level", "n_points", "tokens_from", "tokens_to")


def plateau_rows(rows: Sequence[dict], runs: Sequence) -> list[dict]:
    """Each run's plateau tests (:func:`sparsejax.sweep.protocol.run_plateaus`) as rows of
    :data:`PLATEAU_COLUMNS`."""
    return [{"run": run.name, "metric": metric, "verdict": p.verdict, "level": p.level,
             "slope_per_decade": p.slope, "slope_lo": p.slope_ci[0], "slope_hi": p.slope_ci[1],
             "change_of_level": p.change, "n_points": p.n_points,
             "tokens_from": p.window[0], "tokens_to": p.window[1]}
            for run in runs for metric, p in protocol.run_plateaus(rows, run).items()]


def write_plateaus(dest: pathlib.Path, rows: Sequence[dict], runs: Sequence) -> None:
    """``dest/plateaus.csv`` (:data:`PLATEAU_COLUMNS`; NaN as an empty cell), written atomically."""
    blank = lambda v: "" if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
    cells = [{k: blank(v) for k, v in r.items()} for r in plateau_rows(rows, runs)]
    rundir.atomic_write(dest / PLATEAUS_CSV, lambda p: write_csv_rows(cells, p, PLATEAU_COLUMNS))


def publish(out: pathlib.Path, dest: pathlib.Path, rows: Sequence[dict], runs: Sequence) -> None:
    """Write the published copy of sweep directory ``out`` (its resolved ``runs``) to ``dest``
    (files replaced whole)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("sweep.json", "fits.json"):
        shutil.copyfile(out / name, dest / f".{name}.tmp")
        (dest / f".{name}.tmp").replace(dest / name)
    rundir.atomic_write(dest / TABLE_CSV, lambda p: write_csv_rows(thin(rows), p))
    write_plateaus(dest, rows, runs)
    write_json(dest / "provenance.json", provenance(out, [r.name for r in runs]))
