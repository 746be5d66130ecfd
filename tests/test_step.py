import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import config, model, optim, sharding, step
from sparsejax import configure
from sparsejax.config import ConfigError, MeshConfig
from sparsejax.sparsity_plan import SparsityPlan
from step_data import random_batches, train_steps

MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=2"]


def _cfg(*extra):
    return configure.apply_overrides(config.proxy_config("tiny"), MICRO + list(extra))


@pytest.mark.slow
def test_one_device_equals_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    cfg1 = _cfg()
    cfg8 = _cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    l1, r1, s1 = train_steps(cfg1, jax.devices()[:1], n_steps=4)
    l8, r8, s8 = train_steps(cfg8, jax.devices(), n_steps=4)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    np.testing.assert_allclose(r8, r1, atol=1e-6)
    w1 = s1["params"]["layer_1"]["ffn"]["w_out"]["kernel"]
    w8 = s8["params"]["layer_1"]["ffn"]["w_out"]["kernel"]
    assert len(w8.sharding.device_set) == 8 and w8.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    np.testing.assert_allclose(np.asarray(w8), np.asarray(w1), rtol=1e-4, atol=1e-6)
    assert l1[-1] < l1[0]


@pytest.mark.slow
def test_scan_and_remat_one_device_equals_eight_devices():
    """Scanned, rematerialised blocks: stacked params sharded with a replicated "layers" axis."""
    extra = ("model.scan_layers=true", "model.remat_policy=full")
    l1, r1, s1 = train_steps(_cfg(*extra), jax.devices()[:1])
    l8, r8, s8 = train_steps(_cfg(*extra, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), jax.devices())
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    np.testing.assert_allclose(r8, r1, atol=1e-6)
    w8 = s8["params"]["layers"]["ffn"]["w_out"]["kernel"]
    assert w8.shape[0] == 2 and w8.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    np.testing.assert_allclose(np.asarray(w8), np.asarray(s1["params"]["layers"]["ffn"]["w_out"]["kernel"]),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gradient_accumulation_matches_full_batch():
    l1, _, _ = train_steps(_cfg(), jax.devices()[:1])
    l4, _, _ = train_steps(_cfg("train.grad_accum=4"), jax.devices()[:1])
    np.testing.assert_allclose(l4, l1, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("activation, topk", [("relu", 0), ("silu", 0), ("silu", 40)])
def test_in_graph_activation_ratio_matches_numpy(activation, topk):
    cfg = _cfg(f"model.activation={activation}", f"sparsity.topk={topk}", "sparsity.fat_eps=0.05")
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg))
    state = fns.init(jax.random.key(1))
    batch = random_batches(cfg, 1, seed=7)[0]
    batch["weights"][0, :10] = 0.0  # masked tokens must not count
    params = jax.device_get(state["params"])
    _, inter = model.Transformer(cfg.model).apply(
        {"params": params}, batch["inputs"], sparsity=SparsityPlan.of(cfg).model_input(),
        mutable=["intermediates"])
    acts, hiddens = model.ffn_intermediates(inter, cfg.model.n_layers)
    _, metrics = fns.train(state, fns.plan.global_batch(batch))
    w = batch["weights"].astype(bool)
    want_ratio, want_dead = [], []
    for a, h in zip(acts, hiddens):
        a, h = np.asarray(a)[w], np.asarray(h)[w]  # [tokens, F]
        active = (a != 0) if activation == "relu" else (np.abs(a) >= 0.05)
        if topk:
            active &= h != 0
            assert (active.sum(-1) <= topk).all()
        want_ratio.append(active.mean())
        want_dead.append((~active.any(0)).mean())
    np.testing.assert_allclose(metrics["activation_ratio_layers"], want_ratio, atol=1e-6)
    np.testing.assert_allclose(metrics["activation_ratio"], np.mean(want_ratio), atol=1e-6)
    np.testing.assert_allclose(metrics["dead_in_batch_layers"], want_dead, atol=1e-6)
    assert 0 < np.mean(want_ratio) < 1


@pytest.mark.slow
def test_logging_off_gives_same_loss():
    cfg = _cfg()
    shards = sharding.plan(cfg.mesh, jax.devices()[:1])
    mesh, batch = shards.mesh, shards.global_batch(random_batches(cfg, 1)[0])
    out = []
    for log_activations in (True, False):
        fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg),
                                       log_activations=log_activations)
        _, m = fns.train(fns.init(jax.random.key(0)), batch)
        out.append(m)
    assert float(out[0]["loss"]) == float(out[1]["loss"])
    assert "activation_ratio" in out[0] and "activation_ratio" not in out[1]


