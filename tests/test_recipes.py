"""Training recipes: the objective and its terms, scheduled top-k / threshold, their
effect on a real (micro-sized tiny) model, kill/resume across a stage boundary, warm start.

Shapes are the micro version of configs/tiny_relu.py that test_train.py uses, so each compile
and step is cheap; every comparison is against an independent computation (numpy, the analytic
gradient, metrics.chunk_sparsity, an orbax read of the checkpoint) or a same-seed control run.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax import (config, data, ffn, metrics, model, optim, plotting, results,
                       sharding, sparsity, step, trainer, warm_start, writers)
from sparsejax import configure
from sparsejax.config import ConfigError
from sparsejax.sparsity import Sparsity
from sparsejax.sparsity_plan import SparsityPlan
from run_wait import wait_for_step

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=5",
         "train.eval_batches=1"]


def _cfg(*extra, base="relu"):
    return configure.apply_overrides(config.proxy_config("tiny", base), MICRO + list(extra))


def _sched(field, kind, values, bounds=()):
    out = [f"sparsity.{field}.kind={kind}", f"sparsity.{field}.values={','.join(map(str, values))}"]
    return out + [f"sparsity.{field}.boundaries={','.join(map(str, bounds))}"]


def _train(cfg, n_steps, *, seed_batches=0):
    """Metrics of ``n_steps`` real steps on the embedded corpus (one device), and the state."""
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg))
    state = fns.init(jax.random.key(cfg.train.seed))
    train = data.Dataset(cfg).train
    out = []
    for _ in range(n_steps):
        state, m = fns.train(state, fns.plan.global_batch(next(train)))
        out.append(jax.device_get(m))
    return out, state, fns, mesh


# ------------------------------------------------------------------------- rank-vs-k top-k mask
@pytest.mark.parametrize("k", [1, 5, 16, 17])
def test_rank_mask_equals_top_k_at_every_k_ties_included(k):
    rng = np.random.default_rng(k)
    score = np.abs(rng.normal(size=(6, 17))).astype(np.float32)
    score[0, :] = 0.0  # all tied (a ReLU token with no active neuron): lowest indices kept
    score[1, 3:9] = score[1, 2]  # a run of ties
    got = np.asarray(jax.jit(sparsity.topk_keep_traced)(jnp.asarray(score), jnp.int32(k)))
    want = np.asarray(sparsity.topk_keep(jnp.asarray(score), k))
    np.testing.assert_array_equal(got, want)
    assert (got.sum(-1) == k).all()
    np.testing.assert_array_equal(got[0], np.arange(17) < k)


# ------------------------------------------------------------------------------ objective terms
def test_l1_gradient_equals_the_analytic_gradient_on_a_toy_ffn():
    """L1 of σ(gate) for ReLU: d/dW_gate[d, f] of Σ_t w_t Σ_f |relu(x_t W_gate)_f| is
    Σ_t w_t x[t, d] · 1[(x_t W_gate)_f > 0], reduced in the block (never a [B, L, F] output)."""
    mc = config.ModelConfig(d_model=6, d_ff=5, activation="relu")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6)).astype(np.float32)
    w_in, w_gate, w_out = (rng.normal(size=s).astype(np.float32) for s in ((6, 5), (6, 5), (5, 6)))
    weights = np.ones((2, 4), np.float32)
    weights[1, 2:] = 0.0
    sp = Sparsity(stats_weights_BxL=jnp.asarray(weights), regularisers=("l1",))
    fn = ffn.reference_ffn(mc)

    def l1(wg):
        _, aux = fn(jnp.asarray(x), ffn.FfnWeights(jnp.asarray(w_in), wg, jnp.asarray(w_out)), sp)
        return aux.stats["reg_l1"]

    gate = x @ w_gate
    np.testing.assert_allclose(float(l1(jnp.asarray(w_gate))),
                               np.sum(np.maximum(gate, 0).sum(-1) * weights), rtol=1e-5)
    want = np.einsum("bld,blf->df", x * weights[..., None], (gate > 0).astype(np.float32))
    np.testing.assert_allclose(np.asarray(jax.grad(l1)(jnp.asarray(w_gate))), want, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
def test_objective_terms_normalisation_and_grad_accumulation():
    """Every term reported on its own; the same per-token values with 1 and 4 micro-batches;
    the in-graph chunk sparsity equals metrics.chunk_sparsity on the model's activations."""
    extra = (_sched("l1", "linear", (0.0, 1e-3), (0, 4)) + _sched("chunk", "constant", (0.2,))
             + ["sparsity.chunk_len=4"])
    runs = {a: _train(_cfg(*extra, f"train.grad_accum={a}"), 3) for a in (1, 4)}
    (m1, s1, fns, mesh), (m4, _, _, _) = runs[1], runs[4]
    for key in ("loss", "objective", "l1", "chunk_loss", "grad_norm", "train_chunk_sparsity"):
        np.testing.assert_allclose([m[key] for m in m4], [m[key] for m in m1], rtol=2e-5,
                                   err_msg=key)
    for t, m in enumerate(m1, start=1):
        assert float(m["l1_coef"]) == pytest.approx(1e-3 * t / 4, rel=1e-6)
        want = m["loss"] + m["l1_coef"] * m["l1"] + m["chunk_coef"] * m["chunk_loss"]
        assert float(m["objective"]) == pytest.approx(float(want), rel=1e-6)
        assert 0 < m["chunk_loss"] <= 2 and m["l1"] > 0  # chunk: mean union per layer, 2 layers
    # Independent: the chunk sparsity and L1 of the current params' activations on one batch.
    cfg = _cfg(*extra, "train.grad_accum=1")
    batch = next(data.Dataset(cfg).train)
    params = jax.device_get(s1["params"])
    _, inter = model.Transformer(cfg.model).apply({"params": params}, batch["inputs"],
                                                 mutable=["intermediates"])
    acts, _ = model.ffn_intermediates(inter, cfg.model.n_layers)
    _, m = fns.train(s1, fns.plan.global_batch(batch))
    want_cs = np.mean([float(metrics.chunk_sparsity(a != 0, 4)) for a in acts])
    assert float(m["train_chunk_sparsity"]) == pytest.approx(want_cs, abs=1e-6)
    want_l1 = sum(np.abs(np.asarray(a)).sum() for a in acts) / batch["weights"].sum()
    assert float(m["l1"]) == pytest.approx(want_l1, rel=1e-5)


