"""Model core for pod scale: scan/remat layouts, the FFN registry, block-sparse FFN, the façade."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import config, evaluation, ffn, model, sharding, sparsity, trained_run, trainer
from sparsejax import configure
from sparsejax.config import ConfigError, ModelConfig
from sparsejax.loss import next_token_loss
from step_data import random_batches, train_steps

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, head_dim=16, d_ff=64,
                  max_seq_len=32)
MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=2"]


def _tokens(cfg, shape=(2, 12), seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


def _loss(cfg, params, tokens, sp=None):
    logits, _ = model.Model(cfg).apply(params, tokens[:, :-1], sparsity=sp)
    return next_token_loss(logits, tokens[:, 1:])[0]


@pytest.mark.slow
def test_scan_layers_same_loss_grads_and_accessors_as_unrolled():
    """The same (converted) parameters give the same loss, gradients, statistics, intermediates
    and per-layer weights in both layouts; conversion round-trips exactly."""
    unrolled, scanned = CFG, dataclasses.replace(CFG, scan_layers=True)
    tokens = _tokens(CFG)
    p_unrolled = model.Model(unrolled).init(jax.random.key(1), 11)
    p_scanned = model.convert_layout(p_unrolled, CFG.n_layers, True)
    assert set(p_scanned) == {"embed", "final_norm", "layers"}
    assert p_scanned["layers"]["ffn"]["w_out"]["kernel"].shape == (3, 64, 32)
    chex.assert_trees_all_equal(model.convert_layout(p_scanned, CFG.n_layers, False), p_unrolled)
    # The scanned model's own parameters carry the "layers" logical axis first.
    specs = model.Model(scanned).param_specs(11)
    assert tuple(specs["layers"]["ffn"]["w_in"]["kernel"]) == ("layers", "embed", "mlp")

    l_u, g_u = jax.value_and_grad(lambda p: _loss(unrolled, p, tokens))(p_unrolled)
    l_s, g_s = jax.value_and_grad(lambda p: _loss(scanned, p, tokens))(p_scanned)
    np.testing.assert_allclose(l_s, l_u, rtol=1e-6)
    chex.assert_trees_all_close(model.convert_layout(g_s, CFG.n_layers, False), g_u,
                                rtol=1e-4, atol=1e-7)

    weights = jnp.ones(tokens[:, :-1].shape)
    sp = sparsity.Sparsity(stats_weights_BxL=weights)
    out = {}
    for name, cfg, params in (("u", unrolled, p_unrolled), ("s", scanned, p_scanned)):
        m = model.Model(cfg)
        _, st = m.apply(params, tokens[:, :-1], sparsity=sp, collect=("stats", "intermediates"))
        acts, hiddens = m.ffn_intermediates(st)
        out[name] = (m.layer_stats(st), acts, hiddens, m.ffn_out_weights(params))
    (sum_u, count_u), acts_u, hid_u, w_u = out["u"]
    (sum_s, count_s), acts_s, hid_s, w_s = out["s"]
    assert count_u.shape == count_s.shape == (3, 64) and sum_s.shape == (3,)
    np.testing.assert_allclose(count_s, count_u)
    np.testing.assert_allclose(sum_s, sum_u)
    # independent: the stats are the zero-rule counts of the sown activations
    np.testing.assert_allclose(count_u, [np.sum(np.asarray(a) != 0, axis=(0, 1)) for a in acts_u])
    for a, b in zip(acts_s + hid_s + w_s, acts_u + hid_u + w_u):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scan_layers_evaluation_thresholds_per_layer():
    """Per-layer thresholds reach the right layer in both layouts."""
    tokens = _tokens(CFG)
    p = model.Model(CFG).init(jax.random.key(1), 11)
    thresholds = jnp.stack([jnp.zeros(64), jnp.full(64, 1e9), jnp.zeros(64)])  # drop layer 1 only
    sp = sparsity.Sparsity(thresholds=thresholds)
    l_u = _loss(CFG, p, tokens, sp)
    l_s = _loss(dataclasses.replace(CFG, scan_layers=True), model.convert_layout(p, 3, True),
                tokens, sp)
    no_ffn1 = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "layer_1']['ffn']['w_out" in jax.tree_util.keystr(path)
        else x, p)
    np.testing.assert_allclose(l_s, l_u, rtol=1e-6)
    np.testing.assert_allclose(l_u, _loss(CFG, no_ffn1, tokens), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [p for p in model.remat_policy_names() if p != "none"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_leave_loss_and_grads_unchanged(policy, scan):
    base = dataclasses.replace(CFG, scan_layers=scan)
    tokens = _tokens(CFG, seed=4)
    p = model.Model(base).init(jax.random.key(2), 11)
    l0, g0 = jax.value_and_grad(lambda q: _loss(base, q, tokens))(p)
    cfg = dataclasses.replace(base, remat_policy=policy)
    l1, g1 = jax.jit(jax.value_and_grad(lambda q: _loss(cfg, q, tokens)))(p)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-7)


def test_a_new_ffn_impl_registers_without_touching_block_or_transformer():
    @ffn.register_ffn_impl("halved_for_test")
    def halved(cfg):
        ref = ffn.reference_ffn(cfg)

        def fn(x, weights, sp):
            y, aux = ref(x, weights, sp)
            return 0.5 * y, aux
        return fn

    try:
        cfg = dataclasses.replace(CFG, ffn_impl="halved_for_test")
        configure.apply_overrides(config.proxy_config("tiny"), ["model.ffn_impl=halved_for_test"])
        tokens = _tokens(CFG)
        p = model.Model(CFG).init(jax.random.key(1), 11)
        halved_w = jax.tree_util.tree_map_with_path(
            lambda path, x: 0.5 * x if "w_out" in jax.tree_util.keystr(path) else x, p)
        np.testing.assert_allclose(_loss(cfg, p, tokens), _loss(CFG, halved_w, tokens), rtol=1e-5)
    finally:
        ffn.FFN_IMPLS.pop("halved_for_test")


@pytest.mark.parametrize("overrides, match", [
    (["model.ffn_impl=einsum"], r"model.ffn_impl='einsum' is not allowed; allowed values: "
                                r"\['block_sparse', 'reference'\]"),
    (["model.remat_policy=some"], r"model.remat_policy='some' is not allowed; allowed values: "
                                  r"\['none', 'full'"),
    (["model.ffn_impl=block_sparse", "model.ffn_block_f=96"], "model.ffn_block_f=96 must divide "
                                                              "model.d_ff=320"),
    (["model.ffn_impl=block_sparse", "model.ffn_block_f=64", "sparsity.topk=0.5"],
     "sparsity.topk=0.5 must be 0 with model.ffn_impl='block_sparse'"),
    (["model.ffn_impl=block_sparse", "model.ffn_block_t=0"], "model.ffn_block_t=0 must be > 0"),
])
def test_config_errors_name_field_and_allowed_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        configure.apply_overrides(config.proxy_config("tiny"), overrides)


# ------------------------------------------------------------------------- block-sparse FFN
@pytest.mark.slow
def test_block_sparse_ffn_trains_like_the_reference_and_evaluates():
    """ReLU: the zero-criterion tile mask keeps every nonzero, so training with the block-sparse
    FFN (CPU: the kernels' pure-JAX path) follows the einsum FFN; evaluation runs on it."""
    ref_cfg = configure.apply_overrides(config.proxy_config("tiny"), MICRO)
    bs_cfg = configure.apply_overrides(ref_cfg, ["model.ffn_impl=block_sparse", "model.ffn_block_t=64",
                                              "model.ffn_block_f=32"])
    l_ref, r_ref, s_ref = train_steps(ref_cfg, jax.devices()[:1])
    l_bs, r_bs, s_bs = train_steps(bs_cfg, jax.devices()[:1])
    np.testing.assert_allclose(l_bs, l_ref, rtol=1e-5)
    np.testing.assert_allclose(r_bs, r_ref, atol=1e-6)
    chex.assert_trees_all_close(jax.device_get(s_bs["params"]), jax.device_get(s_ref["params"]),
                                rtol=1e-3, atol=1e-5)
    assert l_ref[-1] < l_ref[0]

    batch = random_batches(ref_cfg, 1, seed=5)[0]
    reports = {}
    for name, cfg in (("ref", ref_cfg), ("bs", bs_cfg)):
        ev = evaluation.Evaluator(cfg, evaluation.EvalOptions(metrics=("zero", "fat", "topk")),
                                  batches=[batch])
        target = model.abstract_params(cfg.model, cfg.train.seq_len, ev.plan)
        params = jax.device_put(jax.device_get(s_ref["params"]),
                                jax.tree.map(lambda a: a.sharding, target))
        reports[name] = [ev.dense(params), ev.fat(params, 0.01), ev.topk(params)]
    for a, b in zip(reports["bs"], reports["ref"]):
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
        np.testing.assert_allclose([float(r.activation_ratio) for r in a.reports],
                                   [float(r.activation_ratio) for r in b.reports], atol=1e-6)


# --------------------------------------------------------------------- checkpoint layouts
def _as_layout(run, **model_fields):
    """The same run read as a config with other model fields (e.g. the other ``scan_layers``
    layout): a run's config comes from its checkpoints, so it is changed on the run object."""
    cfg = dataclasses.replace(run.cfg, model=dataclasses.replace(run.cfg.model, **model_fields))
    return trained_run.TrainedRun(run.workdir, cfg, run.reader, run.steps)


@pytest.mark.slow
def test_checkpoint_of_the_other_layout_converts_for_reading_and_refuses_resume(tmp_path):
    cfg = configure.apply_overrides(config.proxy_config("tiny"), MICRO + [
        "train.steps=2", "train.checkpoint_every=2", "train.eval_every=1000", "train.log_every=1",
        "train.eval_batches=1"])
    trainer.train(cfg, tmp_path, progress=False)
    # Evaluation: a config that says scan_layers reads the unrolled checkpoint, converted.
    run = trained_run.load(tmp_path)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    unrolled, _ = run.params(2, mesh)
    scanned, _ = _as_layout(run, scan_layers=True).params(2, mesh)
    assert "layers" in scanned and "layer_0" not in scanned
    chex.assert_trees_all_equal(jax.device_get(model.convert_layout(scanned, 2, False)),
                                jax.device_get(unrolled))
    # Training: resuming with the other layout fails in one line naming the field.
    with pytest.raises(ConfigError, match="model.scan_layers") as err:
        trainer.train(configure.apply_overrides(cfg, ["model.scan_layers=true", "train.steps=4"]),
                      tmp_path, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_scanned_remat_run_evaluates_end_to_end_as_the_unrolled_model(tmp_path):
    """Train with scan + full remat, run the whole evaluation (zero, FAT, top-k, CETT-PPL) on its
    checkpoint, then evaluate the same checkpoint as the unrolled model (config edited, layout
    converted on read): every number agrees, so evaluation is layout-blind end to end."""
    cfg = configure.apply_overrides(config.proxy_config("tiny"), MICRO + [
        "train.steps=3", "train.checkpoint_every=3", "train.eval_every=1000", "train.log_every=1",
        "train.eval_batches=1", "model.scan_layers=true", "model.remat_policy=full"])
    trainer.train(cfg, tmp_path, progress=False)
    assert "layers" in trained_run.load(tmp_path).params(3, sharding.make_mesh(
        cfg.mesh, jax.devices()[:1]))[0]
    options = evaluation.EvalOptions(metrics=("zero", "fat", "topk", "cett_ppl"), ppl_p=1.0)
    batch = random_batches(cfg, 1, seed=3)
    scanned = evaluation.evaluate_run(tmp_path, options, progress=False, batches=batch)
    unrolled = evaluation.evaluate(_as_layout(trained_run.load(tmp_path), scan_layers=False,
                                              remat_policy="none"),
                                   options, progress=False, batches=batch)

    def numbers(tree, path=""):
        if isinstance(tree, dict):
            return {k: v for key in sorted(tree) if key not in ("config", "model", "seconds", "elapsed_s")
                    for k, v in numbers(tree[key], f"{path}/{key}").items()}
        if isinstance(tree, list):
            return {k: v for i, x in enumerate(tree) for k, v in numbers(x, f"{path}/{i}").items()}
        return {path: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}

    a, b = numbers(scanned), numbers(unrolled)
    assert a.keys() == b.keys() and len(a) > 20
    assert any("cett" in k for k in a) and any("ratio" in k for k in a), sorted(a)[:40]
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
