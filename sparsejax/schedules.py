"""Staged schedules of a training-time coefficient (an L1 weight, a top-k k, a FAT threshold).

A schedule maps the step t (1-based, the step being trained) to a value, in-graph: ``value(s, t)``
works on a traced ``t``, so a stage change never recompiles and a resumed run continues the
schedule exactly (the schedule is part of the config). Kinds:

* ``constant``: ``values[0]`` at every step.
* ``piecewise``: ``values[i]`` from step ``boundaries[i]`` on (``values[0]`` before it).
* ``linear``: ``values[i]`` at step ``boundaries[i]``, linear in between; ``values[0]`` before
  the first boundary, ``values[-1]`` after the last.
* ``sine_stages``: ProSparse's progressive schedule (Song et al. 2024, "ProSparse"). With
  boundaries ``T_0 < T_1 < … < T_n`` and values ``λ_0, …, λ_n``, within stage i
  (``T_{i−1} < t ≤ T_i``): ``η = ½[sin(−π/2 + π(t − T_{i−1}) / (T_i − T_{i−1})) + 1]`` and
  ``λ = λ_{i−1} + η(λ_i − λ_{i−1})``, an S-curve flat at both ends, so the coefficient never
  jumps; ``λ_0`` before ``T_0`` (usually 0) and ``λ_n`` after ``T_n``.

``values`` and ``boundaries`` have the same length (a constant: one value, no boundaries).
"""

from __future__ import annotations

import dataclasses
import math

KINDS = ("constant", "piecewise", "linear", "sine_stages")


@dataclasses.dataclass(frozen=True)
class Schedule:
    kind: str = "constant"
    values: tuple[float, ...] = (0.0,)
    boundaries: tuple[int, ...] = ()


class ScheduleError(ValueError):
    pass


def is_default(s: Schedule) -> bool:
    """The default schedule (constant 0): the sparsity term it drives is off, not merely zero."""
    return s == Schedule()


def validate(s: Schedule, field: str = "schedule") -> Schedule:
    """Raise ScheduleError naming ``field`` when the schedule is malformed; return it unchanged."""
    if s.kind not in KINDS:
        raise ScheduleError(f"{field}.kind={s.kind!r} is not allowed; allowed values: {list(KINDS)}")
    values, bounds = tuple(s.values), tuple(s.boundaries)
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ScheduleError(f"{field}.values={values!r} must be one or more finite numbers")
    if any(int(b) != b or b < 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ScheduleError(f"{field}.boundaries={bounds!r} must be strictly increasing steps >= 0")
    if s.kind == "constant":
        if len(values) != 1 or bounds:
            raise ScheduleError(f"{field}: a constant schedule has one value and no boundaries "
                                f"(got values={values!r}, boundaries={bounds!r})")
    elif len(values) != len(bounds) or not bounds:
        raise ScheduleError(f"{field}: a {s.kind} schedule needs one value per boundary and at "
                            f"least one (got values={values!r}, boundaries={bounds!r})")
    return s


def value(s: Schedule, step):
    """The schedule's value at ``step`` (a Python int or a traced integer scalar), float32."""
    import jax.numpy as jnp  # noqa: PLC0415 - lazy: config files hold Schedules and load without JAX

    t = jnp.asarray(step, jnp.float32)
    v = jnp.asarray(s.values, jnp.float32)
    if s.kind == "constant":
        return v[0]
    b = jnp.asarray(s.boundaries, jnp.float32)
    n = len(s.boundaries)
    if s.kind == "piecewise":
        return v[jnp.clip(jnp.sum(t >= b) - 1, 0, n - 1)]
    seg = jnp.sum(t > b)  # t in (b[seg-1], b[seg]]; 0: at or before b[0]; n: after b[-1]
    i = jnp.clip(seg, 1, max(n - 1, 1))  # the interpolated segment (b[i-1], b[i]]
    lo, hi = b[i - 1], b[jnp.minimum(i, n - 1)]
    frac = jnp.clip((t - lo) / jnp.maximum(hi - lo, 1.0), 0.0, 1.0)
    if s.kind == "sine_stages":
        frac = 0.5 * (jnp.sin(-jnp.pi / 2 + jnp.pi * frac) + 1.0)
    inside = v[i - 1] + frac * (v[jnp.minimum(i, n - 1)] - v[i - 1])
    return jnp.where(seg == 0, v[0], jnp.where(seg >= n, v[n - 1], inside))
