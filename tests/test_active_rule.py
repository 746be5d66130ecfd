"""The one "active" rule (``sparsity.active``) and the one fraction → k rule at every caller.

Each caller is checked against :func:`want_active`, an element-by-element restatement of the rule
in plain Python: a value is active iff it is NaN, or the threshold is NaN, or (zero rule) it is
not 0, or (threshold t) |v| ≥ t. The values cover 0 and −0, magnitudes below the 1e-18 floor,
exactly-at-threshold and one float32 ulp either side, NaN and ±inf. (Subnormals are left out:
XLA's CPU backend flushes them to zero, the NumPy reference does not.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import decode_ffn, ffn, metrics, sparsity
from sparsejax import cett
from sparsejax.kernels import block_mask as bm
from sparsejax.kernels import sharded
from sparsejax.schedules import Schedule
from sparsejax.sparsity import Sparsity

EPS = 0.25  # exact in float32
F32 = np.float32
VALUES = np.array([0.0, -0.0, 1e-30, -1e-19, 3e-18, F32(EPS), -F32(EPS),
                   np.nextafter(F32(EPS), F32(0)), np.nextafter(F32(EPS), F32(1)), np.nan,
                   -np.nan, np.inf, -np.inf, 3.0, -0.1], np.float32)
# The rules every caller applies: the zero rule (None), FAT-0 and FAT-ε (threshold with floor).
RULES = {"zero": None, "fat0": F32(0.0 + 1e-18), "fat_eps": F32(EPS + 1e-18)}


def want_active(values, threshold) -> np.ndarray:
    """The rule, element by element (the independent computation)."""
    values = np.asarray(values, np.float32)
    thresholds = np.broadcast_to(np.asarray(np.nan if threshold is None else threshold,
                                            np.float32), values.shape)
    out = np.zeros(values.shape, bool)
    for i in np.ndindex(values.shape):
        v, t = float(values[i]), float(thresholds[i])
        if threshold is None:
            out[i] = math.isnan(v) or v != 0.0
        else:
            out[i] = math.isnan(v) or math.isnan(t) or abs(v) >= t
    return out


def test_the_rule_itself():
    assert F32(EPS + 1e-18) == sparsity.fat_threshold(EPS)  # the floor is below float32's ulp here
    for name, t in RULES.items():
        got = np.asarray(sparsity.active(jnp.asarray(VALUES), t))
        np.testing.assert_array_equal(got, want_active(VALUES, t), err_msg=name)
    # spot checks of what the table above pins
    at = list(VALUES).index(F32(EPS))
    assert bool(sparsity.active(jnp.asarray(VALUES), RULES["fat_eps"])[at])  # |x| == ε: active
    assert not bool(sparsity.active(jnp.asarray(VALUES), RULES["fat0"])[2])  # 1e-30 < floor
    assert bool(sparsity.active(jnp.asarray(VALUES))[2])  # but ≠ 0
    assert bool(sparsity.active(jnp.asarray([np.nan]), RULES["fat_eps"])[0])


# ------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("rule", ["zero", "fat0", "fat_eps"])
def test_in_block_statistics_and_metrics(rule):
    t = RULES[rule]
    act_1xLx2 = jnp.asarray(np.stack([VALUES, VALUES[::-1]], -1)[None])
    want_LxF = want_active(np.asarray(act_1xLx2[0]), t)
    weights = jnp.ones(act_1xLx2.shape[:2])
    sp = Sparsity(stats_weights_BxL=weights, stats_threshold=t, chunk_len=1)
    # the FFN's per-layer statistics (count per neuron, total) and chunk statistics
    aux = ffn._aux(act_1xLx2, act_1xLx2, sp)
    np.testing.assert_array_equal(np.asarray(aux.active_count_F), want_LxF.sum(0))
    assert float(aux.active_sum) == want_LxF.sum()
    assert float(aux.stats["chunk_active"]) == want_LxF.sum()
    # the evaluation criteria
    if rule == "zero":
        got = metrics.zero_active_TxF(act_1xLx2[0])
    else:
        got = metrics.fat_active_TxF(act_1xLx2[0], 0.0 if rule == "fat0" else EPS)
    np.testing.assert_array_equal(np.asarray(got), want_LxF)


def test_training_topk_keep_is_the_zero_rule_on_hidden():
    """With a training top-k the statistics count a neuron only where its hidden value survived
    the mask: the zero rule on hidden (a NaN hidden value is kept, so counted)."""
    hidden_1xLx1 = jnp.asarray(VALUES[None, :, None])
    ones = jnp.ones_like(hidden_1xLx1)
    sp = Sparsity(stats_weights_BxL=jnp.ones(hidden_1xLx1.shape[:2]), topk_k=1)
    count_F, _ = sparsity.layer_stats(ones, hidden_1xLx1, sp)
    assert float(count_F[0]) == want_active(VALUES, None).sum()
    np.testing.assert_array_equal(np.asarray(sparsity.trained_keep(hidden_1xLx1, True))[0, :, 0],
                                  want_active(VALUES, None))
    assert sparsity.trained_keep(hidden_1xLx1, False) is None


def test_decode_step_active_mask():
    act_Nx2 = jnp.asarray(np.stack([VALUES, VALUES], -1))
    thresholds = jnp.asarray([RULES["fat0"], RULES["fat_eps"]])
    got = decode_ffn.active_mask(act_Nx2, Sparsity(thresholds=thresholds))
    np.testing.assert_array_equal(np.asarray(got), want_active(act_Nx2, np.asarray(thresholds)))
    np.testing.assert_array_equal(np.asarray(decode_ffn.active_mask(act_Nx2, Sparsity())),
                                  want_active(act_Nx2, None))


# ------------------------------------------------------------------------------------- CETT
@pytest.mark.parametrize("t", [0.0, EPS])
@pytest.mark.parametrize("zero_rule", ["floor", "reference"])
def test_cett_activity(t, zero_rule):
    """Neuron i is active iff not |h_i| < t / ‖W_out[i]‖ (+ floor): output norms 1, 2 and 0, and
    hidden values scaled so that some sit exactly on each neuron's threshold."""
    w_out_3xD = np.array([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]], np.float32)
    hidden_Lx3 = np.stack([VALUES, VALUES / 2, VALUES], -1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_neuron = F32(t) / np.array([1, 2, 0], np.float32)
    if zero_rule == "floor":
        per_neuron = np.where(np.isnan(per_neuron), F32(0), per_neuron) + F32(1e-18)
    got = cett.cett_active_TxF(jnp.asarray(hidden_Lx3), jnp.asarray(w_out_3xD), t, zero_rule)
    want = want_active(hidden_Lx3, per_neuron)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert want[list(VALUES).index(F32(EPS)), :2].all()  # exactly at t / ‖W_out[i]‖: active
    assert want[np.isnan(VALUES)].all()  # NaN: active, whatever the threshold


# --------------------------------------------------------------------------- kernel tile masks
def test_kernel_element_rule():
    """Tiles are skipped by the zero rule at threshold 0 (not FAT-0's floor: a skipped tile must
    hold only exact zeros) and by FAT-ε above it; NaN is active under both."""
    x = jnp.asarray(VALUES)
    np.testing.assert_array_equal(np.asarray(bm.active_TxF(x, 0.0)), want_active(VALUES, None))
    np.testing.assert_array_equal(np.asarray(bm.active_TxF(x, EPS)),
                                  want_active(VALUES, RULES["fat_eps"]))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        bm.active_TxF(x, -1.0)


def _one_value_per_tile(values_NxM, block_t, block_f):
    """An activation whose tile (n, m) holds values_NxM[n, m] at one entry and zeros elsewhere."""
    n, m = values_NxM.shape
    act = np.zeros((n * block_t, m * block_f), np.float32)
    for (i, j), v in np.ndenumerate(values_NxM):
        act[i * block_t + 1, j * block_f + 2] = v
    return act


@pytest.mark.parametrize("threshold", [0.0, EPS])
def test_tile_mask_from_activations(threshold):
    bt, bf = 2, 4
    values_NxM = VALUES[:15].reshape(3, 5)
    act = _one_value_per_tile(values_NxM, bt, bf)
    mask = bm.from_activations(jnp.asarray(act), bt, bf, threshold=threshold)
    want_NxM = want_active(values_NxM, None if threshold == 0 else RULES["fat_eps"])
    np.testing.assert_array_equal(np.asarray(bm.to_dense_NxM(mask, 5)), want_NxM)
    np.testing.assert_array_equal(np.asarray(mask.n_active_N), want_NxM.sum(1))


def test_k_max_never_drops_a_nan_tile():
    """Over the cap the tiles with the largest Σ|σ| are kept, and a tile holding a NaN ranks
    first: its NaN reaches the output instead of being dropped for an inactive or smaller tile."""
    act = _one_value_per_tile(np.array([[5.0, np.nan, 1.0, 0.0]], np.float32), 2, 4)
    mask = bm.from_activations(jnp.asarray(act), 2, 4, k_max=2)
    np.testing.assert_array_equal(np.asarray(mask.index_NxK), [[0, 1]])
    assert int(mask.n_active_N[0]) == 3
    # no cap: every active tile, and never the inactive one
    full = bm.from_activations(jnp.asarray(act), 2, 4)
    np.testing.assert_array_equal(np.asarray(bm.to_dense_NxM(full, 4)), [[1, 1, 1, 0]])
    # an active tile with a −inf score still ranks above an inactive one
    capped = bm.from_block_activity(jnp.asarray([[False, True, False]]), k_max=1,
                                    score_NxM=jnp.asarray([[0.0, -np.inf, 0.0]]))
    np.testing.assert_array_equal(np.asarray(capped.index_NxK), [[1]])


@pytest.mark.parametrize("impl", [pytest.param("tpu", marks=pytest.mark.slow), "jax"])  # tpu: interpret mode
def test_kernel_computes_the_tiles_the_rule_marks(impl):
    """The Pallas TPU kernel (interpret mode) and the pure-JAX tile path, with the mask taken
    from a given σ(gate) by the kernels' rule: equal to the dense FFN with the tile mask of the
    independent rule. The σ values per tile are: exactly ε (active), one ulp below (inactive), a
    NaN (active) and 0 (inactive)."""
    bt, bf, d = 8, 128, 128
    values_NxM = np.array([[F32(EPS), np.nextafter(F32(EPS), F32(0))], [np.nan, 0.0]], np.float32)
    act_TxF = _one_value_per_tile(values_NxM, bt, bf)
    t, f = act_TxF.shape
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (1, t, d))
    w_in, w_gate = (jax.random.normal(k, (d, f)) / d ** 0.5 for k in ks[1:3])
    w_out = jax.random.normal(ks[3], (f, d)) / f ** 0.5
    y = sharded.block_sparse_ffn(x, jnp.asarray(act_TxF[None]), w_in, w_gate, w_out, jax.nn.relu,
                                 block_t=bt, block_f=bf, threshold=EPS, impl=impl,
                                 dense_fallback_density=1.0, interpret=True)
    tiles_NxM = want_active(values_NxM, RULES["fat_eps"])
    assert tiles_NxM.tolist() == [[True, False], [True, False]]
    keep_TxF = np.repeat(np.repeat(tiles_NxM, bt, 0), bf, 1)
    x64 = np.asarray(x[0], np.float64)
    hidden = np.maximum(x64 @ np.asarray(w_gate, np.float64), 0) * (x64 @ np.asarray(w_in, np.float64))
    want = (hidden * keep_TxF) @ np.asarray(w_out, np.float64)
    np.testing.assert_allclose(np.asarray(y[0]), want, rtol=0, atol=1e-4 * np.abs(want).max())


