"""The results schemas, each one dataclass built by the code that produces it, and the one
flattener everyone uses.

* :class:`EvalResults` (of :class:`CheckpointResult` of :class:`MetricResult`): eval.py's
  ``results.json``, built by :mod:`sparsejax.evaluation`;
* :class:`TrainRecord` / :class:`EvalRecord`: the lines of a run's ``metrics.jsonl``, built by
  the trainer;
* :class:`TableRow`: a sweep's tidy table (``table.csv``), built by :mod:`sparsejax.sweep.table`.

Each ``to_dict`` writes the JSON form below and each ``from_dict`` reads it back, so a field
renamed here fails in one place; readers (the sweep table, plots, the LR pilot) go through
``from_dict``. Fields an earlier version did not write read as their defaults.

``results.json`` (written by :func:`write_results`, produced by ``evaluation.evaluate_run``)::

    {workdir, config_name, activation, ffn_type, d_model, n_layers, d_ff,
     params: {total, non_embedding}, eval_tokens, eval_batches, metrics: [names],
     options: {EvalOptions}, cett_ppl: {mode, cett, ...} | null (each registered metric with a
     run-level search: its result, null when not asked for), forward_passes, seconds,
     vanished_steps: [steps a live trainer deleted while eval read them, skipped; only if any],
     checkpoints: [{step, tokens_seen, dense_loss, dense_perplexity,
                    histograms: {edges, counts_layers},
                    results: {metric: {ratio, ratio_layers, loss, perplexity, ppl_ratio,
                                       dead_share, dead_share_layers, chunk_sparsity: {L: v},
                                       chunk_sparsity_independent: {L: v}, <metric parameters>}}}]}

:func:`checkpoint_rows` flattens it into tidy rows ``(step, tokens_seen, metric, layer,
quantity, value)``: the CSV written next to it, and what sweeps collect. Training metrics
(``metrics.jsonl``) are read by :func:`training_records`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from sparsejax import eval_metrics, rundir

CSV_FIELDS = ("step", "tokens_seen", "metric", "layer", "quantity", "value")
LAYER_QUANTITIES = ("ratio", "dead_share")  # also per layer, as "<quantity>_layers"
MEAN_QUANTITIES = ("loss", "ppl_ratio")
MAX_LOG_PERPLEXITY = 50.0  # exp(50) ≈ 5e21: a diverged loss reads as huge, not as overflow


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged loss does not overflow."""
    return math.exp(min(float(loss), MAX_LOG_PERPLEXITY))


# --------------------------------------------------------------------------- the schemas
@dataclasses.dataclass
class MetricResult:
    """One sparsity metric's pass over the evaluation set at one checkpoint. ``params``: the
    metric's own parameters (``eps``, ``k``/``fraction``, ``cett``, ``thresholds``, ``p``, ...),
    written beside the quantities."""

    ratio_layers: list[float]
    dead_share_layers: list[float]
    loss: float
    ppl_ratio: float
    chunk_sparsity: dict[str, float]
    chunk_sparsity_independent: dict[str, float]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        # np.mean, the one averaging rule of every layer mean here (its order decides the last bit).
        return {"ratio": float(np.mean(self.ratio_layers)),
                "ratio_layers": list(self.ratio_layers), "loss": self.loss,
                "perplexity": perplexity(self.loss), "ppl_ratio": self.ppl_ratio,
                "dead_share": float(np.mean(self.dead_share_layers)),
                "dead_share_layers": list(self.dead_share_layers),
                "chunk_sparsity": dict(self.chunk_sparsity),
                "chunk_sparsity_independent": dict(self.chunk_sparsity_independent),
                **self.params}


@dataclasses.dataclass
class CheckpointResult:
    """Every metric at one checkpoint, with the dense pass's loss and activation histograms."""

    step: int
    tokens_seen: float
    dense_loss: float
    histograms: dict
    results: dict[str, MetricResult] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "dense_loss": self.dense_loss,
                "dense_perplexity": perplexity(self.dense_loss),
                "results": {name: r.to_dict() for name, r in self.results.items()},
                "histograms": self.histograms}


