"""sparsejax.cett against plain-numpy implementations written here
(docs/sparsity_metrics_and_laws.md §CETT, §Reference procedure, §Departures)."""

import math

import numpy as np
import pytest

from ffn_data import N_LAYERS, random_layers
from sparsejax import cett, metrics


# --------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------

def np_quantile_f32(values, q):
    """torch.quantile in float32: float32 rank q·(n − 1), then torch.lerp's two-sided blend of the
    order statistics around it, multiply-add in float64 and rounded once to float32 (a fused
    multiply-add, up to a double-rounding tie)."""
    sub = np.sort(values.astype(np.float32))
    rank = np.float32(q) * np.float32(sub.size - 1)
    below = int(math.floor(rank))
    above = min(below + 1, sub.size - 1) if rank > below else below
    weight = rank - np.float32(below)
    gap = sub[above] - sub[below]  # float32, as torch's end − self
    if weight < 0.5:
        return np.float32(float(sub[below]) + float(weight) * float(gap))
    return np.float32(float(sub[above]) - float(gap) * float(np.float32(1.0) - weight))


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
    float32 linear 0.99 quantile of every ⌊numel / n⌋-th score."""
    low = scores_flat.min()
    high = np_quantile_f32(scores_flat[::max(scores_flat.size // n, 1)], 0.99)
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


def np_reference_search(hidden, w, target, n=cett.CETT_NUM_CANDIDATES):
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
# CETT
# --------------------------------------------------------------------------------------------

def test_cett_scores_per_token_and_activity():
    for _, hidden, w in random_layers(7, 48, 40, d_model=16, zeros=0.3):
        scores = np.asarray(cett.cett_scores_TxF(hidden, w))
        np.testing.assert_allclose(scores, np.abs(hidden) * np.linalg.norm(w, axis=1), rtol=1e-6)
        for t in (0.0, float(np.median(scores)), float(scores.max())):
            assert abs(float(cett.cett_at_threshold(hidden, w, t))
                       - np_cett(hidden, w, t, scores)) < 1e-6
            per_neuron = np.float32(t) / np.linalg.norm(w, axis=1)
            reference = np.asarray(cett.cett_active_TxF(hidden, w, t, zero_rule="reference"))
            np.testing.assert_array_equal(reference, ~(np.abs(hidden) < per_neuron))
            # The default floor rule: the same test against t / ‖w‖ + 1e-18 (FAT-ε's floor).
            floored = np.asarray(cett.cett_active_TxF(hidden, w, t))
            np.testing.assert_array_equal(floored, ~(np.abs(hidden) < per_neuron + np.float32(1e-18)))
            if t > 0:
                np.testing.assert_array_equal(floored, reference)
        # Everything dropped: the error is the whole output, ratio 1 on each token.
        np.testing.assert_allclose(
            np.asarray(cett.cett_per_token_T(hidden, w, float(scores.max()))), 1.0, rtol=1e-6)
    # A token whose FFN output is zero contributes 0 (documented convention), not NaN.
    hidden = np.array([[0.0, 0.0], [1.0, 2.0]], np.float32)
    w = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(np.asarray(cett.cett_per_token_T(hidden, w, 10.0)), [0.0, 1.0])


def test_candidate_grid_matches_numpy_and_pools_batches():
    rng = np.random.default_rng(8)
    # 301 × 501 scores: stride 150 for 1000 candidates, and batch offsets that are not
    # multiples of it, so the pooled strided subsample is exercised.
    hidden = rng.standard_normal((301, 501)).astype(np.float32)
    w = exact_norm_w(rng, 501, 7)
    for n in (1000, cett.CETT_NUM_CANDIDATES):
        grid = cett.cett_candidates_G(hidden, w, n)
        expected = np_grid(np_scores(hidden, w).ravel(), n)
        np.testing.assert_array_equal(grid, expected)
        assert grid.dtype == np.float32 and grid.size == n
        assert np.all(np.diff(grid) >= 0)
        batched = cett.cett_candidates_G([hidden[:77], hidden[77:200], hidden[200:]], w, n)
        np.testing.assert_array_equal(batched, grid)


def test_reference_search_matches_numpy_bisection_on_full_grid():
    # The 65,536-point grid on a moderate size, with exact-norm rows so that numpy computes
    # bit-identical scores and grid: thresholds must be equal, not just close.
    rng = np.random.default_rng(9)
    hidden = (rng.standard_normal((384, 256)) * rng.standard_normal((384, 256))).astype(np.float32)
    w = exact_norm_w(rng, 256, 48)
    for target in (0.1, 0.3, 0.6):
        grid, index, values = np_reference_search(hidden, w, target)
        result = cett.cett_threshold_reference(hidden, w, target)
        assert result.index == index
        assert result.threshold == float(grid[index])
        assert abs(result.cett - values[index]) < 1e-6
        assert result.num_evaluations == len(values)
        assert result.satisfied


def test_reference_search_matches_numpy_on_random_layers():
    for seed in (10, 11):
        for _, hidden, w in random_layers(seed, 96, 64, d_model=24):
            for target in (0.15, 0.4):
                grid, index, values = np_reference_search(hidden, w, target, n=4096)
                result = cett.cett_threshold_reference(hidden, w, target, num_candidates=4096)
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
    for _, hidden, w in random_layers(seed, n_tokens, d_ff, d_model=d_model, zeros=zeros):
        for target in (0.05, 0.2, 0.5):
            ref = cett.cett_threshold_reference(hidden, w, target)
            for fraction in (0.0, cett.CETT_SPARSE_SWITCH_FRACTION, 1.0):
                fast = cett.cett_threshold_incremental(hidden, w, target,
                                                          sparse_switch_fraction=fraction)
                assert (fast.index, fast.threshold, fast.num_evaluations) == \
                    (ref.index, ref.threshold, ref.num_evaluations)
                assert abs(fast.cett - ref.cett) < 1e-6


def test_searches_pool_batches_like_one_array():
    _, hidden, w = random_layers(15, 200, 80, d_model=20)[0]
    batches = [hidden[:50], hidden[50:51], hidden[51:]]
    for target in (0.1, 0.35):
        whole = cett.cett_threshold_reference(hidden, w, target, num_candidates=8192)
        for search in (cett.cett_threshold_reference, cett.cett_threshold_incremental):
            pooled = search(batches, w, target, num_candidates=8192)
            assert (pooled.index, pooled.threshold) == (whole.index, whole.threshold)
            assert abs(pooled.cett - whole.cett) < 1e-6


def test_crossing_property_on_random_data():
    """CETT is not monotone, so the search only promises a crossing point."""
    n = 2048
    for _, hidden, w in random_layers(16, 80, 48, d_model=12, zeros=0.2):
        scores = np_scores(hidden, w)
        grid = cett.cett_candidates_G(hidden, w, n)
        for target in (0.02, 0.25, 0.7, 1.0):
            result = cett.cett_threshold_incremental(hidden, w, target, num_candidates=n)
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
    n = cett.CETT_NUM_CANDIDATES
    for _ in range(N_LAYERS):
        hidden = rng.uniform(0.0, 1.0, (12, 10)).astype(np.float32)
        direction = rng.standard_normal(4)
        w = (rng.uniform(0.5, 2.0, (10, 1)) * direction / np.linalg.norm(direction)).astype(np.float32)
        grid = cett.cett_candidates_G(hidden, w, n)
        all_cett = np_all_cett(hidden, w, grid)
        assert np.all(np.diff(all_cett) >= -1e-12)
        levels = np.unique(all_cett)
        for lo, hi in zip(levels[[1, len(levels) // 2, -3]], levels[[2, len(levels) // 2 + 1, -2]]):
            target = (lo + hi) / 2  # between two attained values, far from float ties
            largest = int(np.nonzero(all_cett <= target)[0].max())
            for search in (cett.cett_threshold_reference, cett.cett_threshold_incremental):
                result = search(hidden, w, target)
                assert result.index == largest and result.satisfied


def test_degenerate_inputs():
    rng = np.random.default_rng(18)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    # All-zero activations: no scores, no output; CETT is 0 everywhere, so nothing exceeds.
    zeros = np.zeros((20, 16), np.float32)
    for search in (cett.cett_threshold_reference, cett.cett_threshold_incremental):
        result = search(zeros, w, 0.0)
        assert (result.index, result.threshold, result.cett, result.satisfied) == \
            (cett.CETT_NUM_CANDIDATES - 1, 0.0, 0.0, True)
    # Constant scores: the grid collapses to one value and every candidate drops everything.
    const_w = np.ones((16, 8), np.float32)
    const_h = np.full((20, 16), 0.5, np.float32)
    for search in (cett.cett_threshold_reference, cett.cett_threshold_incremental):
        below = search(const_h, const_w, 0.5)
        score = float(np.float32(0.5) * np.linalg.norm(const_w, axis=1)[0])
        assert (below.index, below.satisfied, below.threshold) == (0, False, score)
        assert below.cett == pytest.approx(1.0)
        full = search(const_h, const_w, 1.0)
        assert full.index == cett.CETT_NUM_CANDIDATES - 1 and full.satisfied
    # Scores within 1e-4 of each other: grid steps far below a float32 ulp, so the grid is a
    # staircase; it stays nondecreasing and both searches still agree.
    narrow_h = (1.0 + 1e-4 * rng.random((30, 16))).astype(np.float32) * rng.choice([-1, 1], (30, 16))
    narrow_w = exact_norm_w(rng, 16, 4)
    grid = cett.cett_candidates_G(narrow_h, narrow_w)
    np.testing.assert_array_equal(grid, np_grid(np_scores(narrow_h, narrow_w).ravel(), grid.size))
    assert np.all(np.diff(grid) >= 0)
    for target in (0.3, 0.8):
        ref = cett.cett_threshold_reference(narrow_h, narrow_w, target)
        fast = cett.cett_threshold_incremental(narrow_h, narrow_w, target, sparse_switch_fraction=1.0)
        assert (ref.index, ref.threshold) == (fast.index, fast.threshold)
    _, hidden, w = random_layers(19, 64, 32, d_model=8)[0]
    relu_hidden = np.maximum(hidden, 0)
    for search in (cett.cett_threshold_reference, cett.cett_threshold_incremental):
        # Target 0 on data without zeros: the minimum score alone already exceeds it; clamp.
        assert search(hidden, w, 0.0, num_candidates=1024)[1:4:2] == (0, False)
        # With exact zeros the first candidate drops only zeros: CETT 0 satisfies target 0.
        assert search(relu_hidden, w, 0.0, num_candidates=1024).satisfied
    for target in (0.0, 1.0):
        ref = cett.cett_threshold_reference(hidden, w, target, num_candidates=1024)
        fast = cett.cett_threshold_incremental(hidden, w, target, num_candidates=1024)
        assert ref == fast or (ref.index == fast.index and abs(ref.cett - fast.cett) < 1e-6)


def test_quantile_is_torch_float32_not_float64():
    """The grid top is torch.quantile in float32: the rank f32(0.99)·(n − 1) is a float32 product.
    With a wide gap between the two order statistics around the rank, a float64 rank is off by
    many ulps."""
    n = 65_536
    values = np.zeros(n, np.float32)
    values[64_880:] = 1e6  # rank 0.99·65535 ≈ 64879.65 falls between 0 and 1e6
    rank32 = np.float32(0.99) * np.float32(n - 1)
    assert rank32 != 0.99 * (n - 1)
    expected = np.float32(float(rank32 - np.float32(64_879)) * 1e6)
    assert cett.quantile_f32(values, 0.99) == expected == np_quantile_f32(values, 0.99)
    assert abs(float(expected) - np.quantile(values.astype(np.float64), 0.99)) > 1000.0
    rng = np.random.default_rng(3)
    for size in (1, 2, 101, 1000, 65_537):
        for data in (rng.standard_normal(size), rng.exponential(size=size) * 1e-3):
            data = data.astype(np.float32)
            for q in (0.0, 0.25, 0.5, 0.99, 1.0):
                assert cett.quantile_f32(data, q) == np_quantile_f32(data, q)
    assert cett.quantile_f32(np.array([5.0], np.float32), 0.99) == 5.0


def test_relu_search_can_return_zero_reference_rule_reads_one_floor_reads_zero_ratio():
    """ReLU: exact zeros make the minimum score 0, so the grid starts at 0. When the search returns
    t = 0, the sparse pass's strict |σ(gate)·up| < 0 drops nothing and every neuron counts as
    active: the CETT ratio is 1.0 although most values are exact zeros (the reference's
    behaviour, documented in sparsejax/cett.py)."""
    rng = np.random.default_rng(30)
    w = (rng.standard_normal((64, 16)) / 8).astype(np.float32)
    # (a) > 99% zeros: the 0.99 quantile of the scores, hence the whole grid, is 0.
    hidden = np.zeros((200, 64), np.float32)
    hidden[rng.random((200, 64)) < 0.004] = 1.0
    assert np.all(cett.cett_candidates_G(hidden, w, 1024) == 0.0)
    # (b) 70% zeros and a target below CETT(grid[1]): index 0, which is t = 0.
    relu = np.maximum(rng.standard_normal((200, 64)), 0.0).astype(np.float32)
    relu[rng.random((200, 64)) < 0.4] = 0.0
    for h, target in ((hidden, 0.2), (relu, 1e-9)):
        for search in (cett.cett_threshold_reference, cett.cett_threshold_incremental):
            result = search(h, w, target, num_candidates=1024)
            assert result.threshold == 0.0 and result.satisfied and result.cett == 0.0
        # The reference's tie rule: nothing is inactive at t = 0, exact zeros included.
        active = cett.cett_active_TxF(h, w, 0.0, zero_rule="reference")
        assert float(metrics.activation_ratio(active)) == 1.0
        zero_ratio = float(metrics.activation_ratio(metrics.zero_active_TxF(h)))
        assert zero_ratio < 0.7
        # The default FAT floor: at t = 0 exactly the nonzeros are active (the zero criterion).
        floored = cett.cett_active_TxF(h, w, 0.0)
        assert np.array_equal(np.asarray(floored), h != 0)
        assert float(metrics.activation_ratio(floored)) == zero_ratio
    # Any t > 0 drops the exact zeros again.
    assert float(metrics.activation_ratio(cett.cett_active_TxF(relu, w, 1e-30, zero_rule="reference"))) == \
        pytest.approx(float(metrics.activation_ratio(metrics.zero_active_TxF(relu))))


def test_errors_name_argument_and_range():
    act = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"d_ff=8 but w_out_FxD has d_ff=5"):
        cett.cett_scores_TxF(act, np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"w_out_FxD must be 2-D"):
        cett.cett_threshold_reference(act, np.ones(8), 0.1)
    with pytest.raises(ValueError, match=r"target must be a real number"):
        cett.cett_threshold_incremental(act, np.ones((8, 3)), float("nan"))
    with pytest.raises(ValueError, match=r"num_candidates must be an int >= 2"):
        cett.cett_threshold_reference(act, np.ones((8, 3)), 0.1, num_candidates=1)
    with pytest.raises(ValueError, match=r"sparse_switch_fraction must be in \[0, 1\]"):
        cett.cett_threshold_incremental(act, np.ones((8, 3)), 0.1, sparse_switch_fraction=2.0)
    with pytest.raises(ValueError, match=r"hidden_TxF has no tokens"):
        cett.cett_threshold_reference(np.ones((0, 8), np.float32), np.ones((8, 3)), 0.1)
    with pytest.raises(ValueError, match=r"empty"):
        cett.quantile_f32(np.array([], np.float32), 0.5)
