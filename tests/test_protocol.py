"""sparsejax.sweep.protocol: the finding sweeps' regime (budget, batch, log-spaced checkpoints) and
the plateau test, against independent numpy/scipy computations; the sweep files that use it."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
from scipy import stats

from sparsejax import sweep
from sparsejax.sweep import protocol

REPO = pathlib.Path(__file__).resolve().parents[1]
FINDING_SWEEPS = ("cpu_width_depth", "cpu_scale", "cpu_activations", "cpu_width_depth_mup", "cpu_scale_mup",
                  "gpu_width_depth", "gpu_scale", "tpu_width_depth", "tpu_scale")


def test_log_spaced_steps_match_geomspace():
    got = protocol.log_spaced_steps(20, 976, 12)
    want = sorted({int(round(x)) for x in np.geomspace(20, 976, 12)})
    assert list(got) == want and got[0] == 20 and got[-1] == 976
    ratios = np.diff(np.log(got))
    assert np.allclose(ratios, ratios.mean(), atol=0.05)  # evenly spaced in log steps, up to rounding
    assert protocol.log_spaced_steps(3, 6, 12) == (3, 4, 5, 6)  # too short for 12 distinct steps
    assert protocol.log_spaced_steps(7, 7, 5) == (7,)
    for bad in ((0, 10, 3), (10, 5, 3), (1, 10, 0)):
        with pytest.raises(ValueError, match="log_spaced_steps"):
            protocol.log_spaced_steps(*bad)


@pytest.mark.parametrize("params", [500, 1512, 5052, 11_920, 23_712, 40_056, 94_752, 2_000_000])
def test_regime_budget_batch_and_checkpoints(params):
    r = protocol.regime(params)
    assert r.tokens == r.batch_size * protocol.SEQ_LEN * r.steps
    assert r.tokens_per_param >= protocol.TOKENS_PER_PARAM
    assert r.tokens_per_param < protocol.TOKENS_PER_PARAM + r.batch_size * protocol.SEQ_LEN / params + 1e-9
    assert r.batch_size & (r.batch_size - 1) == 0 and r.batch_size <= protocol.MAX_BATCH
    # the largest batch that still gives MIN_STEPS steps (or batch 1)
    if r.batch_size < protocol.MAX_BATCH:
        assert math.ceil(r.tokens / (2 * r.batch_size * protocol.SEQ_LEN)) < protocol.MIN_STEPS
    assert r.steps >= protocol.MIN_STEPS or r.batch_size == 1
    assert r.warmup_steps == max(protocol.MIN_WARMUP, round(protocol.WARMUP_SHARE * r.steps))
    assert r.checkpoint_steps[0] == r.warmup_steps and r.checkpoint_steps[-1] == r.steps
    assert len(r.checkpoint_steps) == protocol.N_CHECKPOINTS
    assert r.eval_batches * r.batch_size * protocol.SEQ_LEN == protocol.EVAL_TOKENS
    with pytest.raises(ValueError, match="params"):
        protocol.regime(0)


def test_shape_params_match_the_resolved_config():
    point = protocol.shape_point(32, 2, head_dim=8, learning_rate=3e-3)
    runs = sweep.resolve(sweep.Sweep("t", sweep.cross([point], config="configs/tiny_relu.py")))
    (run,) = runs
    assert run.params == protocol.shape_params(32, 2, head_dim=8, d_ff=80) == 23_712
    t = run.config_dict["train"]
    assert t["learning_rate"] == 3e-3 and t["schedule"] == "constant"
    assert tuple(t["checkpoint_steps"]) == protocol.regime(run.params).checkpoint_steps


@pytest.mark.parametrize("name", FINDING_SWEEPS)
def test_finding_sweeps_follow_the_protocol(name):
    runs = sweep.resolve(sweep.load_sweep(REPO / "configs" / "sweeps" / f"{name}.py"))
    for run in runs:
        t = run.config_dict["train"]
        tokens = t["steps"] * t["batch_size"] * t["seq_len"]
        assert tokens / run.params >= 300, (run.name, tokens / run.params)
        assert len(t["checkpoint_steps"]) == protocol.N_CHECKPOINTS
    if name.endswith("_mup") or name.startswith(("gpu", "tpu")):  # µP, one LR for every shape
        models = [r.config_dict["model"] for r in runs]
        assert all(m["mup"] and m["dim_model_base"] > 0 for m in models)
        assert len({r.config_dict["train"]["learning_rate"] for r in runs}) == 1
        assert len({m["dim_model_base"] for m in models}) == 1
    if name.endswith("_mup"):
        assert all(r.config_dict["train"]["learning_rate"] == protocol.MUP_LEARNING_RATE for r in runs)
        for run in runs:
            t = run.config_dict["train"]
            assert t["steps"] * t["batch_size"] * t["seq_len"] / run.params >= protocol.LIMIT_TOKENS_PER_PARAM
    if name.endswith(("_scale", "_scale_mup")):  # a fixed width/depth and at least an 8× span of sizes
        sizes = sorted({r.params for r in runs})
        assert sizes[-1] / sizes[0] >= 8 and len({r.width / r.depth for r in runs}) == 1
    if name.startswith("cpu_width_depth"):
        ratios = sorted({r.width / r.depth for r in runs})
        assert ratios[0] <= 2 and ratios[-1] >= 48
    if name == "tpu_width_depth":  # straddles the paper's bottleneck (≈ 114) at ≈ 20M parameters
        ratios = sorted({r.width / r.depth for r in runs})
        assert ratios[0] < 114 / 4 and ratios[-1] > 114 * 4
        assert all(18e6 < r.params < 25e6 for r in runs)
    if name.startswith(("gpu", "tpu")):  # real text, not the embedded corpus
        assert {r.config_dict["data"]["source"] for r in runs} == {"tfds"}


@pytest.mark.parametrize("name,pilot", [("cpu_width_depth", "lr_pilot_width_depth"), ("cpu_scale", "lr_pilot_scale")])
def test_sweep_learning_rates_are_the_pilots_best(name, pilot):
    import importlib.util

    s = importlib.util.spec_from_file_location(name, REPO / "configs" / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    table = json.loads((REPO / "notebooks" / "results" / f"{pilot}.json").read_text())
    best = {}
    for row in table["rows"]:
        key = (row["d_model"], row["n_layers"])
        if key not in best or row["eval_loss"] < best[key][1]:
            best[key] = (row["lr"], row["eval_loss"])
    assert {k: v[0] for k, v in best.items()} == module.LR
    assert set(module.LR.values()) <= set(protocol.LR_CANDIDATES)
    if name == "cpu_width_depth":  # the activation sweep's shape (32×2) takes the same pilot's LR
        s = importlib.util.spec_from_file_location("acts", REPO / "configs" / "sweeps" / "cpu_activations.py")
        acts = importlib.util.module_from_spec(s)
        s.loader.exec_module(acts)
        assert acts.LEARNING_RATE == module.LR[acts.D_MODEL, acts.N_LAYERS]


def _best_lr_steps(rows, base):
    """Per width: the index, on the table's LR grid, of the LR of lowest held-out loss."""
    grid = sorted({r["lr"] for r in rows})
    best = {}
    for r in rows:
        if r["mup_base"] == base and (r["d_model"] not in best or r["eval_loss"] < best[r["d_model"]]["eval_loss"]):
            best[r["d_model"]] = r
    return {d: grid.index(r["lr"]) for d, r in sorted(best.items())}, grid


