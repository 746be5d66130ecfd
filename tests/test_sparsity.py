"""sparsejax.sparsity: one "active" rule and one fraction → k rule for training, model and evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import config, evaluation, metrics, model, optim, sharding, sparsity, step
from sparsejax import configure
from sparsejax.config import ModelConfig

PAPER_D_FF = (1920, 2560, 3200, 3840, 4480, 5760, 320)
FRACTIONS = (0.1, 0.25, 0.5, 0.9)


def test_active_rules_against_literal_values():
    x = jnp.array([0.0, 1e-19, -1e-19, 0.01, -0.01, 0.0099999, jnp.nan, 2.0], jnp.float32)
    # zero rule: exactly x != 0
    np.testing.assert_array_equal(sparsity.active(x), [0, 1, 1, 1, 1, 1, 1, 1])
    # FAT-ε with the 1e-18 floor: ε = 0 drops magnitudes below 1e-18; not(<) keeps NaN active
    np.testing.assert_array_equal(sparsity.active(x, sparsity.fat_threshold(0.0)),
                                  [0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(sparsity.active(x, sparsity.fat_threshold(0.01)),
                                  [0, 0, 0, 1, 1, 0, 1, 1])
    keep = jnp.array([1, 1, 1, 0, 1, 1, 1, 0], bool)
    np.testing.assert_array_equal(sparsity.active(x, None, keep), [0, 1, 1, 0, 1, 1, 1, 0])
    # per-neuron thresholds broadcast over tokens
    x_TxF = jnp.array([[0.5, 0.5], [0.1, 0.3]])
    np.testing.assert_array_equal(sparsity.active(x_TxF, jnp.array([0.2, 0.4])), [[1, 1], [0, 0]])
    # the float32 threshold is what the reference compares: eps + 1e-18 rounded once
    assert sparsity.fat_threshold(0.01) == np.float32(0.01 + 1e-18)
    assert float(sparsity.fat_threshold(jnp.float32(0.0))) == np.float32(1e-18)


@pytest.mark.slow
@pytest.mark.parametrize("d_ff", PAPER_D_FF)
def test_training_and_evaluation_topk_keep_the_same_k(d_ff):
    """sparsity.topk (training, through the plan), sparsity.topk_count / topk_active_TxF and the evaluator's k
    agree, and equal the count the reference's prune_topk keeps (int(numel · (1 − f)) dropped);
    the training FFN's mask keeps exactly that many per token."""
    act_TxF = jax.random.normal(jax.random.key(d_ff), (3, d_ff)) + 5.0  # no exact zeros
    for f in FRACTIONS:
        reference_keeps = d_ff - int(d_ff * (1.0 - f))
        train_k = _plan(d_ff, f).topk_k
        assert train_k == reference_keeps == sparsity.topk_count(f, d_ff), (d_ff, f)
        eval_counts = np.asarray(metrics.topk_active_TxF(act_TxF, f)).sum(-1)
        np.testing.assert_array_equal(eval_counts, reference_keeps)
        train_keep = sparsity.topk_keep(jnp.abs(act_TxF), train_k)
        np.testing.assert_array_equal(np.asarray(train_keep).sum(-1), reference_keeps)
    # the float64 corner where round(f·F) = 288 and F − int(F·(1 − f)) = 289 disagree
    assert _plan(320, 0.9).topk_k == 289
    assert _plan(160, 0.3).topk_k == 48  # the golden eval test's k: unchanged


def _plan(d_ff, topk):
    from sparsejax.sparsity_plan import SparsityPlan

    return SparsityPlan.of(configure.apply_overrides(config.proxy_config("tiny"), [
        f"model.d_ff={d_ff}", "model.activation=silu", f"sparsity.topk={topk}"]))


