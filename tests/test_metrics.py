"""sparsejax.metrics against plain-numpy implementations written here
(docs/sparsity_metrics_and_laws.md §Criteria, §Chunk-level sparsity, §Dead neurons).
CETT: tests/test_cett.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffn_data import N_LAYERS, random_layers
from sparsejax import metrics, sparsity

FLOOR32 = np.float32(1e-18)


# --------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------

def np_ratio(mask):
    return mask.sum(axis=1).mean() / mask.shape[1]


# --------------------------------------------------------------------------------------------
# zero, FAT, top-k, ratios
# --------------------------------------------------------------------------------------------

def test_zero_criterion_and_ratio():
    for act, _, _ in random_layers(0, 64, 48, zeros=0.6):
        mask = np.asarray(metrics.zero_active_TxF(jnp.asarray(act)))
        np.testing.assert_array_equal(mask, act != 0)
        assert abs(float(metrics.activation_ratio(mask)) - np_ratio(act != 0)) < 1e-6


def test_fat_matches_threshold_and_eps0_vs_zero():
    for act, _, _ in random_layers(1, 64, 48, zeros=0.3):
        for eps in (0.0, 0.01, 0.5, 1.0):
            expected = np.abs(act) >= np.float32(eps + 1e-18)
            mask = np.asarray(metrics.fat_active_TxF(jnp.asarray(act), eps))
            np.testing.assert_array_equal(mask, expected)
            assert abs(float(metrics.activation_ratio(mask)) - np_ratio(expected)) < 1e-6
        # ε = 0 is the zero criterion when no magnitude lies in (0, 1e-18) ...
        np.testing.assert_array_equal(np.asarray(metrics.fat_active_TxF(act, 0.0)), act != 0)
    # ... and differs exactly there: the reference's 1e-18 floor.
    tiny = np.array([[0.0, 1e-20, -5e-19, 1e-18, 2e-18, 1.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(metrics.fat_active_TxF(tiny, 0.0)),
                                  [[False, False, False, True, True, True]])
    np.testing.assert_array_equal(np.asarray(metrics.zero_active_TxF(tiny)),
                                  [[False, True, True, True, True, True]])
    # A traced ε gives the same mask away from the float32 rounding of ε + 1e-18.
    act = random_layers(1, 64, 48)[0][0]
    np.testing.assert_array_equal(np.asarray(jax.jit(metrics.fat_active_TxF)(act, 0.3)),
                                  np.abs(act) >= np.float32(0.3))


def test_topk_per_token_matches_argsort():
    topk = jax.jit(metrics.topk_active_TxF, static_argnums=1)
    for act, _, _ in random_layers(2, 40, 64):  # continuous: no ties, no zeros
        for k in (1, 5, 64, 0.25):
            count = sparsity.topk_count(k, 64)
            expected = np.zeros(act.shape, bool)
            np.put_along_axis(expected, np.argsort(-np.abs(act), axis=1)[:, :count], True, axis=1)
            mask = np.asarray(topk(act, k))
            np.testing.assert_array_equal(mask, expected)
            assert (mask.sum(axis=1) == count).all()
            assert abs(float(metrics.activation_ratio(mask)) - count / 64) < 1e-6
    assert sparsity.topk_count(0.25, 64) == 64 - int(64 * 0.75)
    # Fewer non-zeros than k: the zeros stay inactive (the reference's 1e-18 floor).
    sparse_act = np.array([[0.0, 3.0, 0.0, -1.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(metrics.topk_active_TxF(sparse_act, 3)),
                                  [[False, True, False, True]])


def test_global_topk_matches_numpy_quantile_selection():
    for act, _, _ in random_layers(3, 50, 30, zeros=0.2):
        for fraction in (0.05, 0.3, 0.5, 1.0):
            mags = np.abs(act).ravel()
            num_to_zero = int(mags.size * (1 - fraction))
            # The cut is the num_to_zero-th smallest magnitude (the (1 − f) empirical quantile);
            # zeros tie, and the reference's floor keeps every zero inactive anyway.
            cut = np.sort(mags)[num_to_zero - 1] if num_to_zero else -np.inf
            expected = ((np.abs(act) > cut) & (np.abs(act) >= FLOOR32))
            mask = np.asarray(metrics.global_topk_active_TxF(jnp.asarray(act), fraction))
            np.testing.assert_array_equal(mask, expected)
            assert abs(float(metrics.activation_ratio(mask)) - np_ratio(expected)) < 1e-6
    act = random_layers(3, 50, 30)[0][0]
    assert int(np.asarray(metrics.global_topk_active_TxF(act, 0.3)).sum()) == \
        act.size - int(act.size * 0.7)


def test_all_zero_activations_are_inactive_under_every_criterion():
    zeros = np.zeros((20, 16), np.float32)
    assert float(metrics.activation_ratio(metrics.zero_active_TxF(zeros))) == 0.0
    assert float(metrics.activation_ratio(metrics.fat_active_TxF(zeros, 0.0))) == 0.0
    assert float(metrics.activation_ratio(metrics.topk_active_TxF(zeros, 4))) == 0.0
    assert float(metrics.activation_ratio(metrics.global_topk_active_TxF(zeros, 0.5))) == 0.0


def test_dead_neurons():
    rng = np.random.default_rng(4)
    for _ in range(N_LAYERS):
        rates = rng.choice([0.0, 0.0005, 0.01, 0.5], size=40)
        active = rng.random((5000, 40)) < rates
        dead, share = metrics.dead_neurons(jnp.asarray(active))
        expected = active.mean(axis=0) < 1e-3
        np.testing.assert_array_equal(np.asarray(dead), expected)
        assert abs(float(share) - expected.mean()) < 1e-6
        dead_loose, _ = metrics.dead_neurons(active, min_rate=0.1)
        np.testing.assert_array_equal(np.asarray(dead_loose), active.mean(axis=0) < 0.1)


# --------------------------------------------------------------------------------------------
# chunk sparsity and histograms
# --------------------------------------------------------------------------------------------

def np_chunk_sparsity(active, chunk_len, valid=None):
    n_batch, seq_len, d_ff = active.shape
    valid = np.ones((n_batch, seq_len), bool) if valid is None else valid
    inactive, chunks = 0, 0
    for b in range(n_batch):
        for start in range(0, seq_len - chunk_len + 1, chunk_len):
            if not valid[b, start:start + chunk_len].all():
                continue
            chunks += 1
            for i in range(d_ff):
                inactive += not active[b, start:start + chunk_len, i].any()
    return inactive / (chunks * d_ff) if chunks else float("nan")


def test_chunk_sparsity_matches_loop():
    rng = np.random.default_rng(5)
    for _ in range(N_LAYERS):
        # Neurons with different rates, so chunk sparsity falls with the chunk length.
        active = rng.random((3, 37, 24)) < rng.uniform(0.0, 0.4, size=24)
        valid = np.ones((3, 37), bool)
        valid[1, 30:] = False  # right padding
        curve = np.asarray(metrics.chunk_sparsity_curve(active, metrics.CHUNK_LENS, valid))
        for c, got in zip(metrics.CHUNK_LENS, curve):
            assert abs(got - np_chunk_sparsity(active, c, valid)) < 1e-6
            assert abs(float(metrics.chunk_sparsity(active, c)) - np_chunk_sparsity(active, c)) < 1e-6
        assert np.all(np.diff(curve) <= 1e-7)
        # Chunk length 1 is token-level sparsity.
        flat = active.reshape(-1, 24)
        assert abs(float(metrics.chunk_sparsity(active, 1)) - (1 - np_ratio(flat))) < 1e-6
    # No full chunk at all: NaN, not a made-up number.
    assert math.isnan(float(metrics.chunk_sparsity(np.ones((1, 3, 4), bool), 4)))


def test_independent_chunk_density_formula():
    rates = np.array([0.0, 0.1, 0.5, 1.0])
    np.testing.assert_allclose(metrics.independent_chunk_density(rates, 8), 1 - (1 - rates) ** 8)
    assert metrics.independent_chunk_density(0.1, 1) == pytest.approx(0.1)


def test_activation_histogram_matches_bin_loop():
    edges = metrics.log_bin_edges(1e-3, 10.0, 12)
    for act, _, _ in random_layers(6, 80, 32, zeros=0.3):
        counts = np.asarray(jax.jit(metrics.activation_histogram)(act, edges))
        mags = np.abs(act).ravel()
        expected = [np.sum(mags < edges[0])]
        expected += [np.sum((mags >= lo) & (mags < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
        expected += [np.sum(mags >= edges[-1])]
        np.testing.assert_array_equal(counts, expected)
        assert counts.sum() == act.size
    np.testing.assert_allclose(np.log10(edges), np.linspace(-3, 1, 13), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------

def test_streaming_stats_equal_one_shot():
    rng = np.random.default_rng(20)
    edges = metrics.log_bin_edges(1e-3, 10.0, 16)
    update = jax.jit(metrics.stats_update)
    for _ in range(N_LAYERS):
        act = (rng.standard_normal((6, 40, 32)) * (rng.random((6, 40, 32)) < 0.3)).astype(np.float32)
        valid = np.ones((6, 40), bool)
        valid[4, 25:] = False
        active = act != 0
        stats = metrics.stats_init(32, hist_edges=edges)
        for lo, hi in ((0, 2), (2, 3), (3, 6)):
            stats = update(stats, active[lo:hi], act[lo:hi], valid[lo:hi])
        report = metrics.stats_finalize(stats)

        tokens = active[valid]
        rate = tokens.mean(axis=0)
        assert int(stats.n_tokens) == valid.sum()
        assert abs(float(report.activation_ratio) - np_ratio(tokens)) < 1e-6
        np.testing.assert_allclose(np.asarray(report.neuron_rate_F), rate, atol=1e-6)
        one_shot_dead, one_shot_share = metrics.dead_neurons(tokens)
        np.testing.assert_array_equal(np.asarray(report.dead_F), np.asarray(one_shot_dead))
        assert float(report.dead_share) == float(one_shot_share)
        for c, got in zip(metrics.CHUNK_LENS, np.asarray(report.chunk_sparsity_C)):
            assert abs(got - np_chunk_sparsity(active, c, valid)) < 1e-6
        np.testing.assert_allclose(np.asarray(report.chunk_sparsity_independent_C),
                                   [np.mean((1 - rate) ** c) for c in metrics.CHUNK_LENS],
                                   atol=1e-6)
        np.testing.assert_array_equal(np.asarray(report.hist_count_S),
                                      np.asarray(metrics.activation_histogram(act[valid], edges)))


def test_streaming_stats_vmap_over_layers():
    rng = np.random.default_rng(21)
    active_NxBxLxF = rng.random((N_LAYERS, 2, 16, 8)) < 0.2
    stats = jax.vmap(lambda _: metrics.stats_init(8, chunk_lens=(1, 4)))(jnp.arange(N_LAYERS))
    stats = jax.vmap(metrics.stats_update)(stats, active_NxBxLxF)
    report = jax.vmap(metrics.stats_finalize)(stats)
    for layer in range(N_LAYERS):
        for c, got in zip((1, 4), np.asarray(report.chunk_sparsity_C[layer])):
            assert abs(got - np_chunk_sparsity(active_NxBxLxF[layer], c)) < 1e-6


# --------------------------------------------------------------------------------------------
# error paths
# --------------------------------------------------------------------------------------------

def test_errors_name_argument_and_range():
    act = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"activation_TxF must be 2-D"):
        metrics.zero_active_TxF(np.ones((2, 4, 8)))
    for bad in (0, -1, 9):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, d_ff=8\]"):
            metrics.topk_active_TxF(act, bad)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"k as a fraction must be in \(0, 1\]"):
            metrics.topk_active_TxF(act, bad)
    with pytest.raises(ValueError, match=r"k must be an int"):
        sparsity.topk_count(True, 8)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"fraction must be a float in \(0, 1\]"):
            metrics.global_topk_active_TxF(act, bad)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=r"chunk_len must be an int >= 1"):
            metrics.chunk_sparsity(np.ones((1, 8, 4), bool), bad)
    with pytest.raises(ValueError, match=r"chunk_len must be an int >= 1"):
        metrics.stats_init(4, chunk_lens=(1, 0))
    with pytest.raises(ValueError, match=r"active_BxLxF must be 3-D"):
        metrics.chunk_sparsity(np.ones((8, 4), bool), 2)
    with pytest.raises(ValueError, match=r"valid_BxL must have shape \(1, 8\)"):
        metrics.chunk_sparsity(np.ones((1, 8, 4), bool), 2, np.ones((1, 7), bool))
    with pytest.raises(ValueError, match=r"eps must be >= 0"):
        metrics.fat_active_TxF(act, -0.1)
    with pytest.raises(ValueError, match=r"active_BxLxF has d_ff=4, the stats 8"):
        metrics.stats_update(metrics.stats_init(8), np.ones((1, 2, 4), bool))
    with pytest.raises(ValueError, match=r"0 < low < high"):
        metrics.log_bin_edges(0.0, 1.0, 4)
