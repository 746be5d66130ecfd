"""sparsejax.results: the schema dataclasses write the documented JSON forms."""

import json
import math

import numpy as np
import pytest

from sparsejax import results
from sparsejax.sweep import table


def _metric(**params):
    return results.MetricResult(ratio_layers=[0.1, 0.2, 0.4], dead_share_layers=[0.0, 0.5, 0.0],
                                loss=2.0, ppl_ratio=1.01, chunk_sparsity={"8": 0.9},
                                chunk_sparsity_independent={"8": 0.8}, params=params)


def test_eval_results_round_trip_through_the_flattener():
    ck = results.CheckpointResult(step=10, tokens_seen=1280.0, dense_loss=1.9,
                                  histograms={"edges": [0, 1], "counts_layers": [[1]]},
                                  results={"fat": _metric(eps=0.01)})
    res = results.EvalResults(
        workdir="w", config_name="c", activation="relu", ffn_type="gated", d_model=8, n_layers=3,
        d_ff=16, params={"total": 1, "non_embedding": 1}, eval_tokens=64, eval_batches=1,
        metrics=["fat"], options={}, searches={"cett_ppl": None}, forward_passes=2, seconds=0.5,
        checkpoints=[ck])
    out = json.loads(json.dumps(res.to_dict()))
    assert "vanished_steps" not in out  # only when steps vanished
    entry = out["checkpoints"][0]
    assert entry["dense_perplexity"] == math.exp(1.9)
    fat = entry["results"]["fat"]
    assert fat["ratio"] == float(np.mean([0.1, 0.2, 0.4])) and fat["eps"] == 0.01
    assert fat["dead_share"] == float(np.mean([0.0, 0.5, 0.0]))
    assert fat["perplexity"] == math.exp(2.0)
    rows = results.tidy_rows(out)
    assert {"step": 10, "tokens_seen": 1280.0, "metric": "fat", "layer": 2, "quantity": "ratio",
            "value": 0.4} in rows
    assert results.summary_table(out).splitlines()[0].startswith("c step 10")
    res.vanished_steps = [7, 3, 7]
    assert res.to_dict()["vanished_steps"] == [3, 7]


def test_training_records_drop_absent_fields_and_read_back():
    tr = results.TrainRecord(step=3, loss=2.5, grad_norm=1.0, learning_rate=1e-3, tokens_seen=48.0,
                             tokens_per_s=100.0, mfu=float("nan"), extra={"topk_k": 32})
    d = tr.to_dict()
    assert list(d)[:3] == ["step", "loss", "perplexity"] and d["perplexity"] == math.exp(2.5)
    assert "activation_ratio" not in d and d["topk_k"] == 32
    ev = results.EvalRecord(step=3, eval_loss=2.0, eval_activation_ratio=0.25).to_dict()
    assert list(ev) == ["step", "eval_loss", "eval_perplexity", "eval_activation_ratio"]
    train, evals = results.training_records([d, ev])
    assert train[3] == tr and train[3].to_dict() == d  # read back through the dataclass
    assert evals[3].eval_activation_ratio == 0.25 and evals[3].to_dict() == ev
    # an older line without the reporting fields reads with them unset; one without a loss fails
    old = results.TrainRecord.from_dict({"step": 1, "loss": 3.0, "tokens_seen": 8.0})
    assert old.grad_norm is None and old.extra == {} and old.to_dict()["perplexity"] == math.exp(3)
    with pytest.raises(ValueError, match="without \\['loss'\\]"):
        results.TrainRecord.from_dict({"step": 1, "tokens_seen": 8.0})
    with pytest.raises(ValueError, match="table row has columns"):
        results.TableRow.from_dict({**results.TableRow("r", None, "", 1, 1, 1, 1.0, 1, "m", 1.0)
                                   .to_dict(), "renamed": 1})


def test_the_sweep_table_columns_are_the_row_dataclass_fields():
    assert table.COLUMNS == results.TABLE_COLUMNS == (
        "run", "activation", "size", "params", "width", "depth", "tokens", "step", "metric", "value")
    row = results.TableRow("r", "relu", "", 10, 8, 2, 512.0, 4, "eval_loss", 3.0).to_dict()
    assert tuple(row) == table.COLUMNS