# --------------------------------------------------------------------------- fraction → k
def test_fraction_to_k_is_one_function_with_one_meaning_of_zero():
    d_ff = 320
    reference = lambda f, n: n - int(n * (1.0 - f))  # noqa: E731 - prune_topk's count
    assert sparsity.config_topk_k(0, d_ff) == sparsity.config_topk_k(0.0, d_ff) == d_ff  # dense
    for f in (0.1, 0.25, 0.5, 0.9, 0.999):
        assert sparsity.config_topk_k(f, d_ff) == sparsity.topk_count(f, d_ff) == reference(f, d_ff)
    assert sparsity.config_topk_k(12.0, d_ff) == sparsity.config_topk_k(12, d_ff) == 12
    assert sparsity.config_topk_k(1.0, d_ff) == 1  # a whole number is a count, 1 included
    # a schedule's stages in counts: the same function, 0 -> d_ff
    from sparsejax.sparsity_plan import topk_counts

    counts = topk_counts(Schedule("stages", (0.0, 0.9, 24.0, 0.0), (0, 10, 20)), d_ff)
    assert counts.values == (d_ff, reference(0.9, d_ff), 24.0, d_ff)
    # the reference's global top-k drops what topk_count does not keep, over all entries
    act = jnp.asarray(np.random.default_rng(0).normal(size=(7, 11)).astype(np.float32) + 5)
    for f in (0.1, 0.3, 0.9):
        assert int(sparsity.global_topk_active(act, f).sum()) == reference(f, 77)


@pytest.mark.parametrize("bad", [-1, -0.5, 2.5, float("nan"), True, "0.5", 321])
def test_config_topk_k_errors(bad):
    with pytest.raises(ValueError, match="0 \\(dense\\), a fraction in \\(0, 1\\)|d_ff=320"):
        sparsity.config_topk_k(bad, 320)
