"""The block-sparse FFN under a device mesh: per-shard kernels inside ``shard_map``.

Runs on the 8 fake CPU devices that tests/conftest.py sets up before jax starts (as
tests/test_step.py's 1-vs-8-device checks do). The independent computation each sharded result
is checked against is the one-device *einsum* FFN (``model.ffn_impl=reference``) or the dense FFN
of :func:`sparsejax.kernels.dense`, neither of which involves shard_map, masks or kernels: for
ReLU the zero-criterion tile mask drops only exact zeros, so all must agree to fp32 rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax import config, sharding, step
from sparsejax import configure
from sparsejax.config import MeshConfig
from sparsejax.kernels import ffn as kffn
from sparsejax.kernels import sharded
from step_data import random_batches

# Tiny config shrunk so every mesh below divides it: 8 heads and d_ff 256 split 8 ways over
# "tensor" leave 32 neurons per shard (= block_f); 8 rows of 32 tokens, 1 row per shard at fsdp=8.
MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=8", "model.head_dim=8",
         "model.d_ff=256", "model.activation=relu", "train.batch_size=8", "train.seq_len=32"]
BLOCK_SPARSE = ["model.ffn_impl=block_sparse", "model.ffn_block_t=16", "model.ffn_block_f=32"]
MESHES = {"2x2x2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
          "tensor8": ["mesh.data=1", "mesh.tensor=8"],
          "fsdp8": ["mesh.data=1", "mesh.fsdp=8"]}
LR = 0.5


def _cfg(*extra):
    return configure.apply_overrides(config.proxy_config("tiny"), MICRO + list(extra))


def _close(got, want, tol):
    """Equal to ``tol`` of ``want``'s largest magnitude (fp32 sums in another order)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.abs(want).max()), 1e-12)
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=tol)


def _sgd_keeping_grads(lr):
    """Plain SGD whose optimizer state is the last step's gradient, so tests read it exactly
    (recovering it from parameter differences loses digits where |g| ≪ |w|)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: -lr * g, grads), grads))


def _train(cfg, devices, n_steps=2):
    """Losses, gradient norms, first-step gradients and final parameters of SGD steps."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    fns = step.make_step_functions(cfg, mesh, _sgd_keeping_grads(LR))
    state = fns.init(jax.random.key(0))
    losses, norms, grads = [], [], None
    for batch in random_batches(cfg, n_steps):
        state, m = fns.train(state, fns.plan.global_batch(batch))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
        grads = jax.device_get(state["opt_state"]) if grads is None else grads
    return np.array(losses), np.array(norms), grads, jax.device_get(state["params"])


@functools.lru_cache(maxsize=None)
def _one_device_einsum():
    return _train(_cfg(), jax.devices()[:1])


