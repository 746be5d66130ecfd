"""sparsejax.metrics against plain-numpy implementations written here (SPEC §1, §5, §6)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import metrics

N_LAYERS = 3
FLOOR32 = np.float32(1e-18)


def _layers(seed, n_tokens, d_ff, d_model=None, zeros=0.0):
    """Per-layer (activation, hidden, w_out) with gated-FFN-like magnitudes; ``zeros`` is the
    share of exact zeros in the activation (ReLU-like)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_LAYERS):
        act = rng.standard_normal((n_tokens, d_ff)).astype(np.float32)
        act[rng.random((n_tokens, d_ff)) < zeros] = 0.0
        hidden = (act * rng.standard_normal((n_tokens, d_ff))).astype(np.float32)
        w = None if d_model is None else \
            (rng.standard_normal((d_ff, d_model)) / np.sqrt(d_ff)).astype(np.float32)
        out.append((act, hidden, w))
    return out


# --------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------

def np_ratio(mask):
    return mask.sum(axis=1).mean() / mask.shape[1]


def np_scores(hidden, w):
    return np.abs(hidden) * np.linalg.norm(w, axis=1)  # float32, like the metric


def np_cett(hidden, w, t, scores=None):
    """Float64 CETT(t): mean over tokens of ‖Σ_{score ≤ t} n_i‖ / ‖FFN(x)‖, 0 where ‖FFN‖ = 0."""
    scores = np_scores(hidden, w) if scores is None else scores
    h64, w64 = hidden.astype(np.float64), w.astype(np.float64)
    full = np.linalg.norm(h64 @ w64, axis=1)
    tail = np.linalg.norm(np.where(scores <= t, h64, 0.0) @ w64, axis=1)
    return np.mean(np.where(full > 0, tail / np.where(full > 0, full, 1.0), 0.0))


