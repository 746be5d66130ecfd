"""The results schema: eval.py's ``results.json`` and the one flattener everyone uses.

``results.json`` (written by :func:`write_results`, produced by ``evaluation.evaluate_run``)::

    {workdir, config_name, activation, ffn_type, d_model, n_layers, d_ff,
     params: {total, non_embedding}, eval_tokens, eval_batches, metrics: [names],
     options: {EvalOptions}, cett_ppl: {mode, cett, ...} | null, forward_passes, seconds,
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
import json
import math
import pathlib
from typing import Iterable, Iterator, Sequence

from sparsejax import rundir

CSV_FIELDS = ("step", "tokens_seen", "metric", "layer", "quantity", "value")
LAYER_QUANTITIES = ("ratio", "dead_share")  # also per layer, as "<quantity>_layers"
MEAN_QUANTITIES = ("loss", "ppl_ratio")
MAX_LOG_PERPLEXITY = 50.0  # exp(50) ≈ 5e21: a diverged loss reads as huge, not as overflow


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged loss does not overflow."""
    return math.exp(min(float(loss), MAX_LOG_PERPLEXITY))


def checkpoint_rows(results: dict) -> Iterator[dict]:
    """Tidy rows of every checkpoint: the dense loss, then per metric its mean and per-layer
    ratio and dead share, loss, perplexity ratio, chunk sparsity per length and CETT value.

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
            if "cett" in r:
                yield row("mean", "cett", r["cett"])


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
    """A metric's display name with its parameter (FAT-ε=0.01, top-k (k=96), CETT-PPL-1%)."""
    for e in entries:
        r = e["results"].get(name)
        if r is None:
            continue
        if name == "fat":
            return f"FAT-ε={r['eps']:g}"
        if name == "topk":
            return f"top-k (k={r['k']})"
        if name == "topk_global":
            return f"global top {r['fraction']:.0%}"
        if name == "cett":
            return f"CETT={r['cett']:g}"
        if name == "cett_ppl":
            return f"CETT-PPL-{r['p']:g}%"
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


def iter_metric(results: dict, name: str) -> Iterable[tuple[int, float, float]]:
    """(step, tokens seen, mean ratio) of one metric over the evaluated checkpoints."""
    for e in results["checkpoints"]:
        if name in e["results"]:
            yield e["step"], e["tokens_seen"], e["results"][name]["ratio"]


# ---------------------------------------------------------------------------- metrics.jsonl
def training_records(records: Iterable[dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train records by step, eval records by step) of a ``metrics.jsonl``; the last record of
    a step wins. Train records carry ``loss``; eval records ``eval_loss``."""
    train, evals = {}, {}
    for r in records:
        if "loss" in r:
            train[r["step"]] = r
        elif "eval_loss" in r:
            evals[r["step"]] = r
    return train, evals