@dataclasses.dataclass
class EvalResults:
    """eval.py's ``results.json`` (field by field in the module docstring)."""

    workdir: str
    config_name: str
    activation: str
    ffn_type: str
    d_model: int
    n_layers: int
    d_ff: int
    params: dict[str, int]
    eval_tokens: int
    eval_batches: int
    metrics: list[str]
    options: dict
    # Each registered metric with a run-level search (``eval_metrics.searched()``, e.g. cett_ppl)
    # -> its result, None when not asked for; written as top-level keys in this position.
    searches: dict[str, Optional[dict]]
    forward_passes: int
    seconds: float
    checkpoints: list[CheckpointResult]
    vanished_steps: list[int] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "searches":
                out.update(self.searches)
            elif f.name not in ("checkpoints", "vanished_steps"):
                out[f.name] = getattr(self, f.name)
        if self.vanished_steps:  # only when a live trainer deleted steps while eval read them
            out["vanished_steps"] = sorted(set(self.vanished_steps))
        out["checkpoints"] = [c.to_dict() for c in self.checkpoints]
        return out


def _from_record(cls, d: dict, derived: tuple[str, ...]):
    """``cls`` from a metrics.jsonl line: its fields by name, the ``derived`` keys (perplexities,
    recomputed by ``to_dict``) dropped, every other key kept in ``extra``."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    missing = [f.name for f in dataclasses.fields(cls) if f.name in names
               and f.default is dataclasses.MISSING and f.name not in d]
    if missing:
        raise ValueError(f"{cls.__name__}: a metrics line without {missing}: {sorted(d)}")
    return cls(**{k: v for k, v in d.items() if k in names},
               extra={k: v for k, v in d.items() if k not in names and k not in derived})


def _record(record, head: dict) -> dict:
    """A metrics.jsonl line: ``head`` first (the order readers of older files know), then the
    record's other fields without the optional ones left at None, then its extras."""
    rest = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)
            if f.name != "extra" and f.name not in head and getattr(record, f.name) is not None}
    return {**head, **rest, **record.extra}


@dataclasses.dataclass
class TrainRecord:
    """One training step's line of ``metrics.jsonl``. Activation fields are present with the
    in-graph statistics on; ``extra`` holds the sparsity plan's terms (``step.SPARSITY_METRICS``)."""

    step: int
    loss: float
    grad_norm: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_seen: Optional[float] = None
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None
    activation_ratio: Optional[float] = None
    activation_ratio_layers: Optional[list[float]] = None
    dead_in_batch_layers: Optional[list[float]] = None
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return _record(self, {"step": self.step, "loss": self.loss,
                              "perplexity": perplexity(self.loss)})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainRecord":
        return _from_record(cls, d, ("perplexity",))


@dataclasses.dataclass
class EvalRecord:
    """One in-training evaluation's line of ``metrics.jsonl`` (the train step's eval loss)."""

    step: int
    eval_loss: float
    eval_activation_ratio: Optional[float] = None
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return _record(self, {"step": self.step, "eval_loss": self.eval_loss,
                              "eval_perplexity": perplexity(self.eval_loss)})

    @classmethod
    def from_dict(cls, d: dict) -> "EvalRecord":
        return _from_record(cls, d, ("eval_perplexity",))


@dataclasses.dataclass
class TableRow:
    """One row of a sweep's tidy table: a run (with its grid coordinates), a step and one
    metric's value there."""

    run: str
    activation: Optional[str]
    size: str
    params: int
    width: int
    depth: int
    tokens: float
    step: int
    metric: str
    value: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TableRow":
        if set(d) != set(TABLE_COLUMNS):
            raise ValueError(f"a table row has columns {sorted(d)}, expected {list(TABLE_COLUMNS)}")
        return cls(**d)


TABLE_COLUMNS = tuple(f.name for f in dataclasses.fields(TableRow))


