"""sparsejax.sharding: the one sharding plan, and a run with a custom ``batch`` rule end to end."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sparsejax import config, evaluation, model, optim, sharding, step, trainer
from sparsejax import configure
from sparsejax.config import ConfigError

MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=2"]
ONLY_DATA = tuple((k, "data" if k == "batch" else v) for k, v in config.MeshConfig().rules)


def _cfg(*extra, rules=None):
    cfg = configure.apply_overrides(config.proxy_config("tiny"), MICRO + list(extra))
    if rules is not None:
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=rules))
    return cfg


def test_the_plan_follows_the_batch_rule():
    cfg = _cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    plan = sharding.plan(cfg.mesh, jax.devices())
    assert plan.batch.spec == P(("data", "fsdp"), None)
    assert plan.micro_batch.spec == P(None, ("data", "fsdp"), None)
    custom = sharding.ShardingPlan(plan.mesh, _cfg(rules=ONLY_DATA).mesh)
    assert custom.batch.spec == P("data", None)
    assert custom.micro_batch.spec == P(None, "data", None)
    shapes = custom.batch_shapes(4, 16)
    assert sorted(shapes) == ["inputs", "targets", "weights"]
    assert all(s.shape == (4, 16) and s.sharding == custom.batch for s in shapes.values())
    assert shapes["weights"].dtype == np.float32 and shapes["inputs"].dtype == np.int32
    custom.check_batch(2, 1)  # 2 rows over data=2: fine
    with pytest.raises(ConfigError, match=r"train.grad_accum=1 × mesh.data = 1 × 2"):
        custom.check_batch(3, 1)
    rows = np.arange(8 * 16, dtype=np.int32).reshape(8, 16)
    batch = custom.global_batch({"inputs": rows})["inputs"]
    assert batch.sharding == custom.batch
    np.testing.assert_array_equal(np.asarray(batch), rows)


def test_state_and_params_take_their_shardings_from_the_plan():
    """The step's state and a checkpoint reader's parameters: one computation, same shardings."""
    cfg = _cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    mesh = sharding.make_mesh(cfg.mesh, jax.devices())
    fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg))
    params = model.abstract_params(cfg.model, cfg.train.seq_len, fns.plan)
    want = jax.tree.map(lambda a: a.sharding, fns.abstract_state["params"])
    assert jax.tree.map(lambda a: a.sharding, params) == want
    w_out = fns.abstract_state["params"]["layer_1"]["ffn"]["w_out"]["kernel"]
    assert w_out.sharding.spec == P("tensor", "fsdp")  # mlp -> tensor, embed -> fsdp
    # An indivisible sharded dimension is a config error naming the field.
    bad = _cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.d_ff=161")
    with pytest.raises(ConfigError, match=r"model.d_ff=161 is not divisible by mesh.tensor=2"):
        step.make_step_functions(bad, mesh, optim.make_optimizer(bad))


@pytest.mark.slow
def test_a_custom_batch_rule_trains_and_evaluates_end_to_end(tmp_path):
    """``batch`` split over ``data`` only (default: data × fsdp) on a 2 × 2 × 2 mesh: the trainer
    compiles, feeds and evaluates with that rule, and the run equals the default rule's (the
    same computation, laid out differently), as does eval.py's evaluation of its checkpoint."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    extra = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=4",
             "train.checkpoint_every=4", "train.eval_every=2", "train.log_every=1",
             "train.eval_batches=1")
    runs = {}
    for name, rules in (("default", None), ("data_only", ONLY_DATA)):
        workdir = tmp_path / name
        trainer.train(_cfg(*extra, rules=rules), workdir, progress=False)
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        saved = json.loads((workdir / "config.json").read_text())["mesh"]["rules"]
        results = evaluation.evaluate_run(workdir, evaluation.EvalOptions(
            metrics=("zero",), eval_batches=1), progress=False)
        runs[name] = (records, saved, results)
    (d_rec, d_rules, d_res), (c_rec, c_rules, c_res) = runs["default"], runs["data_only"]
    assert ["batch", "data"] in c_rules and ["batch", ["data", "fsdp"]] in d_rules
    train = lambda recs, key: [r[key] for r in recs if key in r and "loss" in r]  # noqa: E731
    evals = lambda recs: [r["eval_loss"] for r in recs if "eval_loss" in r]  # noqa: E731
    assert len(train(c_rec, "loss")) == 4 and len(evals(c_rec)) == 2
    np.testing.assert_allclose(train(c_rec, "loss"), train(d_rec, "loss"), rtol=2e-5)
    np.testing.assert_allclose(train(c_rec, "activation_ratio"),
                               train(d_rec, "activation_ratio"), atol=1e-6)
    np.testing.assert_allclose(evals(c_rec), evals(d_rec), rtol=2e-5)
    c_ck, d_ck = c_res["checkpoints"][-1], d_res["checkpoints"][-1]
    assert c_ck["step"] == d_ck["step"] == 4
    np.testing.assert_allclose(c_ck["dense_loss"], d_ck["dense_loss"], rtol=2e-5)
    np.testing.assert_allclose(c_ck["results"]["zero"]["ratio"], d_ck["results"]["zero"]["ratio"],
                               atol=1e-6)


def test_global_batch_follows_the_config_batch_rule():
    cfg = _cfg("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", rules=ONLY_DATA)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices())
    rows = {"inputs": np.zeros((8, 4), np.int32)}
    default = sharding.ShardingPlan(mesh, config.MeshConfig()).global_batch(rows)["inputs"]
    custom = sharding.ShardingPlan(mesh, cfg.mesh).global_batch(rows)["inputs"]
    assert default.sharding.spec == P(("data", "fsdp"), None)
    assert custom.sharding.spec == P("data", None)
