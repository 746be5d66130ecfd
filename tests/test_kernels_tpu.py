"""The Pallas TPU kernels through the real Mosaic compiler, on a CPU-only machine.

``jax.experimental.topologies.get_topology_desc`` builds TPU device descriptions from libtpu
without any TPU attached; ``jit(...).lower(...).compile()`` for arrays placed on them runs the
full TPU compiler, Mosaic included, so tiling, VMEM and lowering errors surface here. Nothing is
executed. Needs libtpu (``pip install 'jax[tpu]==<installed jax version>'``); without it these
tests skip locally and fail under ``CI=true``.
"""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from libtpu_guard import require_libtpu

from sparsejax import sharding
from sparsejax.config import MeshConfig
from sparsejax.kernels import ffn, sharded
from sparsejax.kernels import block_mask as bm

pytestmark = pytest.mark.slow  # compiles for TPU with libtpu

# Nothing runs on a TPU here, so several compiling processes may share libtpu (its lockfile
# would otherwise refuse a second one), as in benchmarks/tpu_fit.py.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

T, D, F, BT, BF, K = 256, 256, 512, 64, 128, 3


@pytest.fixture(scope="module")
def tpu_devices():
    require_libtpu("compile the TPU kernels")
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices


@pytest.fixture(scope="module")
def tpu_device(tpu_devices):
    return tpu_devices[0]


def _compile_fwd_bwd(device, dtype, gated, act):
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa

    def loss(x, w_in, w_gate, w_out, index, count):
        mask = bm.BlockMask(index, count, count)
        y = ffn.block_sparse_ffn(x, w_in, w_gate, w_out, act, block_t=BT, block_f=BF, mask=mask,
                                 impl="tpu", dense_fallback_density=1.0)
        return jnp.sum(y.astype(jnp.float32))

    args = (spec((T, D)), spec((D, F)), spec((D, F)) if gated else None, spec((F, D)),
            spec((T // BT, K), jnp.int32), spec((T // BT,), jnp.int32))
    argnums = (0, 1, 2, 3) if gated else (0, 1, 3)
    return jax.jit(jax.value_and_grad(loss, argnums)).trace(*args).lower().compile()


@pytest.mark.parametrize("dtype, gated, act", [
    (jnp.float32, True, jax.nn.silu), (jnp.bfloat16, True, jax.nn.relu),
    (jnp.bfloat16, False, jax.nn.gelu)])
def test_tpu_kernels_compile_fwd_bwd_on_v5e(tpu_device, dtype, gated, act):
    compiled = _compile_fwd_bwd(tpu_device, dtype, gated, act)
    text = compiled.as_text()
    # Forward, dx and dW kernels are all Mosaic custom calls in the compiled TPU program.
    assert text.count("tpu_custom_call") >= 3, text[:2000]
    for kernel in ("block_sparse_ffn_fwd", "block_sparse_ffn_dx", "block_sparse_ffn_dw"):
        assert kernel in text
    assert compiled.memory_analysis().argument_size_in_bytes > 0


def test_tpu_kernels_compile_per_shard_under_a_mesh(tpu_devices):
    """The 4 chips of v5e:2x2 as data=2 × tensor=2: shard_map (with varying-axes checks, as in a
    real run) around the kernels, weights FSDP-style gathered at the boundary."""
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), tpu_devices)
    spec = lambda shape, p: jax.ShapeDtypeStruct(shape, jnp.float32,  # noqa: E731
                                                 sharding=NamedSharding(mesh, p))

    def loss(x, w_in, w_gate, w_out):
        act = jax.nn.relu(jnp.einsum("bld,df->blf", x, w_gate))
        y = sharded.block_sparse_ffn(x, act, w_in, w_gate, w_out, jax.nn.relu,
                                     hidden_spec=P(("data", "fsdp"), None, "tensor"), mesh=mesh,
                                     block_t=BT, block_f=BF, impl="tpu",
                                     dense_fallback_density=1.0)
        return jnp.sum(y * y)  # dy depends on y

    args = (spec((4, T // 2, D), P("data")), spec((D, 2 * F), P(None, "tensor")),
            spec((D, 2 * F), P(None, "tensor")), spec((2 * F, D), P("tensor")))
    text = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3))).trace(*args).lower().compile().as_text()
    for kernel in ("block_sparse_ffn_fwd", "block_sparse_ffn_dx", "block_sparse_ffn_dw"):
        assert kernel in text
    # Activation-sized all-reduces (one device's [B/2, L, D]): y in the forward and dx in the
    # backward, both over "tensor"; with check_vma=False shard_map would all-reduce dy as well.
    # XLA may combine several into one tuple all-reduce, so operands are counted, not ops.
    results = [line.split(" all-reduce(")[0] for line in text.splitlines() if " all-reduce(" in line]
    assert sum(r.count("f32[2,128,256]") for r in results) == 2, results


def test_cpu_backend_still_default_with_libtpu(tpu_device):
    del tpu_device
    assert jax.default_backend() == "cpu"
    assert float(jnp.ones(3).sum()) == 3.0


@pytest.mark.slow
def test_bf16_block_t_8_compiles_and_kernels_carry_their_cost(tpu_device):
    """bt = 8 in bf16 passes the tiling check and Mosaic; XLA's cost analysis sees the kernels'
    FLOPs (``pl.CostEstimate`` at k_max) instead of counting the custom calls as 0."""
    from sparsejax.kernels import tpu

    bt, n, k = 8, T // 8, K
    sharding_ = jax.sharding.SingleDeviceSharding(tpu_device)
    spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sharding_)  # noqa

    def forward(x, w_in, w_gate, w_out, index, count):
        mask = bm.BlockMask(index, count, count)
        return ffn.block_sparse_ffn(x, w_in, w_gate, w_out, jax.nn.relu, block_t=bt, block_f=BF,
                                    mask=mask, impl="tpu", dense_fallback_density=1.0)

    compiled = jax.jit(forward).trace(
        spec((T, D)), spec((D, F)), spec((D, F)), spec((F, D)), spec((n, k), jnp.int32),
        spec((n,), jnp.int32)).lower().compile()
    assert "block_sparse_ffn_fwd" in compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    want = 3 * 2 * bt * BF * D * n * k  # up, gate, out matmuls of every (bt × bf) tile
    assert tpu.tile_costs(T, D, F, n * k, bt, BF, True, 2)["fwd"].flops == want
    assert cost["flops"] >= want