def test_training_ffn_keeps_config_k_per_token():
    cfg = ModelConfig(vocab_size=256, d_model=8, n_layers=1, n_heads=1, head_dim=8, d_ff=320,
                      activation="silu")
    ffn = model.FeedForward(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    params = ffn.init(jax.random.key(1), x)
    _, st = ffn.apply(params, x, _plan(320, 0.9).model_input(), mutable=["intermediates"])
    hidden = np.asarray(st["intermediates"]["hidden"][0])
    np.testing.assert_array_equal((hidden != 0).sum(-1), 289)


@pytest.mark.parametrize("bad, match", [(0.0, "fraction"), (1.5, "fraction"), (True, "got True"),
                                        (0, r"\[1, d_ff=8\]"), (9, r"\[1, d_ff=8\]"),
                                        (1e-17, "keeps no neuron")])
def test_topk_count_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        sparsity.topk_count(bad, 8)


def test_sparsity_input_validation_and_layer_slicing():
    with pytest.raises(ValueError, match="mask_target='gate'"):
        sparsity.Sparsity(mask_target="gate")
    with pytest.raises(ValueError, match=r"eval_masks=\('global_topk', 0.3\); allowed: \(name, parameter\) pairs"):
        sparsity.Sparsity(eval_masks=("global_topk", 0.3))  # a pair, not a tuple of pairs
    with pytest.raises(ValueError, match="eps must be >= 0"):
        sparsity.fat_threshold(-0.1)
    sp = sparsity.Sparsity(thresholds=jnp.arange(6.0).reshape(3, 2), mask_target="hidden",
                           coefficients={"k": jnp.array([4, 5, 6])})
    one = sp.layer(1)
    np.testing.assert_array_equal(one.thresholds, [2.0, 3.0])
    assert int(one.coefficients["k"]) == 5 and one.mask_target == "hidden"
    axes = sp.scan_axes()
    assert axes.thresholds == 0 and axes.coefficients == {"k": 0} and axes.stats_weights_BxL is None


# ------------------------------------------------------------ training statistics == evaluation
MICRO = ["model.d_model=64", "model.n_heads=2", "model.head_dim=32", "model.d_ff=160",
         "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=2"]


def _batch(cfg, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(cfg.train.batch_size, cfg.train.seq_len + 1)).astype(np.int32)
    weights = np.ones((cfg.train.batch_size, cfg.train.seq_len), np.float32)
    weights[0, :5] = 0.0  # masked tokens count in neither
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": weights}


@pytest.mark.slow
@pytest.mark.parametrize("activation, n_layers, criterion", [("relu", 2, "zero"),
                                                            ("silu", 1, "fat")])
def test_in_graph_training_ratio_equals_evaluation_ratio(activation, n_layers, criterion):
    """Same params, same batch: the step's in-graph ratio (zero rule for ReLU, FAT-ε for SiLU)
    equals the evaluator's zero / FAT-ε ratio. (The FAT pass is a sparse forward, so later layers
    would see pruned inputs: one layer keeps the comparison exact.)"""
    eps = 0.05
    cfg = configure.apply_overrides(config.proxy_config("tiny", activation), MICRO + [
        f"model.n_layers={n_layers}", f"sparsity.fat_eps={eps}"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg))
    state = fns.init(jax.random.key(2))
    params = jax.device_get(state["params"])
    batch = _batch(cfg)
    _, m = fns.train(state, fns.plan.global_batch(batch))
    ev = evaluation.Evaluator(cfg, evaluation.EvalOptions(metrics=("zero", "fat"), fat_eps=eps),
                              batches=[batch])
    target = model.abstract_params(cfg.model, cfg.train.seq_len, ev.plan)
    params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, target))
    result = ev.dense(params) if criterion == "zero" else ev.fat(params, eps)
    eval_ratio = [float(r.activation_ratio) for r in result.reports]
    np.testing.assert_allclose(np.asarray(m["activation_ratio_layers"]), eval_ratio, atol=1e-6)
    assert 0.0 < np.mean(eval_ratio) < 1.0