def test_wsd_and_cosine_schedules():
    t = _cfg("train.steps=100", "train.warmup_steps=10", "train.decay_fraction=0.2",
             "train.learning_rate=1.0", "train.min_lr_ratio=0.1").train
    lr = optim.learning_rate_schedule(t)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(50), lr(80), lr(90), lr(100)],
                               [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1], atol=1e-6)
    cos = optim.learning_rate_schedule(configure.apply_overrides(
        _cfg("train.steps=100", "train.warmup_steps=10", "train.learning_rate=1.0",
             "train.min_lr_ratio=0.1"), ["train.schedule=cosine"]).train)
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.1)
    assert float(cos(55)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)


@pytest.mark.parametrize("scanned", [False, True])
def test_weight_decay_skips_norm_scales_in_either_layout(scanned):
    cfg = _cfg("train.learning_rate=0.1", "train.weight_decay=0.5", "train.grad_clip=0",
               "train.warmup_steps=0")
    tx = optim.make_optimizer(cfg)
    lead = (3,) if scanned else ()  # scan_layers stacks [N] onto every leaf: a norm scale is 2-D
    params = {"embed": {"embedding": jnp.ones((4, 2))},
              "layers" if scanned else "layer_0": {
                  "ffn": {"w_in": {"kernel": jnp.ones(lead + (2, 2))}},
                  "ffn_norm": {"scale": jnp.ones(lead + (2,))}},
              "final_norm": {"scale": jnp.ones(2)}}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    layer = updates["layers" if scanned else "layer_0"]
    assert float(jnp.abs(layer["ffn_norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0
    # Zero gradients: the only update is decoupled decay, −lr · wd · w, on matrices and embeddings.
    np.testing.assert_allclose(layer["ffn"]["w_in"]["kernel"], -0.1 * 0.5 * np.ones(lead + (2, 2)),
                               rtol=1e-6)
    np.testing.assert_allclose(updates["embed"]["embedding"], -0.05 * np.ones((4, 2)), rtol=1e-6)


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="needs 4 devices"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="not divisible"):
        sharding.mesh_shape(MeshConfig(data=-1, fsdp=3), 8)


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "host-0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
    ({"SLURM_NTASKS": "4"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "x"}, False),
])
def test_multihost_detection(env, expected):
    assert sharding.should_initialize_distributed("auto", env) is expected
    assert sharding.should_initialize_distributed("on", env) is True
    assert sharding.should_initialize_distributed("off", env) is False


def test_multihost_flag_validation():
    with pytest.raises(ConfigError, match="allowed values"):
        sharding.should_initialize_distributed("maybe", {})


def test_imported_architecture_options_train_one_device_equals_eight():
    """The options added for imported checkpoints train like any other model: grouped-query
    attention (its "kv_heads" axis has no rule, so it is replicated), an untied output
    projection, MiniCPM's scalings and llama3 RoPE; sharded = one device."""
    extra = ("model.n_heads=4", "model.head_dim=16", "model.n_kv_heads=2",
             "model.tie_embeddings=false", "model.scale_emb=12", "model.scale_depth=1.4",
             "model.dim_model_base=16", "model.rope_type=llama3", "model.rope_factor=8",
             "model.rope_original_max_len=16")
    cfg1 = _cfg(*extra)
    l1, r1, s1 = train_steps(cfg1, jax.devices()[:1], n_steps=4)
    l8, r8, s8 = train_steps(_cfg(*extra, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
                             jax.devices(), n_steps=4)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    np.testing.assert_allclose(r8, r1, atol=1e-6)
    key8 = s8["params"]["layer_0"]["attn"]["key"]["kernel"]
    assert key8.shape == (64, 2, 16)
    assert key8.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)
    # Random tokens and a logit scale of 1/4 start at ≈ log 256, so the loss has nowhere to fall
    # in 4 steps; the steps still move the new parameters.
    assert np.all(np.isfinite(l1))
    mesh1 = sharding.make_mesh(cfg1.mesh, jax.devices()[:1])
    init = step.make_step_functions(cfg1, mesh1, optim.make_optimizer(cfg1)).init(
        jax.random.key(0))
    assert not np.allclose(np.asarray(init["params"]["unembed"]["kernel"]),
                           np.asarray(s1["params"]["unembed"]["kernel"]))