def checkpoint_rows(results: dict) -> Iterator[dict]:
    """Tidy rows of every checkpoint: the dense loss, then per metric its mean and per-layer
    ratio and dead share, loss, perplexity ratio, chunk sparsity per length and the parameters
    its registry entry names (``Metric.csv_params``: the CETT value of cett and cett_ppl).

    Quantities a results file lacks (a partial or older file) are left out, not invented.
    """
    for entry in results["checkpoints"]:
        base = {"step": entry["step"], "tokens_seen": entry["tokens_seen"]}
        yield {**base, "metric": "dense", "layer": "mean", "quantity": "loss", "value": entry["dense_loss"]}
        for name, r in entry["results"].items():
            row = lambda layer, quantity, value: {**base, "metric": name, "layer": layer,  # noqa: E731
                                                  "quantity": quantity, "value": value}
            for quantity in LAYER_QUANTITIES:
                if quantity in r:
                    yield row("mean", quantity, r[quantity])
                for i, v in enumerate(r.get(f"{quantity}_layers", ())):
                    yield row(i, quantity, v)
            for quantity in MEAN_QUANTITIES:
                if quantity in r:
                    yield row("mean", quantity, r[quantity])
            for n, v in r.get("chunk_sparsity", {}).items():
                yield row("mean", f"chunk_sparsity_L{n}", v)
            for param in eval_metrics.csv_params(name):
                if param in r:
                    yield row("mean", param, r[param])


def tidy_rows(results: dict) -> list[dict]:
    return list(checkpoint_rows(results))


def write_results(results: dict, out_path: str | pathlib.Path) -> list[pathlib.Path]:
    """``results.json`` and ``results.csv`` beside it, each written whole or not at all."""
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = tidy_rows(results)

    def write_csv(path: pathlib.Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
            writer.writeheader()
            writer.writerows(rows)

    return [rundir.atomic_write(out_path, json.dumps(results, indent=1)),
            rundir.atomic_write(out_path.with_suffix(".csv"), write_csv)]


def load_results(path: str | pathlib.Path) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def metric_label(name: str, entries: Sequence[dict]) -> str:
    """A metric's display name with its parameter (FAT-ε=0.01, top-k (k=96), CETT-PPL-1%): its
    registry entry's label (``eval_metrics.Metric.label``) of the first checkpoint that has it."""
    for e in entries:
        r = e["results"].get(name)
        if r is not None:
            return eval_metrics.label(name, r)
    return name


def summary_table(results: dict) -> str:
    """A plain-text table of the last checkpoint (what eval.py prints)."""
    last = results["checkpoints"][-1]
    lines = [f"{results['config_name']} step {last['step']} ({last['tokens_seen']:.3g} tokens), "
             f"{results['eval_tokens']} eval tokens, dense loss {last['dense_loss']:.4f}",
             f"{'metric':<16}{'ratio %':>9}{'ppl ratio':>11}{'dead %':>8}{'CLS@8 %':>9}"]
    for name, r in last["results"].items():
        lines.append(f"{metric_label(name, [last]):<16}{r['ratio'] * 100:>9.2f}{r['ppl_ratio']:>11.4f}"
                     f"{r['dead_share'] * 100:>8.2f}{r['chunk_sparsity']['8'] * 100:>9.2f}")
    lines.append(f"forward passes: {results['forward_passes']} batches, {results['seconds']:.1f} s")
    return "\n".join(lines)


def training_records(records: Iterable[dict]
                     ) -> tuple[dict[int, TrainRecord], dict[int, EvalRecord]]:
    """(train records by step, eval records by step) of a ``metrics.jsonl``'s lines; the last
    record of a step wins. Train lines carry ``loss``; eval lines ``eval_loss``."""
    train, evals = {}, {}
    for r in records:
        if "loss" in r:
            train[r["step"]] = TrainRecord.from_dict(r)
        elif "eval_loss" in r:
            evals[r["step"]] = EvalRecord.from_dict(r)
    return train, evals


def read_training(path) -> tuple[dict[int, TrainRecord], dict[int, EvalRecord]]:
    """:func:`training_records` of the ``metrics.jsonl`` at ``path`` (a torn last line ignored)."""
    from sparsejax import writers  # noqa: PLC0415 - writers imports this module

    return training_records(writers.read_jsonl(path))