@pytest.mark.slow
def test_without_sparsity_terms_the_step_reports_no_sparsity_metrics():
    ms, *_ = _train(_cfg(), 1)
    assert not set(step.SPARSITY_METRICS) & set(ms[0])


# -------------------------------------------------------------- effects on the tiny config
@pytest.mark.slow
def test_prosparse_l1_lowers_the_activation_ratio_at_a_bounded_loss_cost():
    """Same seed, data and steps: the sine-staged L1 (then FATReLU 0.01) against λ = 0.
    Bound: the LM loss (mean of the last 5 steps) rises by less than 0.15 nats."""
    base = ["train.steps=60", "train.learning_rate=3e-3"]
    control, *_ = _train(_cfg(*base, "model.activation=fatrelu"), 60)
    recipe = (_sched("l1", "sine_stages", (0.0, 1e-3, 3e-3), (5, 25, 45))
              + _sched("activation_threshold", "piecewise", (0.0, 0.01), (0, 50)))
    prosparse, *_ = _train(_cfg(*base, "model.activation=fatrelu", *recipe), 60)
    last = lambda ms, k: float(np.mean([m[k] for m in ms[-5:]]))  # noqa: E731
    assert last(prosparse, "activation_ratio") < 0.6 * last(control, "activation_ratio")
    assert last(prosparse, "loss") < last(control, "loss") + 0.15
    assert prosparse[-1]["activation_threshold"] == np.float32(0.01)


@pytest.mark.slow
def test_topk_schedule_ends_at_exactly_k_active_per_token():
    cfg = _cfg("model.activation=silu", "sparsity.topk_ste=true",
               *_sched("topk", "linear", (0, 16), (2, 6)))
    ms, state, _, _ = _train(cfg, 8)
    # by hand: dense (160) until step 2, linear in counts to 16 at step 6: 160, 124, 88, 52, 16
    assert [int(m["topk_k"]) for m in ms] == [160, 160, 124, 88, 52, 16, 16, 16]
    assert ms[-1]["activation_ratio"] <= 16 / 160 + 1e-7
    # The model after 8 steps, with the recipe's values at step 8: exactly 16 kept per token.
    plan = SparsityPlan.of(cfg)
    sp = plan.model_input(plan.coefficients(8))
    batch = next(data.Dataset(cfg).train)
    _, inter = model.Model(cfg.model).apply(jax.device_get(state["params"]), batch["inputs"],
                                            sparsity=sp, collect=("intermediates",))
    for h in model.ffn_intermediates(inter, cfg.model.n_layers)[1]:
        assert (np.count_nonzero(np.asarray(h), axis=-1) == 16).all()


