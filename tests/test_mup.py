"""sparsejax.mup: µP's initialisation and learning rates, the parameter classes they apply to, and
the coordinate check (benchmarks/mup_coord_check.py) that shows µP keeps activations and updates
O(1) across widths while standard parameterisation does not."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import config, configure, model as model_lib, mup, optim
from sparsejax.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import mup_coord_check  # noqa: E402

MUP = ["model.mup=true", "model.dim_model_base=32", "model.init_std=0.1", "model.scale_emb=12",
       "model.scale_depth=1.4"]


def _cfg(*sets):
    return configure.apply_overrides(config.proxy_config("tiny"), ["model.d_model=128",
                                                                   "model.n_heads=4", *sets])


def test_init_stds_and_lr_multipliers_follow_minicpm():
    sp, mp = _cfg().model, _cfg(*MUP).model
    assert mup.width_multiplier(sp) == 1.0 and mup.width_multiplier(mp) == 128 / 32
    assert mup.init_stds(sp) == (0.02, 0.02, 0.02 / np.sqrt(2 * sp.n_layers))
    assert mup.init_stds(mp) == pytest.approx((0.1, 0.1 / 2, 0.1 / 2))  # init_std / √(128/32)
    assert mup.lr_multipliers(sp) == dict.fromkeys((mup.MATRIX, mup.OUTPUT, mup.EMBEDDING, mup.VECTOR), 1.0)
    assert mup.lr_multipliers(mp) == {mup.MATRIX: 0.25, mup.OUTPUT: 1.0, mup.EMBEDDING: 1.0,
                                      mup.VECTOR: 1.0}


@pytest.mark.parametrize("scan", [False, True])
def test_parameter_classes_of_a_real_model(scan):
    cfg = _cfg(*MUP, "model.tie_embeddings=false", f"model.scan_layers={str(scan).lower()}")
    params = model_lib.Model(cfg.model).init(jax.random.key(0), 16)
    flat = jax.tree_util.tree_flatten_with_path(mup.classes(params))[0]
    by_path = {"/".join(str(k.key) for k in path): cls for path, cls in flat}
    assert by_path["embed/embedding"] == mup.EMBEDDING
    assert by_path["unembed/kernel"] == mup.OUTPUT
    assert by_path["final_norm/scale"] == mup.VECTOR
    layer = "layers" if scan else "layer_0"
    for name in ("attn/query", "attn/key", "attn/value", "attn/out", "ffn/w_in", "ffn/w_gate", "ffn/w_out"):
        assert by_path[f"{layer}/{name}/kernel"] == mup.MATRIX, name
    assert by_path[f"{layer}/attn_norm/scale"] == mup.VECTOR
    # Every leaf is classed, and only matrices are scaled.
    assert len(by_path) == len(jax.tree.leaves(params))


def test_mup_initialisation_draws_the_stated_stds():
    cfg = _cfg(*MUP, "model.d_model=256", "model.d_ff=640", "model.n_heads=8", "model.tie_embeddings=false")
    params = model_lib.Model(cfg.model).init(jax.random.key(1), 16)
    m = 256 / 32
    np.testing.assert_allclose(np.std(params["embed"]["embedding"]), 0.1, rtol=0.05)
    for w in (params["layer_0"]["ffn"]["w_in"]["kernel"], params["layer_0"]["ffn"]["w_out"]["kernel"],
              params["layer_1"]["attn"]["out"]["kernel"], params["unembed"]["kernel"]):
        np.testing.assert_allclose(np.std(w), 0.1 / np.sqrt(m), rtol=0.05)
    # Standard parameterisation is unchanged: init_std, branch outputs / √(2 n_layers).
    sp = model_lib.Model(_cfg("model.d_model=256", "model.d_ff=640", "model.n_heads=8").model).init(
        jax.random.key(1), 16)
    np.testing.assert_allclose(np.std(sp["layer_0"]["ffn"]["w_in"]["kernel"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(sp["layer_0"]["ffn"]["w_out"]["kernel"]), 0.02 / np.sqrt(2 * 5), rtol=0.05)


def test_mup_optimizer_scales_matrix_updates_by_base_over_width():
    """Adam's first update is −lr·g/(|g|+ε) ≈ −lr·sign(g): so |update| is the learning rate of each
    class, lr/m for matrices and lr elsewhere (weight decay 0 to isolate it)."""
    cfg = _cfg(*MUP, "train.learning_rate=0.01", "train.warmup_steps=0", "train.schedule=constant",
               "train.weight_decay=0", "train.grad_clip=0", "model.tie_embeddings=false")
    params = model_lib.Model(cfg.model).init(jax.random.key(0), 16)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tx = optim.make_optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr, m = 0.01, 128 / 32
    expected = {mup.MATRIX: lr / m, mup.OUTPUT: lr, mup.EMBEDDING: lr, mup.VECTOR: lr}
    for cls, upd in zip(jax.tree.leaves(mup.classes(params)), jax.tree.leaves(updates)):
        np.testing.assert_allclose(np.abs(upd), expected[cls], rtol=1e-4)


def test_mup_weight_decay_is_scaled_with_the_matrix_learning_rate():
    """Decoupled decay is −lr_class·wd·w: zero gradients leave only it."""
    cfg = _cfg(*MUP, "train.learning_rate=0.1", "train.warmup_steps=0", "train.schedule=constant",
               "train.weight_decay=0.5", "train.grad_clip=0")
    params = model_lib.Model(cfg.model).init(jax.random.key(0), 16)
    tx = optim.make_optimizer(cfg)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    w = params["layer_0"]["ffn"]["w_in"]["kernel"]
    np.testing.assert_allclose(updates["layer_0"]["ffn"]["w_in"]["kernel"], -0.1 / 4 * 0.5 * w, rtol=1e-5)
    np.testing.assert_allclose(updates["embed"]["embedding"], -0.1 * 0.5 * params["embed"]["embedding"],
                               rtol=1e-5)
    assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0


def test_standard_parameterisation_keeps_its_optimizer_state_layout():
    """Without µP nothing is added to the chain, so checkpoints of earlier runs restore as before."""
    cfg = _cfg()
    params = model_lib.Model(cfg.model).init(jax.random.key(0), 16)
    plain = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.adamw(optim.learning_rate_schedule(cfg.train), mask=mup.decayed))
    assert (jax.tree.structure(optim.make_optimizer(cfg).init(params))
            == jax.tree.structure(plain.init(params)))
    train_only = optim.make_optimizer(cfg.train)
    assert jax.tree.structure(train_only.init(params)) == jax.tree.structure(plain.init(params))


def test_mup_needs_dim_model_base():
    with pytest.raises(ConfigError, match=r"model.mup=true needs model.dim_model_base > 0"):
        _cfg("model.mup=true")


def test_paper_presets_train_with_mup_and_one_learning_rate():
    for size in config.PAPER_SIZES:
        cfg = configure.load(str(ROOT / f"configs/sparsing_law_{size}.py"), [])
        m = cfg.model
        assert (m.mup, m.scale_emb, m.scale_depth, m.dim_model_base, m.init_std) == (True, 12.0, 1.4, 256, 0.1)
        assert cfg.train.learning_rate == 0.01
        assert mup.lr_multipliers(m)[mup.MATRIX] == pytest.approx(256 / m.d_model)


@pytest.mark.slow
def test_coordinate_check_is_flat_under_mup_and_grows_under_standard():
    widths = (32, 64, 128)
    sp = mup_coord_check.coordinate_check(widths, 0, steps=2, lr=1e-2)
    mp = mup_coord_check.coordinate_check(widths, 32, steps=2, lr=1e-2)
    sp_slopes = mup_coord_check.slopes(sp, "change", 2)
    mp_slopes = mup_coord_check.slopes(mp, "change", 2)
    assert set(sp_slopes) == set(mp_slopes) and {"logits", "layer_1", "layer_1/ffn"} <= set(mp_slopes)
    # µP: every site's update size is flat in width (within ±0.3 per doubling of width).
    assert all(abs(s) < 0.3 for s in mp_slopes.values()), mp_slopes
    # Standard: the hidden and output layers' updates grow with width.
    for site in ("layer_0", "layer_1", "layer_1/ffn", "layer_1/attn", "logits"):
        assert sp_slopes[site] > 0.5, (site, sp_slopes)
    # The check is computed from the model's own outputs: at step 0 nothing has changed.
    assert all(r["change"] == 0.0 for r in mp if r["step"] == 0)
