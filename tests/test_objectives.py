"""Sparsity regularisers vs numpy and their analytic gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import objectives


def _data(seed=0, b=2, l=8, f=6):
    rng = np.random.default_rng(seed)
    act = rng.normal(size=(b, l, f)).astype(np.float32) * (rng.random((b, l, f)) < 0.5)
    weights = np.ones((b, l), np.float32)
    weights[1, -3:] = 0.0  # padding at the end of the second sequence
    return act, weights


def test_l1_penalty_and_its_gradient():
    act, w = _data()
    total, count = objectives.l1_penalty(jnp.asarray(act), jnp.asarray(w))
    assert float(count) == w.sum()
    np.testing.assert_allclose(float(total), np.sum(np.abs(act) * w[..., None]), rtol=1e-6)
    # d/da of mean-per-token L1 is sign(a) · w / count (0 at a = 0 by JAX's convention for |x|)
    grad = jax.grad(lambda a: objectives.l1_penalty(a, jnp.asarray(w))[0] / count)(jnp.asarray(act))
    np.testing.assert_allclose(np.asarray(grad), np.sign(act) * w[..., None] / w.sum(), rtol=1e-6)


def test_chunk_penalty_matches_numpy_and_counts_only_whole_valid_chunks():
    act, w = _data()
    tau, c = 0.1, 4
    total, count = objectives.chunk_penalty(jnp.asarray(act), jnp.asarray(w), c, tau)
    # independent: loop over chunks
    s, n = 0.0, 0
    for bi in range(act.shape[0]):
        for q in range(act.shape[1] // c):
            sl = slice(q * c, (q + 1) * c)
            if np.all(w[bi, sl] > 0):
                union = 1 - np.prod(1 - (1 - np.exp(-np.abs(act[bi, sl]) / tau)), axis=0)
                s += union.mean()
                n += 1
    assert float(count) == n * c and n == 3  # the padded chunk is left out
    np.testing.assert_allclose(float(total) / float(count), s / n, rtol=1e-5)


def test_chunk_penalty_prefers_the_same_neurons_silent_across_a_chunk():
    # Same total activity per token, placed on one neuron for the whole chunk vs a new neuron each
    # token: the consistent pattern costs less (its union covers one neuron, not four).
    consistent = np.zeros((1, 4, 4), np.float32)
    consistent[0, :, 0] = 1.0
    scattered = np.zeros((1, 4, 4), np.float32)
    scattered[0, np.arange(4), np.arange(4)] = 1.0
    w = np.ones((1, 4), np.float32)
    pen = lambda a: float(objectives.chunk_penalty(jnp.asarray(a), jnp.asarray(w), 4)[0])  # noqa: E731
    assert float(objectives.l1_penalty(jnp.asarray(consistent), jnp.asarray(w))[0]) == \
        float(objectives.l1_penalty(jnp.asarray(scattered), jnp.asarray(w))[0])
    assert pen(consistent) < 0.3 * pen(scattered)


def test_chunk_penalty_errors():
    act, w = _data()
    with pytest.raises(ValueError, match="chunk_len=3 must be >= 1 and divide the sequence length 8"):
        objectives.chunk_penalty(jnp.asarray(act), jnp.asarray(w), 3)
    with pytest.raises(ValueError, match="tau=0"):
        objectives.chunk_penalty(jnp.asarray(act), jnp.asarray(w), 4, tau=0)


def test_registry_counts_are_the_penalties_own_and_depend_on_weights_alone():
    act, w = _data()
    for name, reg in objectives.REGULARISERS.items():
        total = reg.layer_sum(jnp.asarray(act), jnp.asarray(w), 4, 0.1)
        want_total, want_count = (objectives.l1_penalty(jnp.asarray(act), jnp.asarray(w)) if name == "l1"
                                  else objectives.chunk_penalty(jnp.asarray(act), jnp.asarray(w), 4, 0.1))
        assert float(total) == float(want_total)
        assert float(reg.count(jnp.asarray(w), 4)) == float(want_count)
    assert float(objectives.chunk_token_count(jnp.asarray(w), 4)) == 3 * 4  # padded chunk left out
