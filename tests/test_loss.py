"""sparsejax.loss: the vocabulary-tiled loss equals the plain one (values, gradients, train and
eval steps) and does not hold the full logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import config, evaluation, loss, optim, sharding, step
from sparsejax import configure
from step_data import random_batches

MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=2"]


def _problem(b=3, length=20, d=16, v=37, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h_BxLxD = jax.random.normal(k[0], (b, length, d))
    w_DxV = 0.3 * jax.random.normal(k[1], (d, v))
    targets_BxL = jax.random.randint(k[2], (b, length), 0, v)
    weights_BxL = (jax.random.uniform(k[3], (b, length)) > 0.3).astype(jnp.float32)
    return h_BxLxD, w_DxV, targets_BxL, weights_BxL


def _numpy_loss(h_BxLxD, w_DxV, targets_BxL, weights_BxL, scale):
    """Mean weighted cross-entropy in float64 numpy (independent of optax and of the tiling)."""
    logits = scale * np.einsum("bld,dv->blv", np.float64(h_BxLxD), np.float64(w_DxV))
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(targets_BxL)[..., None], -1)[..., 0]
    w = np.float64(weights_BxL)
    return np.sum((lse - target) * w) / max(w.sum(), 1.0)


@pytest.mark.parametrize("tile_len", [1, 4, 7, 20])  # 7: 20 positions padded to 21
@pytest.mark.parametrize("scale, vocab_major", [(1.0, False), (0.25, False), (1.0, True)])
def test_tiled_loss_and_gradients_equal_the_plain_loss(tile_len, scale, vocab_major):
    h, w_DxV, t, wt = _problem()
    w = w_DxV.T if vocab_major else w_DxV

    def plain(h, w):
        return loss.next_token_loss(loss.head_logits(h, w, scale, vocab_major=vocab_major), t, wt)

    def tiled(h, w):
        return loss.tiled_next_token_loss(h, w, t, wt, tile_len=tile_len, logit_scale=scale,
                                          vocab_major=vocab_major)

    (lp, cp), (lt, ct) = plain(h, w), jax.jit(tiled)(h, w)
    assert float(ct) == float(cp) == float(np.sum(np.asarray(wt)))
    np.testing.assert_allclose(float(lt), float(lp), rtol=1e-5)
    np.testing.assert_allclose(float(lt), _numpy_loss(h, w_DxV, t, wt, scale), rtol=1e-5)
    gp = jax.grad(lambda h, w: plain(h, w)[0], (0, 1))(h, w)
    gt = jax.jit(jax.grad(lambda h, w: tiled(h, w)[0], (0, 1)))(h, w)
    for a, b in zip(gt, gp):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_masked_positions_get_no_gradient_and_weights_none_means_all():
    h, w, t, wt = _problem(seed=1)
    dh = jax.grad(lambda h: loss.tiled_next_token_loss(h, w, t, wt, tile_len=6)[0])(h)
    assert np.all(np.asarray(dh)[np.asarray(wt) == 0] == 0)
    ones = jnp.ones_like(wt)
    a = loss.tiled_next_token_loss(h, w, t, None, tile_len=6)
    b = loss.tiled_next_token_loss(h, w, t, ones, tile_len=6)
    np.testing.assert_allclose([float(x) for x in a], [float(x) for x in b], rtol=1e-6)
    with pytest.raises(ValueError, match="tile_len=0 must be > 0"):
        loss.tiled_next_token_loss(h, w, t, wt, tile_len=0)


def test_bfloat16_hidden_states_follow_the_float32_loss():
    h, w, t, wt = _problem(length=16, seed=2)
    h16 = h.astype(jnp.bfloat16)
    lt, _ = loss.tiled_next_token_loss(h16, w, t, wt, tile_len=4)
    dh, dw = jax.grad(lambda h, w: loss.tiled_next_token_loss(h, w, t, wt, tile_len=4)[0],
                      (0, 1))(h16, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    want = _numpy_loss(np.float32(h16), np.float32(w.astype(jnp.bfloat16)), t, wt, 1.0)
    np.testing.assert_allclose(float(lt), want, rtol=1e-3)
    dh32, dw32 = jax.grad(lambda h, w: loss.tiled_next_token_loss(h, w, t, wt, tile_len=4)[0],
                          (0, 1))(h16.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.float32(dh), np.asarray(dh32), atol=2e-2 * float(jnp.max(jnp.abs(dh32))))
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw32), atol=2e-2 * float(jnp.max(jnp.abs(dw32))))


def test_tiled_gradient_holds_no_full_logits():
    """The compiled gradient's temp memory stays well under one [B, L, V] float32 tensor."""
    b, length, d, v = 4, 256, 32, 4096
    h, w, t, wt = _problem(b, length, d, v)
    full_bytes = b * length * v * 4

    def temp(fn):
        compiled = jax.jit(jax.grad(lambda h, w: fn(h, w)[0], (0, 1))).lower(h, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp(lambda h, w: loss.next_token_loss(loss.head_logits(h, w), t, wt))
    tiled = temp(lambda h, w: loss.tiled_next_token_loss(h, w, t, wt, tile_len=16))
    assert plain >= full_bytes  # the plain loss holds the logits (a check of the measurement)
    assert tiled < full_bytes / 4


def _cfg(*extra):
    return configure.apply_overrides(config.proxy_config("tiny"), MICRO + list(extra))


def _steps(cfg, devices, n_steps=2):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg))
    state = fns.init(jax.random.key(0))
    batches = random_batches(cfg, n_steps + 1, seed=3)
    batches[0]["weights"][:2, :5] = 0.0
    losses = []
    for batch in batches[:n_steps]:
        state, m = fns.train(state, fns.plan.global_batch(batch))
        losses.append(float(m["loss"]))
    ev = fns.evaluate(state, fns.plan.global_batch(batches[-1]))
    return np.array(losses), jax.device_get(state["params"]), float(ev["loss_sum"])


