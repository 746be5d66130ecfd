"""The evaluation-metric registry (sparsejax.eval_metrics): a metric is one entry, and the CLI,
the options, the evaluation loop, results.json/CSV and the report labels all read it."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golden_run

from sparsejax import (eval_metrics, eval_options, evaluation, ffn, results as results_lib,
                       sparsity, trained_run)

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILTIN = ("zero", "fat", "topk", "topk_global", "cett", "cett_ppl")


def _eval_cli():
    """eval.py as a module (its parse_args builds the parser from the registry)."""
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy_metric():
    """A new metric with its own FFN mask, all in its one registry entry and nowhere else: every
    neuron of every layer dropped inside the model (the sparse forward of a model without FFNs)."""
    def toy_passes():
        @ffn.register_eval_mask("toy_drop_all")
        def drop_all(activation_BxLxF, hidden_BxLxF, parameter):
            return jnp.zeros(activation_BxLxF.shape, bool)

        return [evaluation.SparsePass(
            "toy_drop_all", lambda ev, thresholds: {"eval_masks": (("toy_drop_all", None),)},
            lambda ev, act, hidden, threshold_F, keep: jnp.zeros(act.shape, bool))]

    metric = eval_metrics.register_metric(eval_metrics.Metric(
        "toy", lambda ctx: ctx.report(ctx.ev.sparse(ctx.params, "toy_drop_all"), kept=0.0),
        help="every FFN neuron dropped", label=lambda r: f"toy (kept {r['kept']:.0%})",
        options=("dead_min_rate",), csv_params=("kept",), passes=toy_passes))
    try:
        yield metric
    finally:
        eval_metrics.METRICS.pop("toy")
        evaluation.PASSES.pop("toy_drop_all", None)
        ffn.EVAL_MASKS.pop("toy_drop_all", None)


def test_the_builtin_metrics_are_registered_in_results_order():
    assert tuple(eval_options.METRICS) == eval_metrics.names() == BUILTIN
    assert eval_metrics.searched() == ("cett_ppl",)
    fields = set(eval_options.FLAGS)
    for m in eval_metrics.METRICS.values():
        assert set(m.options) <= fields, m.name  # every option a metric reads is a flag


def test_a_new_metric_appears_in_the_cli_and_labels(toy_metric, capsys):
    cli = _eval_cli()
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "  toy          every FFN neuron dropped [--dead-min-rate]\n" in text
    words = " ".join(text.split())  # argparse wraps the flags' help
    assert "--metrics METRICS comma-separated subset of zero,fat,topk,topk_global,cett,cett_ppl,toy " \
        "(default zero,fat,cett_ppl)" in words
    args = cli.parse_args(["--workdir", "w", "--metrics", "zero,toy"])
    options = eval_options.from_flags({f: getattr(args, f) for f in eval_options.FLAGS})
    assert options.metrics == ("zero", "toy")
    assert eval_options.to_argv(options)[:2] == ["--metrics", "zero,toy"]
    entry = {"results": {"toy": {"kept": 0.25}}}
    assert results_lib.metric_label("toy", [{"results": {}}, entry]) == "toy (kept 25%)"
    assert results_lib.metric_label("fat", [{"results": {"fat": {"eps": 0.05}}}]) == "FAT-ε=0.05"
    # A results file holding a metric this version does not know is labelled by its name.
    assert results_lib.metric_label("gone", [{"results": {"gone": {}}}]) == "gone"


def test_bad_metric_names_are_refused_naming_the_allowed_ones(toy_metric):
    with pytest.raises(eval_options.EvalError) as err:
        eval_options.EvalOptions(metrics=("zero", "nope"))
    assert str(err.value) == ("metrics=['zero', 'nope'] is not allowed; choose one or more of "
                              "['zero', 'fat', 'topk', 'topk_global', 'cett', 'cett_ppl', 'toy']")
    with pytest.raises(eval_options.EvalError, match=r"metrics=\[\] is not allowed"):
        eval_options.EvalOptions(metrics=())
    with pytest.raises(ValueError, match="'toy' is already registered"):
        eval_metrics.register_metric(toy_metric)
    with pytest.raises(ValueError, match="must be an identifier"):
        eval_metrics.register_metric(eval_metrics.Metric("to y", lambda ctx: None))
    # the metric's own pass kind and FFN mask exist once the evaluator asks for pass kinds
    assert "toy_drop_all" not in evaluation.PASSES and "toy_drop_all" not in ffn.EVAL_MASKS
    assert "toy_drop_all" in evaluation.passes() and "toy_drop_all" in ffn.EVAL_MASKS
    with pytest.raises(ValueError, match="'toy_drop_all' is already registered"):
        ffn.register_eval_mask("toy_drop_all")(lambda a, h, p: a)
    with pytest.raises(ValueError, match="'zero' is already registered"):
        evaluation.register_pass(evaluation.PASSES["zero"])


def test_an_unregistered_ffn_mask_is_refused_naming_the_registered_ones():
    a = jnp.ones((1, 2, 4))
    with pytest.raises(ValueError, match=r"'nope'; registered evaluation masks: \['global_topk'"):
        ffn._apply_eval_masks(a, a, sparsity.Sparsity(eval_masks=(("nope", 1),)))


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    return golden_run.build_run(tmp_path_factory.mktemp("metrics_run") / "run")


@pytest.mark.slow
def test_a_new_metric_is_evaluated_written_and_labelled(toy_metric, relu_run, tmp_path):
    """The toy metric through evaluate_run, results.json/CSV and the summary table; its pass
    equals the dense model with every W_out zeroed (computed without any mask)."""
    options = eval_options.EvalOptions(metrics=("toy", "zero"))
    results = evaluation.evaluate_run(relu_run, options, checkpoints="last", progress=False)
    assert results["metrics"] == ["zero", "toy"]  # the registry's order, not the request's
    assert results["cett_ppl"] is None  # a searched metric not asked for: null, as before
    entry = results["checkpoints"][0]
    assert list(entry["results"]) == ["zero", "toy"]
    toy = entry["results"]["toy"]
    assert toy["kept"] == 0.0 and toy["ratio_layers"] == [0.0, 0.0]
    assert toy["dead_share_layers"] == [1.0, 1.0]

    run = trained_run.load(relu_run)
    ev = evaluation.Evaluator(run.cfg, options)
    params, _ = run.params(run.steps[-1], ev.mesh)
    no_ffn = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "w_out" in jax.tree_util.keystr(path) else x, params)
    without_ffn = ev.dense(no_ffn)
    np.testing.assert_allclose(toy["loss"], without_ffn.loss, rtol=1e-5)
    assert abs(toy["loss"] - entry["dense_loss"]) > 0.1  # the mask changed the model

    written = results_lib.write_results(results, tmp_path / "results.json")
    assert json.loads(written[0].read_text())["checkpoints"][0]["results"]["toy"]["kept"] == 0.0
    rows = [r for r in written[1].read_text().splitlines() if ",toy," in r]
    # ratio and dead share (mean + 2 layers), loss, ppl ratio, 6 chunk lengths, its csv_params
    assert len(rows) == 2 * 3 + 2 + 6 + 1 and rows[-1] == "160,81920.0,toy,mean,kept,0.0"
    assert "toy (kept 0%)" in results_lib.summary_table(results)


@pytest.mark.slow
def test_cli_bad_metric_is_one_line_exit_2_naming_the_allowed_values(tmp_path):
    out = tmp_path / "r" / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--workdir", str(tmp_path),
                           "--metrics", "zero,nope", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr == ("eval error: metrics=['zero', 'nope'] is not allowed; choose one or "
                           "more of ['zero', 'fat', 'topk', 'topk_global', 'cett', 'cett_ppl']\n")
    assert not out.parent.exists()


def test_the_sparse_decode_ffn_refuses_evaluation_masks():
    """A decode step reads per-neuron thresholds on σ(gate) only: an ``eval_masks`` input is
    refused, as a hidden-target threshold is."""
    from sparsejax import config as config_lib, decode_ffn, model as model_lib

    cfg = config_lib.ModelConfig(d_model=8, n_layers=1, d_ff=16, n_heads=2, vocab_size=32,
                                 activation="relu", ffn_type="gated")
    w = ffn.FfnWeights(jnp.ones((8, 16)), jnp.ones((8, 16)), jnp.ones((16, 8)))
    x = jnp.ones((1, 1, 8))
    for kernel in decode_ffn.DECODE_KERNELS:
        fn = decode_ffn.sparse_ffn(cfg, model_lib.Decode(
            index=jnp.int32(0), start_B=jnp.zeros(1, jnp.int32), ffn="sparse", capacity=4,
            kernel=kernel))
        for sp in (sparsity.Sparsity(eval_masks=(("global_topk", 0.5),)),
                   sparsity.Sparsity(thresholds=jnp.zeros(16), mask_target="hidden")):
            with pytest.raises(ValueError, match="thresholds on the activation only"):
                fn(x, w, jnp.ones((16, 8)), sp)
