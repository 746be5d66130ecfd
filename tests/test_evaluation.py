"""eval.py / sparsejax.evaluation on the golden fixture run (frozen checkpoints of a tiny ReLU
model): sparse passes vs numpy, CETT-PPL, the CLI."""

import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golden_run

from sparsejax import (cett, checkpointing, evaluation, model as model_lib, plotting,
                       results as results_lib, rundir, trained_run)
from sparsejax.sparsity import Sparsity

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def relu_run(tmp_path_factory):
    """The golden fixture's run (frozen checkpoints of a 160-step run of ``golden_run.config()``):
    the same run on every machine, and no training in this module."""
    return golden_run.build_run(tmp_path_factory.mktemp("relu_run") / "run")


@pytest.fixture(scope="module")
def relu_ev(relu_run):
    run = trained_run.load(relu_run)
    ev = evaluation.Evaluator(run.cfg, evaluation.EvalOptions(cett_ppl_mode="per_checkpoint"))
    params, _ = run.params(run.steps[-1], ev.mesh)
    return run, ev, params


def _numpy_pass(ev, params, thresholds_NxF=None, target="activation"):
    """Per-layer (activation, hidden) over the eval set from plain model.apply, as numpy."""
    m = model_lib.Transformer(ev.cfg.model)
    acts = [[] for _ in range(ev.n_layers)]
    hiddens = [[] for _ in range(ev.n_layers)]
    losses = []
    for b in ev.batches:
        kwargs = {} if thresholds_NxF is None else dict(sparsity=Sparsity(
            thresholds=jnp.asarray(thresholds_NxF), mask_target=target))
        logits, inter = m.apply({"params": params}, b["inputs"], mutable=["intermediates"], **kwargs)
        a, h = model_lib.ffn_intermediates(inter, ev.n_layers)
        for i in range(ev.n_layers):
            acts[i].append(np.asarray(a[i]))
            hiddens[i].append(np.asarray(h[i]))
        logp = np.asarray(jax.nn.log_softmax(logits))
        losses.append(-np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0])
    return ([np.concatenate(x) for x in acts], [np.concatenate(x) for x in hiddens],
            float(np.mean(np.concatenate(losses))))


def test_threshold_zero_pass_equals_dense(relu_ev):
    _, ev, params = relu_ev
    dense = ev.dense(params)
    for target in ("activation", "hidden"):
        sparse = ev.thresholded(params, np.zeros((ev.n_layers, ev.d_ff), np.float32), target)
        assert sparse.loss == dense.loss
        assert sparse.tokens == dense.tokens == ev.eval_tokens == 3 * 8 * 64
        # Nothing is dropped, so every neuron counts as active.
        assert all(float(r.activation_ratio) == 1.0 for r in sparse.reports)


def test_a_pass_reuses_the_placed_batches_and_syncs_once(relu_ev):
    """The evaluation batches are placed on the mesh once (by the plan's batch sharding) and
    reused by every pass, and a pass reads its per-batch sums in one explicit transfer: under a
    guard that refuses implicit host <-> device copies (a float() of a per-batch loss, host
    statistics or thresholds copied in) the batch loop runs, with the same sums."""
    _, ev, params = relu_ev
    thresholds = jax.device_put(jnp.zeros((ev.n_layers, ev.d_ff), jnp.float32),
                                ev.plan.replicated)
    fn = ev.pass_fn("hidden")
    first = ev.thresholded(params, thresholds, "hidden")
    stats, per_batch = ev._accumulate(fn, params, thresholds)
    with jax.transfer_guard("disallow"):
        stats_again, per_batch_again = ev._accumulate(fn, params, thresholds)
    assert len(per_batch) == len(ev.batches) == 3
    placed = ev._device_batches
    assert ev._device_batches is placed and all(
        a.sharding == ev.plan.batch for b in placed for a in b.values())
    np.testing.assert_array_equal(np.asarray(per_batch_again), np.asarray(per_batch))
    jax.tree.map(np.testing.assert_array_equal, stats_again, stats)
    assert ev.thresholded(params, thresholds, "hidden").loss == first.loss