@pytest.mark.parametrize("extra, n_devices", [
    ((), 1),
    (("model.tie_embeddings=false", "train.grad_accum=2", "train.loss_tile_len=5"), 1),
    (("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.scan_layers=true",
      "model.remat_policy=full"), 8),
])
def test_train_and_eval_steps_with_tiled_loss_equal_the_plain_steps(extra, n_devices):
    devices = jax.devices()[:n_devices]
    tiled_extra = extra if any("loss_tile_len" in e for e in extra) else (*extra, "train.loss_tile_len=8")
    plain_extra = tuple(e for e in extra if "loss_tile_len" not in e)
    lp, pp, ep = _steps(_cfg(*plain_extra), devices)
    lt, pt, et = _steps(_cfg(*tiled_extra), devices)
    np.testing.assert_allclose(lt, lp, rtol=1e-5)
    np.testing.assert_allclose(et, ep, rtol=1e-5)
    # Parameters after one AdamW step: Adam divides each gradient by its own RMS, so an element
    # whose gradient is ~0 turns float32 rounding into up to ~1e-5 of movement (seen with jax
    # 0.12: 2.2e-6 on 1 of 16,384); a wrong gradient moves elements by ~the learning rate (3e-3).
    chex.assert_trees_all_close(pt, pp, rtol=1e-4, atol=1e-5)


def test_evaluator_loss_with_tiled_loss_equals_plain():
    plain_cfg = _cfg()
    tiled_cfg = _cfg("train.loss_tile_len=8")
    batches = random_batches(plain_cfg, 2, seed=5)
    batches[1]["weights"][:, -3:] = 0.0
    mesh = sharding.make_mesh(plain_cfg.mesh)
    params = step.make_step_functions(plain_cfg, mesh, optim.make_optimizer(plain_cfg)
                                      ).init(jax.random.key(0))["params"]
    results = [evaluation.Evaluator(c, evaluation.EvalOptions(), batches=batches).dense(params)
               for c in (plain_cfg, tiled_cfg)]
    assert results[0].tokens == results[1].tokens == 2 * 8 * 32 - 8 * 3
    np.testing.assert_allclose(results[1].loss, results[0].loss, rtol=1e-5)
    for a, b in zip(results[0].reports, results[1].reports):
        np.testing.assert_allclose(a.activation_ratio, b.activation_ratio, rtol=1e-6)


@pytest.mark.parametrize("value", ["-1", "33"])
def test_tile_len_outside_its_range_is_a_config_error(value):
    with pytest.raises(config.ConfigError,
                       match=rf"train.loss_tile_len={value} must be 0 \(off\) or in "
                             r"\[1, train.seq_len=32\]"):
        _cfg(f"train.loss_tile_len={value}")
