"""Warm start: a fresh run's parameters from another run's checkpoint (``train.warm_start``).

ProSparse's activation substitution (docs/recipes.md) starts a ReLU-family run from a SiLU/GELU
run's weights: same shapes, another activation. Only the parameters are taken; the optimizer
state and the step start fresh, as a new run's. The source may have the other layer layout
(``model.scan_layers``): its parameters are converted (``model.convert_layout``).

Everything that can be wrong is found by :func:`plan`, from the source's config and shapes alone
(nothing is read but metadata, nothing is written), so ``train.py`` refuses a bad warm start
with a one-line error and exit 2 before it creates the workdir; :func:`load` then reads the arrays,
also before the workdir is created (a damaged source is the same one-line error, nothing written).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from sparsejax import (checkpointing, config as config_lib, model as model_lib, rundir, sharding,
                       storage)
from sparsejax import configure
from sparsejax.config import ConfigError


@dataclasses.dataclass
class WarmStart:
    directory: Any  # the source's checkpoints/ directory
    step: int
    source_cfg: config_lib.Config
    source_abstract: Any  # the source's parameter shapes/shardings, in its own layout


def _checkpoints_dir(text: str):
    path = storage.path(text)
    for candidate in (rundir.RunDir(path).checkpoints, path):
        if candidate.is_dir() and checkpointing.finished_steps(candidate):
            return candidate
    raise ConfigError(f"train.warm_start={text!r} holds no finished checkpoint (give a run "
                      f"directory written by train.py, or its {rundir.CHECKPOINTS}/ directory)")


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _shapes(tree) -> dict[str, tuple]:
    return {_path_name(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def compare(source: dict[str, tuple], target: dict[str, tuple], where: str) -> None:
    """ConfigError naming the first parameter whose shape differs, or that one side lacks."""
    for name in sorted(set(source) | set(target)):
        if name not in source:
            raise ConfigError(f"{where}: parameter {name} {target[name]} of this config is not in "
                              f"the checkpoint")
        if name not in target:
            raise ConfigError(f"{where}: checkpoint parameter {name} {source[name]} is not in "
                              f"this config")
        if source[name] != target[name]:
            raise ConfigError(f"{where}: parameter {name} has shape {source[name]} in the "
                              f"checkpoint but {target[name]} in this config")


def plan(cfg: config_lib.Config, mesh: jax.sharding.Mesh) -> WarmStart | None:
    """Check ``train.warm_start`` against ``cfg`` (shapes only); None when it is off."""
    text = cfg.train.warm_start
    if not text:
        return None
    directory = _checkpoints_dir(text)
    reader = checkpointing.CheckpointReader(directory)
    try:
        step = reader.all_steps()[-1]
        where = f"train.warm_start={text!r} (step {step})"
        try:
            raw = reader.meta(step).get("config")
        except Exception as err:  # orbax raises many types for damaged files
            raise _unreadable(where, directory, step, err) from None
    finally:
        reader.close()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the checkpoint's meta holds no config")
    try:
        source_cfg = configure.from_dict(raw)
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: the checkpoint's config is not valid here ({err})") from None
    seq_len, shards = cfg.train.seq_len, sharding.ShardingPlan(mesh, cfg.mesh)
    source_abstract = model_lib.abstract_params(source_cfg.model, seq_len, shards)
    n_src = source_cfg.model.n_layers
    converted = jax.eval_shape(
        lambda p: model_lib.convert_layout(p, n_src, cfg.model.scan_layers), source_abstract)
    target = model_lib.abstract_params(cfg.model, seq_len, shards)
    compare(_shapes(converted), _shapes(target), where)
    return WarmStart(directory, step, source_cfg, source_abstract)


def _unreadable(where: str, directory, step: int, err: BaseException) -> ConfigError:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return ConfigError(f"{where}: the checkpoint cannot be read, its files are damaged "
                       f"({type(err).__name__}: {first}); move {directory / str(step)} aside to "
                       f"start from the step before it, or warm-start from another run")


def load(warm: WarmStart, cfg: config_lib.Config, param_shardings: Any) -> Any:
    """The source's parameters in ``cfg``'s layout, placed with ``param_shardings``.
    ConfigError (one line) if the source's files cannot be read."""
    reader = checkpointing.CheckpointReader(warm.directory)
    try:
        params, _ = reader.restore_params(warm.step, warm.source_abstract)
    except Exception as err:  # orbax raises many types for damaged files
        where = f"train.warm_start={cfg.train.warm_start!r} (step {warm.step})"
        raise _unreadable(where, warm.directory, warm.step, err) from None
    finally:
        reader.close()
    bad = checkpointing.non_finite_leaf(params)
    if bad is not None:
        raise ConfigError(f"train.warm_start={cfg.train.warm_start!r} (step {warm.step}): "
                          f"parameter {bad} holds non-finite values (NaN or infinity); warm-start "
                          f"from an earlier step or another run")
    params = model_lib.convert_layout(params, warm.source_cfg.model.n_layers, cfg.model.scan_layers)
    return jax.device_put(params, param_shardings)
