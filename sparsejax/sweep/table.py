"""Collecting a sweep: one tidy table (:data:`COLUMNS`) from every run's metrics and eval results."""

from __future__ import annotations

import csv
import pathlib
from typing import Sequence

from sparsejax import results, rundir, writers
from sparsejax.sweep.resolved import ResolvedRun
from sparsejax.sweep.runner import write_json

COLUMNS = results.TABLE_COLUMNS  # the fields of results.TableRow
EVAL_QUANTITIES = ("ratio", "ppl_ratio", "dead_share")  # eval.py quantity q of metric m -> "m_q"


def _row(run: ResolvedRun, tokens: float, step: int, metric: str, value: float) -> dict:
    return results.TableRow(run=run.name, activation=run.activation, size=run.size,
                            params=run.params, width=run.width, depth=run.depth,
                            tokens=float(tokens), step=int(step), metric=metric,
                            value=float(value)).to_dict()


def metrics_rows(run: ResolvedRun, records: Sequence[dict]) -> list[dict]:
    """train_loss and train_activation_ratio (in-graph: zero-based for the ReLU family, FAT-ε with
    ε = sparsity.fat_eps otherwise) per logged step, and eval_loss; the last record of a step wins."""
    train, evals = results.training_records(records)
    tokens = {s: s * run.tokens_per_step if r.tokens_seen is None else r.tokens_seen
              for s, r in train.items()}
    rows = []
    for s in sorted(train):
        rows.append(_row(run, tokens[s], s, "train_loss", train[s].loss))
        if train[s].activation_ratio is not None:
            rows.append(_row(run, tokens[s], s, "train_activation_ratio", train[s].activation_ratio))
    for s in sorted(evals):
        rows.append(_row(run, tokens.get(s, s * run.tokens_per_step), s, "eval_loss", evals[s].eval_loss))
    return rows


def eval_rows(run: ResolvedRun, results_json: dict) -> list[dict]:
    """``<metric>_<quantity>`` per checkpoint of eval.py's results.json (the layer means of
    :func:`sparsejax.results.checkpoint_rows`), plus ``eval_dense_loss``."""
    rows = []
    for r in results.checkpoint_rows(results_json):
        if r["layer"] != "mean":
            continue
        if r["metric"] == "dense":
            rows.append(_row(run, r["tokens_seen"], r["step"], "eval_dense_loss", r["value"]))
        elif r["quantity"] in EVAL_QUANTITIES and isinstance(r["value"], (int, float)):
            rows.append(_row(run, r["tokens_seen"], r["step"], f"{r['metric']}_{r['quantity']}", r["value"]))
    return rows


def collect(out: pathlib.Path, runs: Sequence[ResolvedRun]) -> list[dict]:
    rows = []
    for run in runs:
        files = rundir.sweep_run(out, run.name)
        if files.metrics.exists():
            rows += metrics_rows(run, writers.read_jsonl(files.metrics))
        if files.eval_results.exists():
            rows += eval_rows(run, results.load_results(files.eval_results))
    return rows


def write_csv_rows(rows: Sequence[dict], path: pathlib.Path, columns: Sequence[str] = COLUMNS) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# The sweep's table: named apart from eval.py's results.json / results.csv (a different schema).
TABLE_JSON, TABLE_CSV = "table.json", "table.csv"
# The table's older file names (still read: sweeps on disk, published copies; CHANGELOG.md).
LEGACY_JSON, LEGACY_CSV = "results.json", "results.csv"


def write_table(rows: Sequence[dict], out: pathlib.Path) -> None:
    """OUT/table.csv and OUT/table.json (the same rows), each written whole."""
    rundir.atomic_write(out / TABLE_CSV, lambda path: write_csv_rows(rows, path))
    write_json(out / TABLE_JSON, list(rows))


_CSV_TYPES = {"params": int, "width": int, "depth": int, "step": int, "tokens": float, "value": float}


def _csv_row(row: dict) -> dict:
    out = dict(row)
    for key, kind in _CSV_TYPES.items():
        text = row.get(key, "")
        out[key] = None if text in ("", "None") else kind(float(text)) if kind is int else kind(text)
    if out["value"] is not None and out["value"] != out["value"]:  # NaN: as JSON's null
        out["value"] = None
    out["activation"] = row.get("activation") or None
    return out


def load_table(out) -> list[dict]:
    """The tidy rows a sweep wrote (OUT/table.json, as :func:`write_table`; table.csv when the
    directory is a published copy without the JSON; the same files under their older names,
    results.json / results.csv, in a sweep directory written by an older version)."""
    import json

    out = pathlib.Path(out)
    for json_name, csv_name in ((TABLE_JSON, TABLE_CSV), (LEGACY_JSON, LEGACY_CSV)):
        if (out / json_name).exists():
            rows = json.loads((out / json_name).read_text())
            if isinstance(rows, list):  # results.json of eval.py is an object: not a table
                return [results.TableRow.from_dict(r).to_dict() for r in rows]
        if (out / csv_name).exists():
            # a published sweep (sparsejax.sweep.publish) carries only the CSV
            with (out / csv_name).open(newline="") as f:
                return [results.TableRow.from_dict(_csv_row(r)).to_dict()
                        for r in csv.DictReader(f)]
    raise FileNotFoundError(f"{out / TABLE_JSON} does not exist: run the sweep "
                            f"(python -m sparsejax.sweep ...) first")


def series(rows: Sequence[dict], run: str, metric: str, *, after_step: int = -1):
    """(tokens, values) of one run and metric, by step, steps > ``after_step`` (NumPy arrays;
    null values, written for NaN, are dropped)."""
    import numpy as np

    pts = sorted((r["step"], r["tokens"], r["value"]) for r in rows
                 if r["run"] == run and r["metric"] == metric and r["step"] > after_step
                 and r["value"] is not None)
    return np.array([p[1] for p in pts], dtype=float), np.array([p[2] for p in pts], dtype=float)


def final_value(rows: Sequence[dict], run: str, metric: str, *, tail: float = 0.0) -> float | None:
    """A run's metric at its last step, or (``tail`` > 0) the mean over the last ``tail`` share of
    its points (at least one); None when the run has no such rows."""
    _, values = series(rows, run, metric)
    if not len(values):
        return None
    k = max(1, int(round(tail * len(values))))
    return float(values[-k:].mean())