def test_learning_rate_transfers_under_mup_and_drifts_without_it():
    """The committed transfer table (benchmarks/lr_pilot.py, one schedule for every width): under
    µP the best LR of every width lies within one grid step of the others and of the protocol's
    one LR; under the standard parameterisation it falls as the width grows."""
    table = json.loads((REPO / "notebooks" / "results" / "lr_transfer.json").read_text())
    rows = table["rows"]
    widths = sorted({r["d_model"] for r in rows})
    assert len(widths) >= 3 and widths[-1] / widths[0] >= 8
    assert table["complete"] and len(rows) == len(widths) * len({r["lr"] for r in rows}) * len(table["mup_bases"])
    assert {r["warmup_steps"] for r in rows} == {table["warmup"]} and {r["steps"] for r in rows} == {table["steps"]}
    mup, grid = _best_lr_steps(rows, protocol.MUP_BASE)
    standard, _ = _best_lr_steps(rows, 0)
    assert set(mup) == set(standard) == set(widths)
    assert max(mup.values()) - min(mup.values()) <= 1, mup
    assert all(abs(i - grid.index(protocol.MUP_LEARNING_RATE)) <= 1 for i in mup.values()), mup
    steps = [standard[d] for d in widths]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1], standard


def _series(tokens, ratio):
    return protocol.plateau_verdict(tokens, ratio)


