"""``model.attention_impl``: the fused kernels equal the einsum attention, alone and in training.

The independent computation is ``xla``, the model's einsum attention
(:func:`sparsejax.model.causal_attention`: full float32 scores, the causal mask applied after the
fact), which involves no blocks, no online softmax and no shard_map. Splash (TPU) and the Pallas
GPU flash kernel run here in Pallas interpret mode, the kernels' own code (block skipping, online
softmax, their custom backward) executed op by op on CPU; cuDNN cannot run on CPU and is only
checked for its config rules. The TPU compile of a train step with splash is in
tests/test_attention_tpu.py.
"""

import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import attention, config, configure, flops, model
from sparsejax.config import ConfigError, ModelConfig
from step_data import train_steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = ModelConfig(attention_block_q=128, attention_block_kv=128)
KERNELS = ("splash", "gpu")


def _qkv(shape_BLHGK, dtype, seed=0):
    b, l, h, g, k = shape_BLHGK
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, l, h, k), jnp.float32).astype(dtype),
            jax.random.normal(kk, (b, l, g, k), jnp.float32).astype(dtype),
            jax.random.normal(kv, (b, l, g, k), jnp.float32).astype(dtype))


def _value_and_grads(attend, q, k, v):
    # A loss whose cotangent varies per element (a plain sum would hide transposed gradients).
    def loss(q, k, v):
        out = attend(q, k, v).astype(jnp.float32)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1], dtype=jnp.float32))
    out = attend(q, k, v)
    return out, jax.grad(loss, (0, 1, 2))(q, k, v)


def _close(got, want, tol):
    """Equal to ``tol`` of ``want``'s largest magnitude."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.abs(want).max()), 1e-12)
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=tol)


def _cases():
    """Every kernel × dtype × head layout; one f32 and one bf16 case in the fast tier."""
    fast = {("splash", "float32", "gqa"), ("gpu", "bfloat16", "gqa")}
    for impl in KERNELS:
        for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)):
            for layout, heads in (("mha", (4, 4)), ("gqa", (4, 2)), ("mqa", (4, 1))):
                marks = () if (impl, jnp.dtype(dtype).name, layout) in fast else pytest.mark.slow
                yield pytest.param(impl, dtype, tol, heads, marks=marks,
                                   id=f"{impl}-{jnp.dtype(dtype).name}-{layout}")


@pytest.mark.parametrize("impl, dtype, tol, heads", list(_cases()))
def test_kernel_equals_einsum_attention_in_values_and_gradients(impl, dtype, tol, heads):
    # L = 256 with 128-blocks: of the 2 × 2 score blocks the kernels skip the masked one.
    q, k, v = _qkv((2, 256, *heads, 64), dtype)
    out, grads = _value_and_grads(attention.ATTENTION_IMPLS[impl](CFG), q, k, v)
    # The reference in float32 from the same (rounded) inputs: bf16 kernels are judged against
    # the exact answer, not against another bf16 computation's rounding.
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    want_out, want_grads = _value_and_grads(model.xla_attention(CFG), *f32)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, want_out, tol)
    for got, want in zip(grads, want_grads):
        assert got.shape == want.shape
        _close(got, want, tol)


def test_causal_mask_is_applied():
    """Changing keys/values after position t leaves the outputs up to t unchanged, and changing
    an earlier one changes them (so the kernels neither peek ahead nor ignore the past)."""
    q, k, v = _qkv((1, 256, 2, 2, 64), jnp.float32)
    for impl in KERNELS:
        attend = attention.ATTENTION_IMPLS[impl](CFG)
        base = attend(q, k, v)
        later = attend(q, k.at[:, 200:].set(0.0), v.at[:, 200:].set(5.0))
        np.testing.assert_array_equal(np.asarray(later[:, :200]), np.asarray(base[:, :200]))
        assert not np.allclose(later[:, 200:], base[:, 200:])
        earlier = attend(q, k, v.at[:, 10].set(5.0))
        assert not np.allclose(earlier[:, 10:], base[:, 10:])
        np.testing.assert_array_equal(np.asarray(earlier[:, :10]), np.asarray(base[:, :10]))


def test_splash_block_fraction_counts_the_causal_blocks():
    assert attention.splash_block_fraction(256, 128, 128) == 3 / 4
    assert attention.splash_block_fraction(4096, 512, 512) == 36 / 64
    assert attention.splash_block_fraction(128, 128, 128) == 1.0
    # Rectangular blocks: a kv block is computed when it starts at or before the q block's end.
    assert attention.splash_block_fraction(512, 256, 128) == (2 + 4) / 8


def test_executed_attention_flops():
    """The analytic counts: the einsum path's are flops.py's attention term (× 4/3 under full
    remat); splash computes 3 of 4 blocks at L = 256 with 128-blocks, 9 matmuls each (11 when
    the forward is recomputed)."""
    cfg = configure.apply_overrides(config.proxy_config("tiny"),
                                    ["train.seq_len=256", "model.max_seq_len=256"]).model
    cfg = dataclasses.replace(cfg, attention_block_q=128, attention_block_kv=128)
    unit = 2 * cfg.n_layers * 256 * cfg.n_heads * cfg.head_dim
    none = dict(remat_policy="none")
    plain = dataclasses.replace(cfg, **none)
    dense = flops.train_flops_per_token(plain, 256) - 6 * (
        flops.param_counts(plain).attention + flops.param_counts(plain).ffn
        + plain.d_model * plain.vocab_size)
    assert attention.train_flops_per_token(plain, 256, "xla") == pytest.approx(dense) == 6 * unit
    full = dataclasses.replace(cfg, remat_policy="full")
    assert attention.train_flops_per_token(full, 256, "xla") == 8 * unit
    assert attention.train_flops_per_token(full, 256, "splash") == 11 * unit * 3 / 4
    kept = dataclasses.replace(cfg, remat_policy="save_qkv_attention")
    assert attention.train_flops_per_token(kept, 256, "splash") == 9 * unit * 3 / 4
    assert attention.train_flops_per_token(kept, 256, "xla") == 8 * unit


def test_auto_picks_by_platform():
    assert attention.resolve("auto", "tpu") == "splash"
    assert attention.resolve("auto", "gpu") == "gpu"
    assert attention.resolve("auto", "cpu") == "xla"
    assert attention.resolve("splash", "cpu") == "splash"
    assert attention.resolve("auto") == "xla"  # this CPU, no mesh


@pytest.mark.parametrize("size", config.PAPER_SIZES)
def test_paper_pod_presets_use_splash_on_tpu_and_einsum_elsewhere(size):
    """The pod presets' default follows the fit table (README "Attention implementations"):
    splash on a TPU slice; on this CPU the attention is the einsum one (``xla``)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = configure.load(str(root / "configs" / f"sparsing_law_{size}.py"))
    assert cfg.model.attention_impl == "auto"
    assert attention.resolve(cfg.model.attention_impl, "tpu") == "splash"
    assert attention.resolve(cfg.model.attention_impl) == "xla"
    assert cfg.train.seq_len % max(attention.splash_blocks(cfg.model, cfg.train.seq_len)) == 0


MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.head_dim=16",
         "model.d_ff=128", "train.batch_size=4", "train.seq_len=128", "train.warmup_steps=2",
         "model.attention_block_q=128", "model.attention_block_kv=128"]
# Grouped-query heads, Llama 3.1 RoPE scaling and MiniCPM's scalings, scanned and rematerialised
# keeping the kernel's residuals: the options the attention must keep working with.
OPTIONS = ["model.n_kv_heads=2", "model.rope_type=llama3", "model.rope_factor=8",
           "model.rope_original_max_len=64", "model.scale_emb=12", "model.scale_depth=1.4",
           "model.dim_model_base=32", "model.scan_layers=true",
           "model.remat_policy=save_qkv_attention"]


def _cfg(*extra):
    return configure.apply_overrides(config.proxy_config("tiny"), MICRO + list(extra))


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_training_with_a_kernel_equals_einsum_attention(impl):
    want_losses, want_ratios, want_state = train_steps(_cfg(*OPTIONS), jax.devices()[:1])
    losses, ratios, state = train_steps(_cfg(*OPTIONS, f"model.attention_impl={impl}"),
                                        jax.devices()[:1])
    np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
    np.testing.assert_allclose(ratios, want_ratios, atol=1e-3)
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), state["params"], want_state["params"])
    assert not np.allclose(want_losses[-1], want_losses[0], rtol=1e-6)  # the steps trained


