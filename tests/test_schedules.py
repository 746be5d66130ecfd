"""Schedules vs hand-computed values at boundaries and midpoints, traced and untraced."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import schedules
from sparsejax.schedules import Schedule, ScheduleError


def _prosparse(t, T, lam):
    """The ProSparse stage formula written out independently (stage i: T[i-1] < t <= T[i])."""
    if t <= T[0]:
        return lam[0]
    for i in range(1, len(T)):
        if t <= T[i]:
            eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (t - T[i - 1]) / (T[i] - T[i - 1])) + 1)
            return lam[i - 1] + eta * (lam[i] - lam[i - 1])
    return lam[-1]


def test_sine_stages_match_the_prosparse_formula_everywhere():
    T, lam = (100, 300, 400), (0.0, 1e-5, 5e-5)
    s = schedules.validate(Schedule("sine_stages", lam, T))
    steps = np.arange(0, 500)
    got = jax.jit(jax.vmap(lambda t: schedules.value(s, t)))(jnp.asarray(steps))
    want = np.array([_prosparse(int(t), T, lam) for t in steps])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-12)
    # boundaries and midpoints by hand: flat ends, half-way at the middle of each stage
    assert float(schedules.value(s, 100)) == 0.0
    assert math.isclose(float(schedules.value(s, 200)), 0.5e-5, rel_tol=1e-5)
    assert math.isclose(float(schedules.value(s, 300)), 1e-5, rel_tol=1e-6)
    assert math.isclose(float(schedules.value(s, 350)), 3e-5, rel_tol=1e-5)
    assert math.isclose(float(schedules.value(s, 10_000)), 5e-5, rel_tol=1e-6)


@pytest.mark.parametrize("kind,values,bounds,checks", [
    ("constant", (0.25,), (), {0: 0.25, 10**6: 0.25}),
    ("piecewise", (0.0, 0.01, 0.02), (0, 50, 80), {0: 0.0, 49: 0.0, 50: 0.01, 79: 0.01, 80: 0.02, 999: 0.02}),
    ("linear", (320.0, 96.0), (10, 110), {0: 320.0, 10: 320.0, 60: 208.0, 110: 96.0, 500: 96.0}),
])
def test_other_kinds_by_hand(kind, values, bounds, checks):
    s = schedules.validate(Schedule(kind, values, bounds))
    for t, want in checks.items():
        assert math.isclose(float(schedules.value(s, t)), want, rel_tol=1e-6, abs_tol=1e-9), (t, want)


@pytest.mark.parametrize("bad,match", [
    (Schedule("cosine", (1.0,), ()), r"sparsity.l1.kind='cosine'.*allowed values"),
    (Schedule("constant", (1.0, 2.0), ()), "one value and no boundaries"),
    (Schedule("linear", (1.0, 2.0), (10,)), "one value per boundary"),
    (Schedule("linear", (1.0, 2.0), (20, 10)), "strictly increasing"),
    (Schedule("piecewise", (float("nan"),), (0,)), "finite"),
])
def test_malformed_schedules_name_the_field(bad, match):
    with pytest.raises(ScheduleError, match=match):
        schedules.validate(bad, "sparsity.l1")


def test_a_recipe_evaluates_its_schedules_in_graph_by_hand():
    """SparsityPlan.coefficients at boundaries and midpoints; top-k values become neuron counts by
    the one fraction -> k rule (float64, on the host) and k is interpolated in counts, rounded."""
    from sparsejax import config, configure
    from sparsejax.sparsity_plan import SparsityPlan

    cfg = configure.apply_overrides(config.proxy_config("tiny"), [  # d_ff = 320
        "sparsity.topk.kind=linear", "sparsity.topk.values=0,0.9,32", "sparsity.topk.boundaries=10,20,30",
        "sparsity.l1.kind=sine_stages", "sparsity.l1.values=0,1e-4,3e-4", "sparsity.l1.boundaries=0,100,200"])
    r = SparsityPlan.of(cfg)
    # 0 -> dense 320; 0.9 -> 320 - int(320 * 0.09999999999999998) = 289 (not round(288.0))
    assert r.traced["topk"].values == (320.0, 289.0, 32.0)
    at = jax.jit(lambda t: r.coefficients(t))
    want_k = {1: 320, 10: 320, 15: 304, 20: 289, 25: 160, 30: 32, 10**6: 32}  # 304.5 -> 304 (even)
    for t, k in want_k.items():
        got = at(jnp.int32(t))
        assert int(got["topk"]) == k and got["topk"].dtype == jnp.int32, (t, int(got["topk"]))
    assert float(at(jnp.int32(50))["l1"]) == pytest.approx(0.5e-4, rel=1e-5)  # stage 1 midpoint
    assert float(at(jnp.int32(150))["l1"]) == pytest.approx(2e-4, rel=1e-5)  # stage 2 midpoint
    assert float(at(jnp.int32(100))["l1"]) == pytest.approx(1e-4, rel=1e-6)  # boundary
    assert SparsityPlan.of(config.proxy_config("tiny")).traced == {}  # defaults: all off
    # A constant is a static control, compiled in: no coefficient, the lax.top_k path.
    static = SparsityPlan.of(configure.apply_overrides(config.proxy_config("tiny"), [
        "sparsity.topk=0.9", "model.activation=fatrelu", "sparsity.activation_threshold=0.01"]))
    assert static.traced == {} and static.topk_k == 289 and static.threshold == 0.01
    assert static.model_input().topk_k == 289 and static.model_input().threshold == 0.01


def test_schedules_are_set_from_the_command_line():
    from sparsejax import config, configure

    cfg = configure.apply_overrides(config.proxy_config("tiny"), [
        "sparsity.chunk.kind=piecewise", "sparsity.chunk.values=0, 0.1", "sparsity.chunk.boundaries=0,5e1"])
    assert cfg.sparsity.chunk == Schedule("piecewise", (0.0, 0.1), (0, 50))
    assert config.proxy_config("tiny").sparsity.chunk == Schedule()  # the base is untouched
    with pytest.raises(config.ConfigError, match=r"sparsity.chunk.boundaries='2.5': expected an int"):
        configure.apply_overrides(config.proxy_config("tiny"), ["sparsity.chunk.boundaries=2.5"])
