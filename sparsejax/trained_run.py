"""A trained run, read: its config, its finished checkpoint steps, and parameters per step.

Read-only by construction (``checkpointing.CheckpointReader``): nothing in the run directory is
created, cleaned up or deleted, so a run can be read while its trainer is still writing. The
parameters are restored alone (orbax partial restore), without building an optimizer or a train
step. The directory's layout is :mod:`sparsejax.rundir`'s.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import jax

from sparsejax import checkpointing, config as config_lib, model as model_lib, rundir, sharding
from sparsejax import configure


class RunError(ValueError):
    """The run directory cannot be read: missing, not a run, or a step that does not restore."""


class StepVanished(RunError):
    """A step was deleted while it was being read: a live trainer's cleanup (``train.keep_last``)."""

    def __init__(self, step: int, directory):
        super().__init__(f"checkpoint step {step} in {directory} was deleted while it was being read "
                         f"(the run's trainer keeps only its newest train.keep_last steps)")
        self.step = step


@dataclasses.dataclass
class TrainedRun:
    workdir: pathlib.Path
    cfg: config_lib.Config
    reader: checkpointing.CheckpointReader
    steps: list[int]

    _step_cfgs: dict = dataclasses.field(default_factory=dict)
    _abstracts: dict = dataclasses.field(default_factory=dict)

    @property
    def warmup_steps(self) -> int:
        """Checkpoints at or before this step are warm-up (left out of CETT-PPL)."""
        return self.cfg.train.warmup_steps

    def step_config(self, step: int) -> config_lib.Config:
        """The config ``step`` was trained with, as evaluation reads it: the model and sparsity
        settings of that checkpoint's own meta (a ``--force`` restart may have changed them after
        it was written), the run's layout (``model.scan_layers``), data, batch and mesh. The
        run's config when the meta holds none or cannot be read."""
        if step not in self._step_cfgs:
            cfg = self.cfg
            try:
                raw = self.reader.meta(step).get("config")
            except Exception:  # unreadable meta: the restore reports the step
                raw = None
            if isinstance(raw, dict):
                try:
                    own = configure.from_dict(raw)
                except (TypeError, KeyError, ValueError, config_lib.ConfigError) as err:
                    raise RunError(f"checkpoint step {step} in {self.reader.directory}: its "
                                   f"config is not valid here ({err})") from None
                cfg = dataclasses.replace(
                    cfg, sparsity=own.sparsity,
                    model=dataclasses.replace(own.model, scan_layers=cfg.model.scan_layers))
            self._step_cfgs[step] = (cfg, bool((raw or {}).get("model", {}).get(
                "scan_layers", cfg.model.scan_layers)))
        return self._step_cfgs[step][0]

    def _abstract(self, model_cfg, mesh):
        key = (repr(model_cfg), id(mesh))
        if key not in self._abstracts:
            self._abstracts[key] = model_lib.abstract_params(
                model_cfg, self.cfg.train.seq_len, sharding.ShardingPlan(mesh, self.cfg.mesh))
        return self._abstracts[key]

    def params(self, step: int, mesh: jax.sharding.Mesh) -> tuple[Any, dict]:
        """(params, meta) of one step, sharded over ``mesh`` by the run's logical-axis rules, in
        the shapes of the step's own model (:meth:`step_config`).

        A checkpoint written with the other ``model.scan_layers`` layout (its own config, kept in
        its meta, says which) is read in that layout and converted to this config's.
        """
        cfg = self.step_config(step)
        stored_scan = self._step_cfgs[step][1]
        want_scan = cfg.model.scan_layers
        target = self._abstract(cfg.model, mesh)
        abstract = target
        if stored_scan != want_scan:
            abstract = self._abstract(dataclasses.replace(cfg.model, scan_layers=stored_scan), mesh)
        try:
            params, meta = self.reader.restore_params(step, abstract)
        except Exception as err:  # orbax raises many types for damaged or mismatched files
            if _vanishing(self.reader.directory / str(step)):
                raise StepVanished(step, self.reader.directory) from None
            first = (str(err).strip().splitlines() or [""])[0][:240]
            raise RunError(f"checkpoint step {step} in {self.reader.directory} cannot be restored: "
                           f"its files are damaged, or they do not match this run's config "
                           f"(model.scan_layers={want_scan}, checkpoint's {stored_scan}); "
                           f"{type(err).__name__}: {first}") from None
        bad = checkpointing.non_finite_leaf(params)
        if bad is not None:
            raise RunError(f"checkpoint step {step} in {self.reader.directory}: parameter {bad} "
                           f"holds non-finite values (NaN or infinity); evaluate other steps "
                           f"with --checkpoints")
        if stored_scan != want_scan:
            params = jax.device_put(
                model_lib.convert_layout(params, cfg.model.n_layers, want_scan),
                jax.tree.map(lambda a: a.sharding, target))
        return params, meta


def _vanishing(step_dir, wait_s: float = 1.0) -> bool:
    """True if ``step_dir`` is gone, now or within ``wait_s`` (a trainer's cleanup that was
    deleting it while it was read: the read fails on missing files before the directory goes)."""
    import time

    deadline = time.monotonic() + wait_s
    while step_dir.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _config(run: rundir.RunDir) -> config_lib.Config:
    """The run's config, by the one rule (``checkpointing.read_run_config``): its newest
    readable checkpoint's copy, else ``config.json``."""
    try:
        raw, source = checkpointing.read_run_config(run)
    except checkpointing.RunConfigError as err:
        raise RunError(str(err)) from None
    if raw is None:
        raise RunError(f"{run.root} has no config.json: not a run directory written by train.py")
    try:
        return configure.from_dict(raw)
    except (TypeError, KeyError, ValueError, config_lib.ConfigError) as err:
        raise RunError(f"{source} is not a valid sparsejax config ({err})") from None


def load(workdir: str | pathlib.Path) -> TrainedRun:
    """The run in ``workdir``; RunError (naming what is missing) if it is not a trained run."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise RunError(f"--workdir {workdir} does not exist or is not a directory")
    run = rundir.RunDir(workdir)
    ckpt_dir = run.checkpoints
    cfg = _config(run)
    if not ckpt_dir.is_dir():
        raise RunError(f"{workdir} has no checkpoints/ directory: nothing to evaluate")
    reader = checkpointing.CheckpointReader(ckpt_dir)
    steps = reader.all_steps()
    if not steps:
        raise RunError(f"{ckpt_dir} holds no finished checkpoint")
    return TrainedRun(workdir, cfg, reader, steps)


def select_steps(available: Sequence[int], spec: str) -> list[int]:
    """``all``, ``last`` or a comma-separated list of steps that must all exist."""
    available = sorted(available)
    if spec == "all":
        return available
    if spec == "last":
        return available[-1:]
    try:
        wanted = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise RunError(f"--checkpoints={spec!r}: use all, last or comma-separated step numbers") from None
    missing = [s for s in wanted if s not in available]
    if missing or not wanted:
        raise RunError(f"--checkpoints: steps {missing or spec!r} not found; available: {available}")
    return wanted