@pytest.mark.slow
def test_sharded_splash_training_equals_one_device_einsum():
    """data 2 × fsdp 2 × tensor 2 on the 8 fake CPU devices: splash per shard in shard_map (batch
    rows and heads split; the 2 key/value heads split with their query heads) equals the einsum
    attention on one device."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=8"]
    want_losses, _, want_state = train_steps(_cfg(*OPTIONS, *mesh[-1:]), jax.devices()[:1])
    losses, _, state = train_steps(_cfg(*OPTIONS, *mesh, "model.attention_impl=splash"),
                                   jax.devices())
    np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), jax.device_get(state["params"]),
                 want_state["params"])


def _walk(jaxpr, inside=False):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, eqn.params, inside
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _walk(sub, inside or eqn.primitive.name == "shard_map")


def test_splash_runs_per_shard_inside_shard_map_with_batch_and_heads_split():
    from sparsejax import sharding
    from jax.sharding import PartitionSpec as P

    cfg = _cfg("model.attention_impl=splash", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
               "train.batch_size=8")
    mesh = sharding.make_mesh(cfg.mesh, jax.devices())
    m = model.Model(cfg.model, sharding.rules(cfg.mesh))
    tokens = jax.ShapeDtypeStruct((8, cfg.train.seq_len), jnp.int32)
    abstract = jax.eval_shape(lambda key: m.init(key, cfg.train.seq_len), jax.random.key(0))

    def forward(p, t):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return m.apply(p, t)[0]

    eqns = list(_walk(jax.make_jaxpr(forward)(abstract, tokens).jaxpr))
    maps = [params for name, params, _ in eqns if name == "shard_map"]
    assert len(maps) == cfg.model.n_layers
    want = P(("data", "fsdp"), None, "tensor", None)
    # q, k, v and the output split alike (the leading operands are the kernel's block-mask
    # tables, closed-over constants, replicated).
    assert all(tuple(p["in_specs"][-3:]) == (want,) * 3 and tuple(p["out_specs"]) == (want,)
               for p in maps)
    assert any(name == "pallas_call" and inside for name, _, inside in eqns)
    assert not any(name == "pallas_call" and not inside for name, _, inside in eqns)


def test_gqa_heads_not_divisible_by_the_head_shards_are_repeated():
    """1 key/value head, tensor 2: each shard gets its queries' (repeated) key/value heads."""
    from jax.sharding import PartitionSpec as P
    from sparsejax import sharding
    from sparsejax.config import MeshConfig

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=2), jax.devices()[:2])
    q, k, v = _qkv((2, 128, 4, 1, 16), jnp.float32)
    local = lambda q, k, v: model.xla_attention(CFG)(q, k, v)  # noqa: E731
    got = attention.per_shard(local, q, k, v, mesh=mesh, spec=P(None, None, "tensor"))
    _close(got, model.xla_attention(CFG)(q, k, v), 1e-6)
    with pytest.raises(ValueError, match=r"heads H \(model.n_heads\)=3 is not divisible by the 2 "
                                         r"shards of mesh axes \['tensor'\]"):
        attention.per_shard(local, q[:, :, :3], k, v, mesh=mesh, spec=P(None, None, "tensor"))


@pytest.mark.parametrize("overrides, message", [
    (["model.attention_impl=flash"],
     "model.attention_impl='flash' is not allowed; allowed values: ['cudnn', 'gpu', 'splash', "
     "'xla', 'auto']"),
    (["model.attention_block_q=192"], "model.attention_block_q=192 must be a multiple of 128"),
    (["model.attention_block_kv=0"], "model.attention_block_kv=0 must be > 0"),
    (["model.attention_impl=splash", "train.seq_len=96"],
     "train.seq_len=96 must be a multiple of 128 and of the splash blocks"),
    (["model.attention_impl=splash", "train.seq_len=640"],
     "train.seq_len=640 must be a multiple of 128 and of the splash blocks "
     "model.attention_block_q=512"),
    (["model.attention_impl=cudnn"], "model.dtype='float32' must be 'bfloat16' for "
                                     "model.attention_impl='cudnn'"),
])
def test_bad_attention_config_names_the_field(overrides, message):
    base = config.proxy_config("tiny")
    base = configure.apply_overrides(base, ["model.max_seq_len=1024"])
    with pytest.raises(ConfigError) as err:
        configure.apply_overrides(base, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_splash_at_a_length_its_blocks_do_not_divide_is_a_value_error():
    q, k, v = _qkv((1, 192, 2, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="sequence length=192 must be a multiple of 128"):
        attention.splash_attention(CFG)(q, k, v)


def test_cudnn_off_gpu_says_so():
    q, k, v = _qkv((1, 128, 2, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="model.attention_impl='cudnn' needs a GPU"):
        attention.cudnn_attention(CFG)(q, k, v)


@pytest.mark.slow
def test_cli_bad_attention_impl_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config",
                           str(ROOT / "configs" / "tiny_relu.py"), "--workdir",
                           str(tmp_path / "run"), "--set", "model.attention_impl=flash"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: model.attention_impl='flash' is not allowed; allowed values: "
        "['cudnn', 'gpu', 'splash', 'xla', 'auto']"]
    assert not (tmp_path / "run").exists()
