"""Block-sparse FFN kernels against the dense FFN with the same tile mask.

Every implementation runs on this CPU-only machine:

* the Pallas TPU (Mosaic) kernels in Pallas interpret mode (``interpret=True``), forward, dx and
  dW kernels;
* the Pallas GPU (Triton) forward in interpret mode too: interpret mode discharges the kernel
  into plain JAX ops, so it checks the kernel's indexing and arithmetic but not Triton codegen;
  for that, one test lowers it for the ``cuda`` platform (Triton IR is produced in Python, no
  GPU needed) and checks the Triton custom calls appear. Nothing here compiles or runs Triton;
* the pure-JAX gather + einsum tile path (impl="jax").

Tolerances: float32 1e-5 relative to the output's scale. bfloat16 inputs: the kernels and the
dense reference both accumulate in float32 and round h to bf16 before W_out, so they differ only
by accumulation order plus the bf16 rounding of h and y: 2e-2 of the output scale
(bf16 has an 8-bit mantissa, ulp 2^-8 ≈ 4e-3; a few ulps of slack over 512-term sums).
The TPU compile check (real Mosaic compiler via libtpu) is in test_kernels_tpu.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.kernels import block_mask as bm
from sparsejax.kernels import ffn, gpu, tpu

T, D, F, BT, BF = 64, 128, 512, 16, 128
N, M = T // BT, F // BF
KERNELS = ("tpu", "gpu", "jax")


def _weights(gated, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(ks[0], (T, D), jnp.float32)
    w_in = jax.random.normal(ks[1], (D, F)) / D**0.5
    w_gate = jax.random.normal(ks[2], (D, F)) / D**0.5 if gated else None
    w_out = jax.random.normal(ks[3], (F, D)) / F**0.5
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    return cast(x), cast(w_in), cast(w_gate), cast(w_out)


def _masks():
    rng = np.random.default_rng(0)
    random = bm.from_block_activity(jnp.asarray(rng.random((N, M)) < 0.4), k_max=3)
    ragged = bm.from_block_activity(jnp.asarray(np.arange(M)[None, :] < np.array([0, 1, M, 2])[:, None]))
    return {"random": random, "all": bm.all_active(N, M),
            "none": bm.from_block_activity(jnp.zeros((N, M), bool), k_max=2), "ragged": ragged}


def _run(impl, x, w_in, w_gate, w_out, mask, act=jax.nn.relu, **kw):
    return ffn.block_sparse_ffn(x, w_in, w_gate, w_out, act, block_t=BT, block_f=BF, mask=mask,
                                impl=impl, interpret=True, dense_fallback_density=1.0, **kw)


def _close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = max(float(np.abs(b).max()), 1e-6)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


# ----------------------------------------------------------------------------- block masks

def test_index_lists_pad_with_last_index_and_count():
    active = jnp.asarray([[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    mask = bm.from_block_activity(active, k_max=3)
    np.testing.assert_array_equal(mask.index_NxK, [[1, 3, 3], [0, 0, 0], [0, 1, 2]])
    np.testing.assert_array_equal(mask.count_N, [2, 0, 3])
    np.testing.assert_array_equal(mask.n_active_N, [2, 0, 4])  # row 2 overflowed k_max
    np.testing.assert_array_equal(bm.to_dense_NxM(mask, 4), active.at[2, 3].set(False))


def test_k_max_keeps_highest_scores_in_ascending_order():
    active = jnp.ones((1, 4), bool)
    mask = bm.from_block_activity(active, k_max=2, score_NxM=jnp.asarray([[1.0, 5.0, 0.0, 3.0]]))
    np.testing.assert_array_equal(mask.index_NxK, [[1, 3]])


def test_from_activations_matches_numpy_and_jits():
    act = np.where(np.random.default_rng(1).random((T, F)) < 0.01, 1.0, 0.0).astype(np.float32)
    mask = jax.jit(lambda a: bm.from_activations(a, BT, BF))(jnp.asarray(act))
    want = act.reshape(N, BT, M, BF).any(axis=(1, 3))
    np.testing.assert_array_equal(bm.to_dense_NxM(mask, M), want)
    np.testing.assert_array_equal(mask.count_N, want.sum(1))


def test_gate_sign_predictor_is_exact_for_relu():
    x, _, w_gate, _ = _weights(True)
    pred = bm.from_gate_sign(x, w_gate, BT, BF)
    true = bm.from_activations(jax.nn.relu(x @ w_gate), BT, BF)
    np.testing.assert_array_equal(bm.to_dense_NxM(pred, M), bm.to_dense_NxM(true, M))


def test_transpose_lists_token_blocks_per_neuron_block():
    mask = _masks()["random"]
    mask_t = bm.transpose(mask, M)
    np.testing.assert_array_equal(bm.to_dense_NxM(mask_t, N), bm.to_dense_NxM(mask, M).T)


@pytest.mark.parametrize("t, f, bt, bf, match", [
    (60, 512, 16, 128, "T=60"), (64, 500, 16, 128, "F=500"), (64, 512, 0, 128, "positive")])
def test_block_shape_errors_name_the_shape(t, f, bt, bf, match):
    with pytest.raises(ValueError, match=match):
        bm.from_activations(jnp.zeros((t, f)), bt, bf)


def test_k_max_out_of_range():
    with pytest.raises(ValueError, match="k_max=5"):
        bm.from_block_activity(jnp.ones((2, 4), bool), k_max=5)


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("gated", [True, False])
def test_forward_matches_dense_with_mask(impl, gated):
    x, w_in, w_gate, w_out = _weights(gated)
    run = jax.jit(lambda m: _run(impl, x, w_in, w_gate, w_out, m))
    for name, mask in _masks().items():
        want = ffn.dense(x, w_in, w_gate, w_out, mask, jax.nn.relu, block_t=BT, block_f=BF)
        got = run(mask)
        if name == "none":
            np.testing.assert_array_equal(got, 0.0)
        _close(got, want, 1e-5)


@pytest.mark.parametrize("impl", ("tpu", "gpu"))
def test_forward_bf16(impl):
    x, w_in, w_gate, w_out = _weights(True, jnp.bfloat16)
    mask = _masks()["random"]
    got = _run(impl, x, w_in, w_gate, w_out, mask, act=jax.nn.silu)
    assert got.dtype == jnp.bfloat16
    want = ffn.dense(x, w_in, w_gate, w_out, mask, jax.nn.silu, block_t=BT, block_f=BF)
    _close(got, want, 2e-2)


def test_mask_from_relu_activations_is_exact_dense_ffn():
    # Zero criterion: skipped tiles are exactly zero, so the sparse FFN is the dense one. A
    # negative shift in the gate makes about 97% of the tiles inactive.
    x, w_in, w_gate, w_out = _weights(True)
    act = lambda z: jax.nn.relu(z - 2.5)  # noqa: E731
    dense = ffn.dense(x, w_in, w_gate, w_out, None, act)
    got = ffn.block_sparse_ffn(x, w_in, w_gate, w_out, act, block_t=BT, block_f=BF, impl="tpu",
                               interpret=True, dense_fallback_density=1.0)
    _close(got, dense, 1e-5)


def test_gate_and_up_and_padding_and_leading_dims():
    # dReLU (σ on the up projection too), T = 2×30 = 60 tokens padded to 64, mask from activations.
    x, w_in, w_gate, w_out = _weights(True)
    x_BxLxD = x[:60].reshape(2, 30, D)
    got = ffn.block_sparse_ffn(x_BxLxD, w_in, w_gate, w_out, jax.nn.relu, block_t=BT, block_f=BF,
                               gate_and_up=True, impl="tpu", interpret=True)
    want = ffn.dense(x[:60], w_in, w_gate, w_out, None, jax.nn.relu, gate_and_up=True)
    assert got.shape == x_BxLxD.shape
    _close(got.reshape(60, D), want, 1e-5)


def test_dense_fallback_gives_the_same_result():
    x, w_in, w_gate, w_out = _weights(True)
    mask = _masks()["random"]  # density 0.4375
    sparse = _run("jax", x, w_in, w_gate, w_out, mask)
    fallback = ffn.block_sparse_ffn(x, w_in, w_gate, w_out, jax.nn.relu, block_t=BT, block_f=BF,
                                    mask=mask, impl="jax", dense_fallback_density=0.1)
    _close(fallback, sparse, 1e-5)


def test_auto_picks_the_pure_jax_path_on_cpu():
    assert jax.default_backend() == "cpu"
    assert ffn.pick_impl("auto") == "jax"
    with pytest.raises(ValueError, match="impl='cuda'"):
        ffn.pick_impl("cuda")


def test_entry_point_errors():
    x, w_in, w_gate, w_out = _weights(True)
    with pytest.raises(ValueError, match="F=512 is not a multiple of block_f=96"):
        ffn.block_sparse_ffn(x, w_in, w_gate, w_out, jax.nn.relu, block_t=BT, block_f=96)
    with pytest.raises(ValueError, match="do not fit x"):
        ffn.block_sparse_ffn(x, w_in, w_gate, w_out.T, jax.nn.relu, block_t=BT, block_f=BF)
    with pytest.raises(ValueError, match="needs N=4"):
        ffn.block_sparse_ffn(x, w_in, w_gate, w_out, jax.nn.relu, block_t=BT, block_f=BF,
                             mask=bm.all_active(2, M), impl="jax")


def test_kernel_tiling_errors():
    with pytest.raises(ValueError, match="block_f=64 must be a multiple of 128"):
        tpu.check_tiling(128, 16, 64, jnp.float32)
    tpu.check_tiling(128, 8, 128, jnp.bfloat16)  # Mosaic compiles bt = 8 in bf16 (test_kernels_tpu)
    with pytest.raises(ValueError, match="block_t=12 must be a multiple of 8 for bfloat16"):
        tpu.check_tiling(128, 12, 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="D=96"):
        tpu.check_tiling(96, 8, 128, jnp.float32)
    with pytest.raises(ValueError, match="block_t=24 must be a power of two"):
        gpu.check_tiling(128, 24, 128, 128)
    with pytest.raises(ValueError, match="D=768 is not a multiple of block_d=512"):
        gpu.check_tiling(768, 16, 128, 512)


# jax >= 0.11 (Python >= 3.12) lowers Pallas-Triton only against a real or abstract GPU target
# ("No supported GPU devices found"); the check runs with the Python 3.11 pin (jax 0.10.2).
@pytest.mark.skipif(tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11),
                    reason="jax >= 0.11 needs a GPU target to lower Triton kernels")
def test_gpu_kernel_lowers_to_triton():
    x, w_in, w_gate, w_out = _weights(True)
    mask = _masks()["random"]
    fn = lambda x_, i, c: gpu.forward(x_, w_in, w_gate, w_out, bm.BlockMask(i, c, c),  # noqa
                                      act=jax.nn.silu, gate_and_up=False, block_t=BT, block_f=BF)
    text = jax.jit(fn).trace(x, mask.index_NxK, mask.count_N).lower(
        lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 2


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("impl, gated, gate_and_up", [
    ("tpu", True, False), ("tpu", False, False), ("tpu", True, True),
    ("gpu", True, False), ("jax", True, False), ("jax", False, False)])
def test_gradients_match_dense_with_mask(impl, gated, gate_and_up):
    x, w_in, w_gate, w_out = _weights(gated)
    dy = jax.random.normal(jax.random.PRNGKey(9), (T, D))
    mask = _masks()["ragged"]
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * dy)  # noqa: E731
    sparse = lambda *a: _run(impl, *a, mask, act=jax.nn.silu, gate_and_up=gate_and_up)  # noqa
    dense = lambda *a: ffn.dense(*a, mask, jax.nn.silu, gate_and_up=gate_and_up,  # noqa: E731
                                 block_t=BT, block_f=BF)
    argnums = (0, 1, 2, 3) if gated else (0, 1, 3)
    got = jax.grad(loss(sparse), argnums)(x, w_in, w_gate, w_out)
    want = jax.grad(loss(dense), argnums)(x, w_in, w_gate, w_out)
    for g, w in zip(got, want):
        _close(g, w, 1e-5)
    # Token block 0 has an empty list: its rows get no input gradient.
    np.testing.assert_array_equal(got[0][:BT], 0.0)