def np_grid(scores_flat, n):
    """The reference grid: float32 linspace (torch's two-sided form) from the minimum to the
    linear 0.99 quantile of every ⌊numel / n⌋-th score."""
    low = scores_flat.min()
    sub = np.sort(scores_flat[::max(scores_flat.size // n, 1)].astype(np.float64))
    pos = 0.99 * (sub.size - 1)
    below = int(math.floor(pos))
    above = min(below + 1, sub.size - 1)
    high = np.float32(sub[below] + (sub[above] - sub[below]) * (pos - below))
    step = np.float32(high - low) / np.float32(n - 1)
    grid = np.empty(n, np.float32)
    for i in range(n):
        grid[i] = low + step * np.float32(i) if i < n // 2 else high - step * np.float32(n - 1 - i)
    return grid


def np_bisect(cett_of_index, n, target):
    """The reference bisection with the documented edges; returns (index, #evaluations)."""
    values = {}
    left, right = 0, n - 1
    while left < right:
        mid = (left + right) // 2
        values[mid] = cett_of_index(mid)
        if values[mid] > target:
            right = mid
        else:
            left = mid + 1
    if left == 0:
        return 0, values
    if left == n - 1:
        values[n - 1] = cett_of_index(n - 1)
        return (n - 1 if values[n - 1] <= target else n - 2), values
    return left - 1, values


def np_reference_search(hidden, w, target, n=metrics.CETT_NUM_CANDIDATES):
    scores = np_scores(hidden, w)
    grid = np_grid(scores.ravel(), n)
    index, values = np_bisect(lambda i: np_cett(hidden, w, grid[i], scores), n, target)
    return grid, index, values


def np_all_cett(hidden, w, grid):
    """CETT at every candidate through per-token sorted prefix sums (small shapes only)."""
    scores = np_scores(hidden, w)
    h64, w64 = hidden.astype(np.float64), w.astype(np.float64)
    full = np.linalg.norm(h64 @ w64, axis=1)
    total = np.zeros(grid.size)
    for tok in range(hidden.shape[0]):
        order = np.argsort(scores[tok], kind="stable")
        prefix = np.concatenate([np.zeros((1, w.shape[1])),
                                 np.cumsum(h64[tok, order, None] * w64[order], axis=0)])
        count = np.searchsorted(scores[tok, order], grid, side="right")
        if full[tok] > 0:
            total += np.linalg.norm(prefix[count], axis=1) / full[tok]
    return total / hidden.shape[0]


def exact_norm_w(rng, d_ff, d_model):
    """Rows c_i · e_{i mod D} with c_i a signed power of two: every row norm is exact, so numpy
    and JAX scores agree bit for bit (used to compare thresholds exactly)."""
    w = np.zeros((d_ff, d_model), np.float32)
    w[np.arange(d_ff), np.arange(d_ff) % d_model] = \
        rng.choice([-2.0, -0.5, 0.25, 1.0, 4.0], size=d_ff)
    return w


# --------------------------------------------------------------------------------------------
# zero, FAT, top-k, ratios
# --------------------------------------------------------------------------------------------

def test_zero_criterion_and_ratio():
    for act, _, _ in _layers(0, 64, 48, zeros=0.6):
        mask = np.asarray(metrics.zero_active_TxF(jnp.asarray(act)))
        np.testing.assert_array_equal(mask, act != 0)
        assert abs(float(metrics.activation_ratio(mask)) - np_ratio(act != 0)) < 1e-6


def test_fat_matches_threshold_and_eps0_vs_zero():
    for act, _, _ in _layers(1, 64, 48, zeros=0.3):
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
    act = _layers(1, 64, 48)[0][0]
    np.testing.assert_array_equal(np.asarray(jax.jit(metrics.fat_active_TxF)(act, 0.3)),
                                  np.abs(act) >= np.float32(0.3))


def test_topk_per_token_matches_argsort():
    topk = jax.jit(metrics.topk_active_TxF, static_argnums=1)
    for act, _, _ in _layers(2, 40, 64):  # continuous: no ties, no zeros
        for k in (1, 5, 64, 0.25):
            count = metrics.resolve_topk(k, 64)
            expected = np.zeros(act.shape, bool)
            np.put_along_axis(expected, np.argsort(-np.abs(act), axis=1)[:, :count], True, axis=1)
            mask = np.asarray(topk(act, k))
            np.testing.assert_array_equal(mask, expected)
            assert (mask.sum(axis=1) == count).all()
            assert abs(float(metrics.activation_ratio(mask)) - count / 64) < 1e-6
    assert metrics.resolve_topk(0.25, 64) == 64 - int(64 * 0.75)
    # Fewer non-zeros than k: the zeros stay inactive (the reference's 1e-18 floor).
    sparse_act = np.array([[0.0, 3.0, 0.0, -1.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(metrics.topk_active_TxF(sparse_act, 3)),
                                  [[False, True, False, True]])


def test_global_topk_matches_numpy_quantile_selection():
    for act, _, _ in _layers(3, 50, 30, zeros=0.2):
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
    act = _layers(3, 50, 30)[0][0]
    assert int(np.asarray(metrics.global_topk_active_TxF(act, 0.3)).sum()) == \
        act.size - int(act.size * 0.7)


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
    for act, _, _ in _layers(6, 80, 32, zeros=0.3):
        counts = np.asarray(jax.jit(metrics.activation_histogram)(act, edges))
        mags = np.abs(act).ravel()
        expected = [np.sum(mags < edges[0])]
        expected += [np.sum((mags >= lo) & (mags < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
        expected += [np.sum(mags >= edges[-1])]
        np.testing.assert_array_equal(counts, expected)
        assert counts.sum() == act.size
    np.testing.assert_allclose(np.log10(edges), np.linspace(-3, 1, 13), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# CETT
# --------------------------------------------------------------------------------------------

def test_cett_scores_per_token_and_activity():
    for _, hidden, w in _layers(7, 48, 40, d_model=16, zeros=0.3):
        scores = np.asarray(metrics.cett_scores_TxF(hidden, w))
        np.testing.assert_allclose(scores, np.abs(hidden) * np.linalg.norm(w, axis=1), rtol=1e-6)
        for t in (0.0, float(np.median(scores)), float(scores.max())):
            assert abs(float(metrics.cett_at_threshold(hidden, w, t))
                       - np_cett(hidden, w, t, scores)) < 1e-6
            mask = np.asarray(metrics.cett_active_TxF(hidden, w, t))
            expected = ~(np.abs(hidden) < np.float32(t) / np.linalg.norm(w, axis=1))
            np.testing.assert_array_equal(mask, expected)
        # Everything dropped: the error is the whole output, ratio 1 on each token.
        np.testing.assert_allclose(
            np.asarray(metrics.cett_per_token_T(hidden, w, float(scores.max()))), 1.0, rtol=1e-6)
    # A token whose FFN output is zero contributes 0 (documented convention), not NaN.
    hidden = np.array([[0.0, 0.0], [1.0, 2.0]], np.float32)
    w = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(np.asarray(metrics.cett_per_token_T(hidden, w, 10.0)), [0.0, 1.0])


def test_candidate_grid_matches_numpy_and_pools_batches():
    rng = np.random.default_rng(8)
    # 301 × 501 scores: stride 150 for 1000 candidates, and batch offsets that are not
    # multiples of it, so the pooled strided subsample is exercised.
    hidden = rng.standard_normal((301, 501)).astype(np.float32)
    w = exact_norm_w(rng, 501, 7)
    for n in (1000, metrics.CETT_NUM_CANDIDATES):
        grid = metrics.cett_candidates_N(hidden, w, n)
        expected = np_grid(np_scores(hidden, w).ravel(), n)
        np.testing.assert_array_equal(grid, expected)
        assert grid.dtype == np.float32 and grid.size == n
        assert np.all(np.diff(grid) >= 0)
        batched = metrics.cett_candidates_N([hidden[:77], hidden[77:200], hidden[200:]], w, n)
        np.testing.assert_array_equal(batched, grid)


def test_reference_search_matches_numpy_bisection_on_full_grid():
    # The 65,536-point grid on a moderate size, with exact-norm rows so that numpy computes
    # bit-identical scores and grid: thresholds must be equal, not just close.
    rng = np.random.default_rng(9)
    hidden = (rng.standard_normal((384, 256)) * rng.standard_normal((384, 256))).astype(np.float32)
    w = exact_norm_w(rng, 256, 48)
    for target in (0.1, 0.3, 0.6):
        grid, index, values = np_reference_search(hidden, w, target)
        result = metrics.cett_threshold_reference(hidden, w, target)
        assert result.index == index
        assert result.threshold == float(grid[index])
        assert abs(result.cett - values[index]) < 1e-6
        assert result.num_evaluations == len(values)
        assert result.satisfied


def test_reference_search_matches_numpy_on_random_layers():
    for seed in (10, 11):
        for _, hidden, w in _layers(seed, 96, 64, d_model=24):
            for target in (0.15, 0.4):
                grid, index, values = np_reference_search(hidden, w, target, n=4096)
                result = metrics.cett_threshold_reference(hidden, w, target, num_candidates=4096)
                assert result.index == index
                # Row norms may differ from numpy's in the last bit, and so may the grid.
                assert result.threshold == pytest.approx(float(grid[index]), rel=1e-6)
                assert abs(result.cett - values[index]) < 1e-6


@pytest.mark.parametrize("seed,shape,zeros", [
    (12, (256, 192, 32), 0.0),
    (13, (300, 128, 40), 0.7),  # ReLU-like: exact zeros are left out of the sparse updates
    (14, (64, 96, 16), 0.0),
])
def test_incremental_search_equals_reference(seed, shape, zeros):
    n_tokens, d_ff, d_model = shape
    for _, hidden, w in _layers(seed, n_tokens, d_ff, d_model=d_model, zeros=zeros):
        for target in (0.05, 0.2, 0.5):
            ref = metrics.cett_threshold_reference(hidden, w, target)
            for fraction in (0.0, metrics.CETT_SPARSE_SWITCH_FRACTION, 1.0):
                fast = metrics.cett_threshold_incremental(hidden, w, target,
                                                          sparse_switch_fraction=fraction)
                assert (fast.index, fast.threshold, fast.num_evaluations) == \
                    (ref.index, ref.threshold, ref.num_evaluations)
                assert abs(fast.cett - ref.cett) < 1e-6


def test_searches_pool_batches_like_one_array():
    _, hidden, w = _layers(15, 200, 80, d_model=20)[0]
    batches = [hidden[:50], hidden[50:51], hidden[51:]]
    for target in (0.1, 0.35):
        whole = metrics.cett_threshold_reference(hidden, w, target, num_candidates=8192)
        for search in (metrics.cett_threshold_reference, metrics.cett_threshold_incremental):
            pooled = search(batches, w, target, num_candidates=8192)
            assert (pooled.index, pooled.threshold) == (whole.index, whole.threshold)
            assert abs(pooled.cett - whole.cett) < 1e-6


def test_crossing_property_on_random_data():
    """CETT is not monotone, so the search only promises a crossing point."""
    n = 2048
    for _, hidden, w in _layers(16, 80, 48, d_model=12, zeros=0.2):
        scores = np_scores(hidden, w)
        grid = metrics.cett_candidates_N(hidden, w, n)
        for target in (0.02, 0.25, 0.7, 1.0):
            result = metrics.cett_threshold_incremental(hidden, w, target, num_candidates=n)
            here = np_cett(hidden, w, grid[result.index], scores)
            if result.satisfied:
                assert here <= target + 1e-6
                if result.index < n - 1:
                    assert np_cett(hidden, w, grid[result.index + 1], scores) > target - 1e-6
            else:  # clamped: even the first candidate exceeds the target
                assert result.index == 0 and here > target - 1e-6


def test_monotone_cett_returns_largest_valid_threshold():
    """Nonnegative contributions along one direction make CETT(t) nondecreasing; the search then
    returns the largest candidate with CETT ≤ target."""
    rng = np.random.default_rng(17)
    n = metrics.CETT_NUM_CANDIDATES
    for _ in range(N_LAYERS):
        hidden = rng.uniform(0.0, 1.0, (12, 10)).astype(np.float32)
        direction = rng.standard_normal(4)
        w = (rng.uniform(0.5, 2.0, (10, 1)) * direction / np.linalg.norm(direction)).astype(np.float32)
        grid = metrics.cett_candidates_N(hidden, w, n)
        all_cett = np_all_cett(hidden, w, grid)
        assert np.all(np.diff(all_cett) >= -1e-12)
        levels = np.unique(all_cett)
        for lo, hi in zip(levels[[1, len(levels) // 2, -3]], levels[[2, len(levels) // 2 + 1, -2]]):
            target = (lo + hi) / 2  # between two attained values, far from float ties
            largest = int(np.nonzero(all_cett <= target)[0].max())
            for search in (metrics.cett_threshold_reference, metrics.cett_threshold_incremental):
                result = search(hidden, w, target)
                assert result.index == largest and result.satisfied


def test_degenerate_inputs():
    rng = np.random.default_rng(18)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    # All-zero activations: no scores, no output; CETT is 0 everywhere, so nothing exceeds.
    zeros = np.zeros((20, 16), np.float32)
    for search in (metrics.cett_threshold_reference, metrics.cett_threshold_incremental):
        result = search(zeros, w, 0.0)
        assert (result.index, result.threshold, result.cett, result.satisfied) == \
            (metrics.CETT_NUM_CANDIDATES - 1, 0.0, 0.0, True)
    assert float(metrics.activation_ratio(metrics.zero_active_TxF(zeros))) == 0.0
    assert float(metrics.activation_ratio(metrics.fat_active_TxF(zeros, 0.0))) == 0.0
    assert float(metrics.activation_ratio(metrics.topk_active_TxF(zeros, 4))) == 0.0
    assert float(metrics.activation_ratio(metrics.global_topk_active_TxF(zeros, 0.5))) == 0.0
    # Constant scores: the grid collapses to one value and every candidate drops everything.
    const_w = np.ones((16, 8), np.float32)
    const_h = np.full((20, 16), 0.5, np.float32)
    for search in (metrics.cett_threshold_reference, metrics.cett_threshold_incremental):
        below = search(const_h, const_w, 0.5)
        score = float(np.float32(0.5) * np.linalg.norm(const_w, axis=1)[0])
        assert (below.index, below.satisfied, below.threshold) == (0, False, score)
        assert below.cett == pytest.approx(1.0)
        full = search(const_h, const_w, 1.0)
        assert full.index == metrics.CETT_NUM_CANDIDATES - 1 and full.satisfied
    # Scores within 1e-4 of each other: grid steps far below a float32 ulp, so the grid is a
    # staircase; it stays nondecreasing and both searches still agree.
    narrow_h = (1.0 + 1e-4 * rng.random((30, 16))).astype(np.float32) * rng.choice([-1, 1], (30, 16))
    narrow_w = exact_norm_w(rng, 16, 4)
    grid = metrics.cett_candidates_N(narrow_h, narrow_w)
    np.testing.assert_array_equal(grid, np_grid(np_scores(narrow_h, narrow_w).ravel(), grid.size))
    assert np.all(np.diff(grid) >= 0)
    for target in (0.3, 0.8):
        ref = metrics.cett_threshold_reference(narrow_h, narrow_w, target)
        fast = metrics.cett_threshold_incremental(narrow_h, narrow_w, target, sparse_switch_fraction=1.0)
        assert (ref.index, ref.threshold) == (fast.index, fast.threshold)
    _, hidden, w = _layers(19, 64, 32, d_model=8)[0]
    relu_hidden = np.maximum(hidden, 0)
    for search in (metrics.cett_threshold_reference, metrics.cett_threshold_incremental):
        # Target 0 on data without zeros: the minimum score alone already exceeds it; clamp.
        assert search(hidden, w, 0.0, num_candidates=1024)[1:4:2] == (0, False)
        # With exact zeros the first candidate drops only zeros: CETT 0 satisfies target 0.
        assert search(relu_hidden, w, 0.0, num_candidates=1024).satisfied
    for target in (0.0, 1.0):
        ref = metrics.cett_threshold_reference(hidden, w, target, num_candidates=1024)
        fast = metrics.cett_threshold_incremental(hidden, w, target, num_candidates=1024)
        assert ref == fast or (ref.index == fast.index and abs(ref.cett - fast.cett) < 1e-6)


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
        np.testing.assert_array_equal(np.asarray(report.hist_count_H),
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
    with pytest.raises(ValueError, match=r"d_ff=8 but w_out_FxD has d_ff=5"):
        metrics.cett_scores_TxF(act, np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"w_out_FxD must be 2-D"):
        metrics.cett_threshold_reference(act, np.ones(8), 0.1)
    for bad in (0, -1, 9):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, d_ff=8\]"):
            metrics.topk_active_TxF(act, bad)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"k as a fraction must be in \(0, 1\]"):
            metrics.topk_active_TxF(act, bad)
    with pytest.raises(ValueError, match=r"k must be an int"):
        metrics.resolve_topk(True, 8)
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
    with pytest.raises(ValueError, match=r"target must be a real number"):
        metrics.cett_threshold_incremental(act, np.ones((8, 3)), float("nan"))
    with pytest.raises(ValueError, match=r"num_candidates must be an int >= 2"):
        metrics.cett_threshold_reference(act, np.ones((8, 3)), 0.1, num_candidates=1)
    with pytest.raises(ValueError, match=r"sparse_switch_fraction must be in \[0, 1\]"):
        metrics.cett_threshold_incremental(act, np.ones((8, 3)), 0.1, sparse_switch_fraction=2.0)
    with pytest.raises(ValueError, match=r"active_BxLxF has d_ff=4, the stats 8"):
        metrics.stats_update(metrics.stats_init(8), np.ones((1, 2, 4), bool))
    with pytest.raises(ValueError, match=r"0 < low < high"):
        metrics.log_bin_edges(0.0, 1.0, 4)
    with pytest.raises(ValueError, match=r"hidden_TxF has no tokens"):
        metrics.cett_threshold_reference(np.ones((0, 8), np.float32), np.ones((8, 3)), 0.1)