def test_plateau_flat_series_is_a_plateau_and_matches_scipy():
    rng = np.random.default_rng(0)
    tokens = np.geomspace(1e5, 8e6, 12)
    ratio = 0.08 + rng.normal(0, 0.0005, tokens.size)
    p = _series(tokens, ratio)
    window = tokens >= tokens[-1] / 10
    ref = stats.linregress(np.log10(tokens[window]), ratio[window])
    half = stats.t.ppf(0.95, window.sum() - 2) * ref.stderr  # the 90% interval (two one-sided 5% tests)
    assert p.verdict == protocol.PLATEAU
    assert p.n_points == window.sum() and p.level == pytest.approx(ratio[window].mean())
    assert p.slope == pytest.approx(ref.slope) and p.slope_ci == pytest.approx((ref.slope - half, ref.slope + half))
    assert -0.05 * p.level < p.slope_ci[0] and p.slope_ci[1] < 0.05 * p.level


def test_plateau_small_but_significant_drift_is_still_a_plateau():
    """Equivalence, not significance: a precisely measured drift of 1% of the level per decade
    excludes 0 but lies inside the 5% margin, so the run has plateaued."""
    tokens = np.geomspace(1e5, 8e6, 12)
    ratio = 0.1 - 0.001 * np.log10(tokens / 1e5) + np.random.default_rng(4).normal(0, 1e-5, tokens.size)
    p = _series(tokens, ratio)
    assert p.slope_ci[1] < 0 and p.verdict == protocol.PLATEAU


def test_plateau_false_alarm_rate_on_flat_series_is_far_below_five_percent():
    """Flat series with noise well inside the margin pass (almost) always: 200 seeds, at most 2 fail
    (an "interval includes 0" rule fails 5% of them, ~10)."""
    tokens = np.geomspace(1e5, 8e6, 12)
    verdicts = [_series(tokens, 0.1 + np.random.default_rng(s).normal(0, 0.0005, tokens.size)).verdict
                for s in range(200)]
    assert verdicts.count(protocol.PLATEAU) >= 198


def test_plateau_still_falling_is_limit_not_reached():
    tokens = np.geomspace(1e5, 8e6, 12)
    ratio = 0.05 + 0.3 * (tokens / 1e5) ** -0.5  # a power law still 13% above its limit at the end
    p = _series(tokens, ratio + np.random.default_rng(1).normal(0, 1e-4, tokens.size))
    assert p.verdict == protocol.MOVING and p.slope < 0 and p.slope_ci[1] < -0.05 * p.level
    assert p.change > protocol.PLATEAU_MAX_CHANGE


def test_plateau_noisy_or_short_series_is_undetermined():
    tokens = np.geomspace(1e5, 8e6, 12)
    noisy = 0.1 + np.random.default_rng(2).normal(0, 0.03, tokens.size)
    p = _series(tokens, noisy)
    assert p.slope_ci[0] < -0.05 * p.level or p.slope_ci[1] > 0.05 * p.level, "this seed must straddle the margin"
    assert p.verdict == protocol.UNDETERMINED
    short = _series([1e6, 2e6, 4e6], [0.1, 0.1, 0.1])
    assert short.verdict == protocol.UNDETERMINED and short.n_points == 3
    assert not protocol.finding_testable([short]) and not protocol.finding_testable([])
    assert protocol.finding_testable([_series(tokens, 0.1 + np.random.default_rng(3).normal(0, 1e-4, tokens.size))])
    with pytest.raises(ValueError, match="no finite points"):
        _series([np.nan], [0.1])