@pytest.mark.slow
def test_chunk_loss_raises_chunk_level_sparsity():
    base = ["train.steps=60", "sparsity.chunk_len=8"]
    # λ = 0 on a schedule that is not the default: the term is on (so chunk sparsity is logged)
    # and contributes exactly 0.
    control, *_ = _train(_cfg(*base, *_sched("chunk", "linear", (0.0, 0.0), (5, 25))), 60)
    chunked, *_ = _train(_cfg(*base, *_sched("chunk", "linear", (0.0, 0.3), (5, 25))), 60)
    last = lambda ms, k: float(np.mean([m[k] for m in ms[-5:]]))  # noqa: E731
    assert last(chunked, "train_chunk_sparsity") > last(control, "train_chunk_sparsity") + 0.1
    assert last(chunked, "loss") < last(control, "loss") + 0.3


# --------------------------------------------------------------------------- config and errors
@pytest.mark.parametrize("overrides, needles", [
    (_sched("l1", "cosine", (1.0,)), ["sparsity.l1.kind='cosine'", "allowed values"]),
    (_sched("l1", "linear", (0.0, 1.0), (5,)), ["sparsity.l1", "one value per boundary"]),
    (_sched("chunk", "linear", (0.0, 1.0), (9, 3)), ["sparsity.chunk.boundaries", "strictly increasing"]),
    (_sched("l1", "constant", (-1.0,)), ["sparsity.l1=-1.0", ">= 0"]),
    (_sched("l1", "linear", (0.0, -1.0), (0, 5)), ["sparsity.l1.values=(0.0, -1.0)", ">= 0"]),
    (_sched("topk", "constant", (2.5,)), ["sparsity.topk=2.5", "integer k in [1, d_ff=160]"]),
    (["sparsity.topk=161"], ["sparsity.topk=161", "d_ff=160"]),
    (_sched("topk", "linear", (0, 16), (2, 6)) + ["sparsity.topk_mode=approx"],
     ["sparsity.topk_mode='approx'", "constant sparsity.topk"]),
    (_sched("activation_threshold", "constant", (0.01,)),
     ["sparsity.activation_threshold", "'fatrelu'", "'relu'"]),
    (["model.activation=fatrelu", "sparsity.activation_threshold=-0.1"],
     ["sparsity.activation_threshold=-0.1", ">= 0"]),
    (_sched("chunk", "constant", (0.1,)) + ["sparsity.chunk_len=5"],
     ["sparsity.chunk_len=5", "train.seq_len=32"]),
    (["sparsity.chunk_tau=0"], ["sparsity.chunk_tau=0", "> 0"]),
    (_sched("l1", "constant", (1e-3,)) + ["model.ffn_impl=block_sparse", "model.ffn_block_f=32",
     "model.ffn_block_t=32"], ["sparsity.l1", "model.ffn_impl='reference'"]),
    (["sparsity.l1.values=a,b"], ["sparsity.l1.values='a'", "float"]),
    (["sparsity.l1.speed=1"], ["sparsity.l1.speed", "fields"]),
])
def test_bad_recipe_configs_give_one_line_errors(overrides, needles):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    text = str(err.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text


def test_recipe_survives_the_config_round_trip_and_old_configs_resume():
    cfg = configure.load(REPO / "configs/recipes/prosparse_tiny.py")
    raw = json.loads(json.dumps(config.to_dict(cfg)))
    assert configure.from_dict(raw) == cfg
    assert trainer.config_differences(raw, config.to_dict(cfg)) == []
    plain = json.loads(json.dumps(config.to_dict(config.proxy_config("tiny"))))
    del plain["sparsity"]  # written before the section existed: every field its default
    assert trainer.config_differences(plain, config.to_dict(config.proxy_config("tiny"))) == []
    changed = trainer.config_differences(plain, config.to_dict(_cfg(*_sched("l1", "constant", (1e-3,)))))
    assert "sparsity.l1.values" in changed
    assert SparsityPlan.of(cfg).stage_boundaries() == [0, 20, 80, 140, 160]


def test_activation_plot_marks_stage_boundaries(tmp_path):
    records = [results.TrainRecord(step=s, loss=1.0, tokens_seen=100.0 * s, activation_ratio=0.5,
                                   activation_ratio_layers=[0.4, 0.6]) for s in range(1, 21)]
    drawn = []
    orig = plotting._finish

    def spy(fig, ax, *a, **k):
        drawn.extend(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--")
        return orig(fig, ax, *a, **k)

    plotting._finish = spy
    try:
        out = plotting.plot_activation_ratio(records, tmp_path / "p.png", stages=[0, 5, 12, 99])
    finally:
        plotting._finish = orig
    assert out.exists() and drawn == [500.0, 1200.0]  # boundaries outside the run are not drawn


# --------------------------------------------------------------------------- real processes
def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's run
    return env


def _cmd(workdir, *overrides, config_file="configs/tiny_relu.py"):
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / config_file),
            "--workdir", str(workdir), "--no-progress"]
    for o in MICRO + list(overrides):
        args += ["--set", o]
    return args