def test_dense_pass_matches_numpy(relu_ev):
    _, ev, params = relu_ev
    dense = ev.dense(params)
    acts, _, loss = _numpy_pass(ev, params)
    assert math.isclose(dense.loss, loss, rel_tol=1e-5)
    for report, act in zip(dense.reports, acts):
        active = act != 0
        np.testing.assert_allclose(float(report.activation_ratio), active.mean(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(report.neuron_rate_F), active.mean(axis=(0, 1)), rtol=1e-6)
        dead = active.mean(axis=(0, 1)) < 1e-3
        np.testing.assert_array_equal(np.asarray(report.dead_F), dead)
        # Chunk of 8 consecutive tokens: a neuron is "chunk-inactive" if off for all 8.
        B, L, F = active.shape
        chunk_active = active.reshape(B, L // 8, 8, F).any(axis=2)
        np.testing.assert_allclose(float(report.chunk_sparsity_C[3]), 1 - chunk_active.mean(), rtol=1e-6)
    assert 0.02 < float(np.mean([r.activation_ratio for r in dense.reports])) < 0.6


def test_fat_on_relu_equals_zero_masks(relu_ev):
    _, ev, params = relu_ev
    dense, fat0 = ev.dense(params), ev.fat(params, 0.0)
    assert fat0.loss == dense.loss
    for a, b in zip(dense.reports, fat0.reports):
        np.testing.assert_array_equal(np.asarray(a.neuron_rate_F), np.asarray(b.neuron_rate_F))
        np.testing.assert_array_equal(np.asarray(a.chunk_sparsity_C), np.asarray(b.chunk_sparsity_C))


def test_fat_pass_matches_numpy_sequential_pruning(relu_ev):
    """FAT-ε is a sparse pass: later layers see pruned earlier layers (as in the reference)."""
    _, ev, params = relu_ev
    eps = 0.05
    fat = ev.fat(params, eps)
    thr = np.full((ev.n_layers, ev.d_ff), np.float32(eps + 1e-18))
    acts, _, loss = _numpy_pass(ev, params, thr, "activation")
    assert math.isclose(fat.loss, loss, rel_tol=1e-5)
    for report, act in zip(fat.reports, acts):
        np.testing.assert_allclose(float(report.activation_ratio), (np.abs(act) >= thr[0, 0]).mean(),
                                   rtol=1e-6)
    dense = ev.dense(params)
    assert fat.loss != dense.loss  # the pruning did something ...
    for f, d in zip(fat.reports, dense.reports):  # ... and only drops neurons ReLU left active
        assert float(f.activation_ratio) < float(d.activation_ratio)


def test_topk_pass_keeps_at_most_k(relu_ev):
    _, ev, params = relu_ev
    top = ev.topk(params)
    assert ev.topk_k == 160 - int(160 * 0.7)
    for r in top.reports:
        assert 0 < float(r.activation_ratio) <= ev.topk_k / ev.d_ff + 1e-7


def test_global_topk_pass_matches_numpy_per_batch_selection(relu_ev):
    """The reference's top-k: per layer and batch, the top fraction of |σ(gate)| over all
    tokens × neurons is kept; later layers see the pruned output."""
    _, ev, params = relu_ev
    top = ev.topk_global(params)
    m = model_lib.Transformer(ev.cfg.model)
    kept = [[] for _ in range(ev.n_layers)]
    losses = []
    for b in ev.batches:
        logits, inter = m.apply({"params": params}, b["inputs"],
                                sparsity=Sparsity(eval_masks=(("global_topk", ev.topk_fraction),)),
                                mutable=["intermediates"])
        acts, _ = model_lib.ffn_intermediates(inter, ev.n_layers)
        for i, a in enumerate(acts):
            flat = np.abs(np.asarray(a)).reshape(-1)
            n_drop = int(flat.size * (1 - ev.topk_fraction))
            keep = np.ones(flat.size, bool)
            keep[np.argsort(flat, kind="stable")[:n_drop]] = False
            kept[i].append((keep & (flat >= np.float32(1e-18))).mean())
        logp = np.asarray(jax.nn.log_softmax(logits))
        losses.append(-np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0])
    assert math.isclose(top.loss, float(np.mean(np.concatenate(losses))), rel_tol=1e-5)
    for report, ratios in zip(top.reports, kept):
        np.testing.assert_allclose(float(report.activation_ratio), np.mean(ratios), rtol=1e-6)
        assert float(report.activation_ratio) <= ev.topk_fraction + 1e-6


def test_cett_thresholds_match_reference_search_on_independent_intermediates(relu_ev):
    _, ev, params = relu_ev
    dense = ev.dense(params, keep_hidden=True)
    t_layers, thr_NxF = ev.cett_thresholds(params, dense.hidden, 0.2)
    _, hiddens, _ = _numpy_pass(ev, params)
    w_outs = model_lib.w_out_per_layer(params, ev.n_layers)
    for i in range(ev.n_layers):
        # The cached intermediates are the model's (up to jit-fusion rounding) ...
        np.testing.assert_allclose(np.concatenate(dense.hidden.layer(i)),
                                   hiddens[i].reshape(-1, ev.d_ff), rtol=1e-4, atol=1e-5)
        # ... and the fast search on them lands on the reference search's threshold exactly.
        ref = cett.cett_threshold_reference(dense.hidden.layer(i), w_outs[i], 0.2)
        assert t_layers[i] == ref.threshold
        independent = cett.cett_threshold_reference(hiddens[i].reshape(-1, ev.d_ff), w_outs[i], 0.2)
        assert math.isclose(t_layers[i], independent.threshold, rel_tol=1e-4)
        # Per-neuron thresholds: t / ‖W_out[i]‖ plus the FAT floor 1e-18 (the default zero rule).
        np.testing.assert_allclose(
            thr_NxF[i], np.float32(ref.threshold) / np.linalg.norm(np.asarray(w_outs[i], np.float32), axis=1)
            + np.float32(1e-18), rtol=1e-6)
    sparse, _ = ev.cett_pass(params, dense.hidden, 0.2)
    acts, hid_sparse, loss = _numpy_pass(ev, params, thr_NxF, "hidden")
    assert math.isclose(sparse.loss, loss, rel_tol=1e-5)
    for report, h, t in zip(sparse.reports, hid_sparse, thr_NxF):
        np.testing.assert_allclose(float(report.activation_ratio), (~(np.abs(h) < t)).mean(), rtol=1e-6)


def test_cett_threshold_zero_counts_exact_zeros_inactive_unless_reference_rule(relu_run):
    """Target CETT 0 makes every layer's threshold 0. The default floor rule then gives each
    layer the *zero* criterion's ratio (its nonzeros, counted with numpy); the reference's tie
    rule counts the exact zeros as active and reads 1.0. The loss is the dense loss under both."""
    run = trained_run.load(relu_run)
    ratios = {}
    for rule in ("floor", "reference"):
        ev = evaluation.Evaluator(run.cfg, evaluation.EvalOptions(cett_zero_rule=rule))
        params, _ = run.params(run.steps[-1], ev.mesh)
        dense = ev.dense(params, keep_hidden=True)
        sparse, t_layers = ev.cett_pass(params, dense.hidden, 0.0)
        assert t_layers == [0.0] * ev.n_layers
        assert sparse.loss == dense.loss
        ratios[rule] = [float(r.activation_ratio) for r in sparse.reports]
    _, hiddens, _ = _numpy_pass(ev, params)
    nonzero = [float(np.mean(h != 0)) for h in hiddens]
    assert max(nonzero) < 0.9  # a ReLU model: the two rules must differ
    np.testing.assert_allclose(ratios["floor"], nonzero, rtol=1e-6)
    assert ratios["reference"] == [1.0] * len(nonzero)


def test_cett_zero_rule_is_validated_and_a_flag():
    with pytest.raises(evaluation.EvalError, match=r"cett_zero_rule='tie'; allowed: \['floor', 'reference'\]"):
        evaluation.EvalOptions(cett_zero_rule="tie")
    from sparsejax import eval_options
    argv = eval_options.to_argv(evaluation.EvalOptions(cett_zero_rule="reference"))
    assert argv[argv.index("--cett-zero-rule") + 1] == "reference"


def test_spilled_cache_gives_same_thresholds(relu_run):
    run = trained_run.load(relu_run)
    params = None
    results = []
    for gib in (2.0, 0.0):
        ev = evaluation.Evaluator(run.cfg, evaluation.EvalOptions(max_cache_gib=gib))
        params = params or run.params(run.steps[-1], ev.mesh)[0]
        dense = ev.dense(params, keep_hidden=True)
        assert (dense.hidden.spill_dir is not None) == (gib == 0.0)
        results.append(ev.cett_thresholds(params, dense.hidden, 0.3)[0])
        spill_dir = dense.hidden.spill_dir
        del dense
        if spill_dir is not None:
            assert not spill_dir.exists()  # spilled files are removed with the store
    assert results[0] == results[1]


def test_cett_ppl_per_checkpoint_converges_to_target(relu_ev):
    run, ev, params = relu_ev
    dense = ev.dense(params, keep_hidden=True)
    before = ev.forward_passes
    search = evaluation.bisect_cett(
        lambda c: evaluation.ppl_ratio(ev.cett_pass(params, dense.hidden, c)[0].loss, dense.loss),
        1.01, 1e-3)
    assert len(search.evaluations) == 10  # ⌈log2(1 / 1e-3)⌉
    assert ev.forward_passes - before == 10 * len(ev.batches)  # dense loss cached, 1 pass per step
    final = evaluation.ppl_ratio(ev.cett_pass(params, dense.hidden, search.cett)[0].loss, dense.loss)
    assert abs(final / 1.01 - 1) <= 0.002, (search.cett, final)
    lo = max((c for c, r in search.evaluations if r < 1.01), default=0.0)
    hi = min((c for c, r in search.evaluations if r >= 1.01), default=1.0)
    assert hi - lo <= 1e-3 and lo <= search.cett <= hi


def test_bisect_cett_on_a_known_curve():
    search = evaluation.bisect_cett(lambda c: 1 + 0.05 * c ** 2, 1.01, 1e-3)
    assert abs(search.cett - math.sqrt(0.2)) <= 1e-3
    assert len(search.evaluations) == 10
    # Target never reached: c climbs to the top of [0, 1].
    assert evaluation.bisect_cett(lambda c: 1.0, 1.01).cett > 1 - 1e-3


def test_evaluate_run_joint_writes_outputs(relu_run, tmp_path):
    options = evaluation.EvalOptions(metrics=("zero", "fat", "cett_ppl"), joint_last=3)
    results = evaluation.evaluate_run(relu_run, options, progress=False)
    steps = [e["step"] for e in results["checkpoints"]]
    assert steps == [40, 80, 120, 160]
    assert results["cett_ppl"]["joint_steps"] == [80, 120, 160]
    assert results["cett_ppl"]["iterations"] == 10
    # 3 dense passes + 10 iterations × 3 checkpoints, in batches.
    assert results["cett_ppl"]["forward_passes"] == (3 + 30) * results["eval_batches"]
    joint_ratios = [e["results"]["cett_ppl"]["ppl_ratio"] for e in results["checkpoints"][1:]]
    assert abs(np.mean(joint_ratios) / 1.01 - 1) < 0.01
    for e in results["checkpoints"]:
        assert e["results"]["zero"]["ppl_ratio"] == 1.0
        assert e["tokens_seen"] == e["step"] * 8 * 64
        assert set(e["results"]["zero"]["chunk_sparsity"]) == {"1", "2", "4", "8", "16", "32"}
    written = results_lib.write_results(results, tmp_path / "out" / "results.json")
    written += plotting.plot_eval_results(results, tmp_path / "out" / "results")
    names = sorted(p.name for p in written)
    assert names == sorted(["results.json", "results.csv", "results_ratio_vs_tokens.png",
                            "results_layers.png", "results_chunk_sparsity.png"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["checkpoints"][0]["step"] == 40
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert rows[0] == "step,tokens_seen,metric,layer,quantity,value"
    assert len(rows) - 1 == len(results_lib.tidy_rows(results))
    assert any(r.startswith("160,") and ",zero,1,ratio," in r for r in rows)
    assert "CETT-PPL-1%" in results_lib.summary_table(results)


def test_load_run_errors(tmp_path, relu_run):
    missing = tmp_path / "nope"
    with pytest.raises(trained_run.RunError, match="does not exist"):
        trained_run.load(missing)
    assert not missing.exists()
    with pytest.raises(trained_run.RunError, match="no config.json"):
        trained_run.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(trained_run.RunError, match="is not valid JSON"):
        trained_run.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model": {"activation": "reluu"}}')
    with pytest.raises(trained_run.RunError, match="not a valid sparsejax config"):
        trained_run.load(tmp_path)
    with pytest.raises(trained_run.RunError, match="available"):
        trained_run.select_steps([40, 80], "40,99")
    assert trained_run.select_steps([40, 80], "last") == [80]
    with pytest.raises(evaluation.EvalError, match="metrics"):
        evaluation.EvalOptions(metrics=("zero", "bogus")).validate()
    with pytest.raises(evaluation.EvalError, match="cett=1.5"):
        evaluation.EvalOptions(cett=1.5).validate()


def test_a_run_is_read_as_its_checkpoints_say_not_as_an_edited_config_json(relu_run, tmp_path):
    """The one precedence rule (checkpointing.read_run_config), shared by evaluation and the
    trainer's resume check: the newest checkpoint's own config first; config.json only for a run
    without one."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(relu_run, copy)
    raw = json.loads((copy / "config.json").read_text())
    raw["model"]["activation"] = "silu"
    (copy / "config.json").write_text(json.dumps(raw))
    run = trained_run.load(copy)
    assert run.cfg.model.activation == "relu"
    got, source = checkpointing.read_run_config(rundir.RunDir(copy))
    assert got["model"]["activation"] == "relu" and "checkpoints" in source
    shutil.rmtree(copy / "checkpoints")
    (copy / "checkpoints").mkdir()
    got, source = checkpointing.read_run_config(rundir.RunDir(copy))
    assert got["model"]["activation"] == "silu" and source == str(copy / "config.json")
    (copy / "config.json").unlink()
    assert checkpointing.read_run_config(rundir.RunDir(copy)) == (None, "")


def test_cett_ppl_refuses_warmup_only_selection(relu_run):
    run = trained_run.load(relu_run)
    assert run.cfg.train.warmup_steps == 20 and max(run.steps) <= 200
    # The run read with a longer warm-up: every checkpoint is then a warm-up checkpoint.
    cfg = dataclasses.replace(run.cfg, train=dataclasses.replace(run.cfg.train, warmup_steps=200))
    longer = trained_run.TrainedRun(run.workdir, cfg, run.reader, run.steps)
    with pytest.raises(evaluation.EvalError, match="after warm-up"):
        evaluation.evaluate(longer, evaluation.EvalOptions(metrics=("cett_ppl",)), progress=False)


@pytest.mark.slow
def test_cli_bad_workdir_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "res" / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--workdir", str(tmp_path / "missing"),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    assert not out.parent.exists()
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--workdir", str(tmp_path),
                           "--metrics", "zero,nope"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "nope" in proc.stderr


@pytest.mark.slow
def test_cli_end_to_end(relu_run, tmp_path):
    out = tmp_path / "e" / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--workdir", str(relu_run),
                           "--checkpoints", "last", "--metrics", "zero,topk,topk_global,cett",
                           "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert [e["step"] for e in results["checkpoints"]] == [160]
    assert set(results["checkpoints"][0]["results"]) == {"zero", "topk", "topk_global", "cett"}
    assert "CETT=0.2" in proc.stdout
