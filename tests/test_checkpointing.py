"""sparsejax.checkpointing on real orbax directories: round trip, retention, rejection of
non-finite steps, the read-only reader and the config stored in the checkpoints."""

from __future__ import annotations

import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import checkpointing


def _state(value: float) -> dict:
    return {"params": {"w": jnp.full((4, 3), value, jnp.float32), "b": jnp.arange(3.0) + value},
            "opt": {"mu": jnp.full((4, 3), -value, jnp.float32)}}


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _listing(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _write(directory, steps, *, keep_last=10, keep_every=None, values=None):
    ckpt = checkpointing.Checkpointer(directory, keep_last=keep_last, keep_every=keep_every)
    try:
        for step in steps:
            value = float(step) if values is None else values[step]
            ckpt.save(step, _state(value), {"step": step, "config": {"name": f"c{step}"}})
        ckpt.wait()
    finally:
        ckpt.close()


def test_round_trip_and_retention(tmp_path):
    directory = tmp_path / "checkpoints"
    _write(directory, [10, 20, 30, 40], keep_last=2, keep_every=20)
    ckpt = checkpointing.Checkpointer(directory, keep_last=2, keep_every=20)
    try:
        assert ckpt.all_steps() == [20, 30, 40]  # last two, plus every multiple of 20
        state, meta = ckpt.restore(40, _abstract(_state(0.0)))
        chex.assert_trees_all_equal(jax.device_get(state), _state(40.0))
        assert meta == {"step": 40, "config": {"name": "c40"}}
    finally:
        ckpt.close()
    assert checkpointing.finished_steps(directory) == [20, 30, 40]


def test_restore_latest_moves_non_finite_steps_aside(tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    _write(directory, [1, 2], values={1: 1.0, 2: float("nan")})
    ckpt = checkpointing.Checkpointer(directory, keep_last=10, keep_every=None)
    try:
        step, state, _ = ckpt.restore_latest(_abstract(_state(0.0)))
        assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0
        assert ckpt.all_steps() == [1]
    finally:
        ckpt.close()
    rejected = list((tmp_path / "rejected").iterdir())
    assert len(rejected) == 1 and rejected[0].name.startswith("2.")
    assert "checkpoint step 2 rejected, its parameters are not finite" in capsys.readouterr().out


def test_restore_latest_of_an_empty_directory_is_none(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", keep_last=1, keep_every=None)
    try:
        assert ckpt.restore_latest(_abstract(_state(0.0))) is None
    finally:
        ckpt.close()


def test_reader_restores_params_alone_and_writes_nothing(tmp_path):
    directory = tmp_path / "checkpoints"
    _write(directory, [5, 6])
    # A trainer's save in progress: orbax's temporary directory must be left alone.
    tmp_step = directory / "7.orbax-checkpoint-tmp-123"
    tmp_step.mkdir()
    before = _listing(tmp_path)
    reader = checkpointing.CheckpointReader(directory)
    try:
        assert reader.all_steps() == [5, 6]
        params, meta = reader.restore_params(6, _abstract(_state(0.0)["params"]))
        assert set(params) == {"w", "b"}  # no optimizer state was needed or read
        np.testing.assert_array_equal(np.asarray(params["b"]), np.arange(3.0) + 6.0)
        assert meta["step"] == 6 and reader.meta(5)["config"] == {"name": "c5"}
    finally:
        reader.close()
    assert _listing(tmp_path) == before
    assert checkpointing.finished_steps(directory) == [5, 6]


def test_reader_of_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
        checkpointing.CheckpointReader(tmp_path / "nope")


def test_config_from_checkpoints_skips_a_step_whose_meta_is_damaged(tmp_path):
    directory = tmp_path / "checkpoints"
    assert checkpointing.config_from_checkpoints(directory) is None
    _write(directory, [1, 2])
    assert checkpointing.config_from_checkpoints(directory) == {"name": "c2"}
    for path in (directory / "2" / "meta").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\\x00garbage")
    assert checkpointing.config_from_checkpoints(directory) == {"name": "c1"}


def test_all_finite():
    assert checkpointing.all_finite(_state(1.0))
    assert not checkpointing.all_finite({"a": jnp.array([1.0, jnp.inf])})
    assert checkpointing.all_finite({"i": jnp.array([1, 2], jnp.int32)})