@pytest.fixture
def sparse_path_only(monkeypatch):
    """No dense fallback: the tiny model's tiles are nearly all active, and above the CPU
    threshold ``block_sparse_ffn`` would run the dense-with-mask FFN instead of the per-shard
    gather + einsum path that these tests are about."""
    monkeypatch.setitem(kffn.DENSE_FALLBACK_DENSITY, "cpu", 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_block_sparse_training_equals_one_device_einsum_ffn(mesh, sparse_path_only):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    l1, n1, g1, p1 = _one_device_einsum()
    l8, n8, g8, p8 = _train(_cfg(*BLOCK_SPARSE, *MESHES[mesh]), jax.devices())
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    np.testing.assert_allclose(n8, n1, rtol=1e-5)
    # Per parameter: a missing psum (partial outputs) or a doubled one (gradients × shards) fails.
    jax.tree.map(lambda a, b: _close(a, b, 2e-5), g8, g1)
    jax.tree.map(lambda a, b: _close(a, b, 1e-5), p8, p1)
    assert l1[-1] < l1[0]


def _walk(jaxpr, inside=False):
    """(primitive name, params, inside a shard_map?) for every equation, nested ones included."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, eqn.params, inside
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _walk(sub, inside or eqn.primitive.name == "shard_map")


def _train_step_jaxpr(cfg, devices):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    fns = step.make_step_functions(cfg, mesh, _sgd_keeping_grads(LR))
    batch = fns.plan.global_batch(random_batches(cfg, 1)[0])
    return fns.train.trace(fns.abstract_state, batch).jaxpr.jaxpr


def test_the_mask_and_ffn_run_per_shard_inside_shard_map(sparse_path_only):
    cfg = _cfg(*BLOCK_SPARSE, *MESHES["2x2x2"])
    eqns = list(_walk(_train_step_jaxpr(cfg, jax.devices())))
    # Forward: one shard_map per layer (the backward adds its transposes).
    assert sum(name == "shard_map" for name, _, _ in eqns) >= cfg.model.n_layers
    # The block masks are built per shard (sorting each shard's active neuron blocks) ...
    sorts = [inside for name, _, inside in eqns if name == "sort"]
    assert sorts and all(sorts)
    # ... the pure-JAX tile path gathers the active weight blocks there ...
    assert any(name == "gather" and inside for name, _, inside in eqns)
    # ... and the partial outputs of the tensor shards are summed over the "mlp" mesh axis.
    assert any(name.startswith("psum") and inside and "tensor" in params.get("axes", ())
               for name, params, inside in eqns)

    one = list(_walk(_train_step_jaxpr(_cfg(*BLOCK_SPARSE), jax.devices()[:1])))
    assert not any(name == "shard_map" for name, _, _ in one)
    assert any(name == "sort" for name, _, _ in one)  # the same masks, on global arrays


def test_per_shard_d_ff_not_a_multiple_of_block_f_names_the_field():
    # 256 / 64 divides (config validation passes), but a tensor=8 shard holds 32 neurons.
    cfg = _cfg("model.ffn_impl=block_sparse", "model.ffn_block_t=16", "model.ffn_block_f=64",
               *MESHES["tensor8"])
    with pytest.raises(ValueError, match=r"block_f=64 \(model.ffn_block_f\) does not divide the "
                                         r"neurons of one shard: d_ff=256 is split over mesh axes "
                                         r"\['tensor'\] \(8 ways.*into 32 per shard"):
        _train_step_jaxpr(cfg, jax.devices())


# ------------------------------------------------------------------ the Pallas kernels, sharded
B, L, D, F, BT, BF = 8, 16, 128, 1024, 16, 128
HIDDEN = P(("data", "fsdp"), None, "tensor")


def _mesh():
    return sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())


def _sparse_inputs():
    """ReLU inputs whose tile masks are ragged in every shard: x ≥ 0, so neuron blocks with all
    negative gate weights are never active, and zeroed token blocks activate nothing."""
    ks = jax.random.split(jax.random.key(3), 4)
    x = jnp.abs(jax.random.normal(ks[0], (B, L, D)))
    x = x.at[1, :BT].set(0.0).at[6, BT:].set(0.0)
    negative_F = jnp.repeat(jnp.array([0, 1, 0, 0, 1, 1, 0, 1], bool), BF)  # 2 of 4 per shard
    w_gate = jax.random.normal(ks[1], (D, F)) / D**0.5
    w_gate = jnp.where(negative_F, -jnp.abs(w_gate), w_gate)
    w_in = jax.random.normal(ks[2], (D, F)) / D**0.5
    w_out = jax.random.normal(ks[3], (F, D)) / F**0.5
    return x, w_in, w_gate, w_out


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_pallas_kernels_per_shard_match_the_dense_ffn(impl):
    mesh = _mesh()
    x, w_in, w_gate, w_out = _sparse_inputs()
    # Weights FSDP-sharded over "embed" as in training: the shard_map boundary gathers them.
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(x, P(("data", "fsdp"))), put(w_in, P("fsdp", "tensor")),
            put(w_gate, P("fsdp", "tensor")), put(w_out, P("tensor", "fsdp")))

    def loss(fn, *a):
        y = fn(*a)
        return jnp.sum(y * jnp.cos(y)), y  # a cotangent that differs per element

    def sharded_ffn(x, w_in, w_gate, w_out):
        act = jax.nn.relu(jnp.einsum("bld,df->blf", x, w_gate))
        return sharded.block_sparse_ffn(
            x, act, w_in, w_gate, w_out, jax.nn.relu, hidden_spec=HIDDEN, mesh=mesh,
            block_t=BT, block_f=BF, impl=impl, dense_fallback_density=1.0, interpret=True)

    def dense_ffn(x, w_in, w_gate, w_out):
        return kffn.dense(x.reshape(-1, D), w_in, w_gate, w_out, None, jax.nn.relu).reshape(x.shape)

    grad = lambda fn: jax.jit(jax.value_and_grad(  # noqa: E731
        functools.partial(loss, fn), argnums=(0, 1, 2, 3), has_aux=True))
    (_, y), g = grad(sharded_ffn)(*args)
    (_, y_ref), g_ref = grad(dense_ffn)(x, w_in, w_gate, w_out)
    _close(y, y_ref, 1e-5)
    for a, b in zip(g, g_ref):
        _close(a, b, 1e-5)
    assert float(jnp.abs(y_ref[1, :BT]).max()) == 0.0  # the zeroed token block stays zero

    kernels = [inside for name, _, inside in _walk(
        jax.make_jaxpr(grad(sharded_ffn))(*args).jaxpr) if name == "pallas_call"]
    # Forward (tpu: 1, gpu: hidden + output); tpu backward: dx and dW kernels.
    assert len(kernels) == (3 if impl == "tpu" else 2) and all(kernels)


def test_one_device_runs_the_local_ffn_unchanged():
    x, w_in, w_gate, w_out = _sparse_inputs()
    act = jax.nn.relu(jnp.einsum("bld,df->blf", x, w_gate))
    one = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    def fn(*arrays, mesh):
        return sharded.block_sparse_ffn(*arrays, jax.nn.relu, hidden_spec=HIDDEN, mesh=mesh,
                                        block_t=BT, block_f=BF, impl="jax",
                                        dense_fallback_density=1.0)

    for mesh in (one, None):
        jaxpr = jax.make_jaxpr(functools.partial(fn, mesh=mesh))(x, act, w_in, w_gate, w_out)
        assert not any(name == "shard_map" for name, _, _ in _walk(jaxpr.jaxpr))
    y = fn(x, act, w_in, w_gate, w_out, mesh=one)
    want = kffn.block_sparse_ffn(x, w_in, w_gate, w_out, jax.nn.relu, block_t=BT, block_f=BF,
                                 impl="jax", dense_fallback_density=1.0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_batch_not_divisible_by_the_token_shards_is_a_clear_error():
    x, w_in, w_gate, w_out = _sparse_inputs()
    with pytest.raises(ValueError, match=r"batch B=6 is not divisible by the 4 shards of mesh "
                                         r"axes \['data', 'fsdp'\]"):
        sharded.block_sparse_ffn(x[:6], None, w_in, w_gate, w_out, jax.nn.relu, hidden_spec=HIDDEN,
                                 mesh=_mesh(), block_t=BT, block_f=BF, impl="jax")