def _run(workdir, *overrides, check=True, **kw):
    proc = subprocess.run(_cmd(workdir, *overrides, **kw), env=_env(), capture_output=True,
                          text=True, timeout=900, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _records(workdir):
    return [r for r in writers.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


ALL_TERMS = (["model.activation=fatrelu", "sparsity.topk_ste=true", "sparsity.chunk_len=8"]
             + _sched("l1", "sine_stages", (0.0, 1e-3, 2e-3), (10, 40, 70))
             + _sched("chunk", "linear", (0.0, 0.1), (20, 60))
             + _sched("topk", "piecewise", (0, 96), (0, 50))
             + _sched("activation_threshold", "piecewise", (0.0, 0.01), (0, 45)))


@pytest.mark.slow
def test_sigkill_and_resume_across_a_stage_boundary_is_bitwise_identical(tmp_path):
    """Every recipe term at once; killed after step 30 (checkpoints every 15), resumed from a
    checkpoint before the threshold (45), top-k (50) and L1 (40, 70) stage boundaries."""
    common = ALL_TERMS + ["train.steps=90", "train.log_every=1", "train.checkpoint_every=15",
                          "train.eval_every=1000"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(ref, *common)
    proc = subprocess.Popen(_cmd(killed, *common), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for_step(killed, 31, proc, timeout=900)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 45, saved  # the resumed part crosses the stage boundaries
    resumed = _run(killed, *common)
    assert "resumed from" in resumed.stdout
    a, b = _records(ref), _records(killed)
    keys = ("loss", "objective", "l1", "chunk_loss", "l1_coef", "chunk_coef", "topk_k",
            "activation_threshold", "train_chunk_sparsity", "activation_ratio")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 91))
    for key in keys:
        assert [r[key] for r in b] == [r[key] for r in a], key  # bitwise (exact JSON floats)
    assert a[43]["activation_threshold"] == 0.0 and a[44]["activation_threshold"] > 0
    assert a[48]["topk_k"] == 160 and a[49]["topk_k"] == 96
    assert (ref / "activation_ratio.png").exists()


@pytest.fixture(scope="module")
def silu_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("silu")
    _run(workdir, "train.steps=12", "train.checkpoint_every=12", "train.eval_every=1000",
         config_file="configs/tiny_silu.py")
    return workdir


@pytest.mark.slow
def test_warm_start_across_activations_and_layouts(silu_run, tmp_path):
    # Source params read by orbax alone, independently of sparsejax's readers.
    src = ocp.PyTreeCheckpointer().restore(silu_run / "checkpoints" / "12" / "state")["params"]
    proc = _run(tmp_path / "relu", "train.steps=2", f"train.warm_start={silu_run}",
                "train.checkpoint_every=1000", "train.eval_every=1000")
    assert f"warm start: parameters of {silu_run / 'checkpoints'} step 12" in proc.stdout
    assert "model.activation='silu'" in proc.stdout
    rows = _records(tmp_path / "relu")
    assert rows[0]["loss"] < 4.5  # ln 256 = 5.55 from scratch: it starts from trained weights
    ckpt = ocp.PyTreeCheckpointer().restore(tmp_path / "relu" / "checkpoints" / "2" / "state")
    assert int(ckpt["step"]) == 2
    # In-process: the planned load equals the source, in the scanned layout too.
    for scan in (False, True):
        cfg = _cfg(f"train.warm_start={silu_run}", f"model.scan_layers={scan}")
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
        warm = warm_start.plan(cfg, mesh)
        params = jax.device_get(warm_start.load(warm, cfg, jax.tree.map(
            lambda a: a.sharding, model.abstract_params(
                cfg.model, 32, sharding.ShardingPlan(mesh, cfg.mesh)))))
        for i in range(2):
            got = params["layers"]["ffn"]["w_gate"]["kernel"][i] if scan else \
                params[f"layer_{i}"]["ffn"]["w_gate"]["kernel"]
            np.testing.assert_array_equal(got, src[f"layer_{i}"]["ffn"]["w_gate"]["kernel"])
        np.testing.assert_array_equal(params["embed"]["embedding"], src["embed"]["embedding"])


@pytest.mark.slow
def test_warm_start_with_mismatched_shapes_is_refused_before_anything_is_written(silu_run, tmp_path):
    workdir = tmp_path / "wider"
    proc = _run(workdir, "model.d_ff=192", f"train.warm_start={silu_run}", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "train.warm_start=" in lines[0] and "parameter layer_0/ffn/w_gate/kernel has shape " \
        "(64, 160) in the checkpoint but (64, 192) in this config" in lines[0], lines[0]
    assert not workdir.exists()
    proc = _run(workdir, f"train.warm_start={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 2 and "holds no finished checkpoint" in proc.stderr
    assert not workdir.exists()
