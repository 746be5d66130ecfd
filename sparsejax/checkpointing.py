"""Orbax checkpoints of the train state plus the data-iterator position and the run's config.

Each step directory holds two items: ``state`` (params, optimizer state, step; sharded arrays)
and ``meta`` (JSON: data-iterator state, tokens seen, RNG seed and the run's config, so a run's
identity travels with its checkpoints even if ``config.json`` is lost).

Two views of one ``checkpoints/`` directory:

* :class:`Checkpointer` is the trainer's. Saves are asynchronous; orbax writes to a temporary
  directory and renames it when complete, so a crash mid-save leaves no half-written step that
  looks finished. A save orbax declines, or one that fails in the background, raises
  :class:`CheckpointError` naming the step. On restore, a step that cannot be read, or whose
  parameters are not finite, is moved to ``rejected/`` (named in a warning) and the previous
  step is tried, so the step is written again when training reaches it.
* :class:`CheckpointReader` is evaluation's: read-only (it never cleans up temporary directories
  of a trainer that is still writing, never creates or deletes anything) and it restores the
  parameters alone, without building an optimizer.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sparsejax import rundir, storage

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


def all_finite(tree: Any) -> bool:
    """True when every floating-point leaf of ``tree`` is finite (reduced on device)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return True
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


def non_finite_leaf(tree: Any) -> str | None:
    """The path (``params/layer_0/ffn/w_in``) of the first floating-point leaf of ``tree``
    holding a NaN or infinity, or None when all are finite. Every reader of parameters (eval of
    a run, warm start, Hugging Face import) refuses such a tree naming this leaf."""
    import numpy as np

    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            continue
        finite = (bool(jnp.all(jnp.isfinite(leaf))) if isinstance(leaf, jax.Array)
                  else bool(np.all(np.isfinite(np.asarray(leaf, np.float32)))))
        if not finite:
            return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return None


# A checkpoint step's orbax items: the train state (params, opt_state, step) and its JSON meta.
ITEMS = ("state", "meta")

# The part of an I/O error a user can act on, when orbax buries it in a long message.
_CAUSES = ("No space left on device", "File too large", "Disk quota exceeded",
           "Read-only file system", "Permission denied", "Too many open files")


def _describe(err: BaseException) -> str:
    text = str(err)
    for cause in _CAUSES:
        if cause.lower() in text.lower():
            return cause
    first = text.strip().splitlines()
    return f"{type(err).__name__}: {first[0][:200] if first else ''}"


def finished_steps(directory: pathlib.Path) -> list[int]:
    """Steps whose directories orbax has finalized (renamed from their temporary name)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


class Checkpointer:
    """The writer's view (hold the run's :class:`~sparsejax.rundir.RunLock` while using it)."""

    def __init__(self, directory: str | pathlib.Path, *, keep_last: int, keep_every: int,
                 keep_steps: tuple[int, ...] = ()):
        """Keeps the newest ``keep_last`` steps, every multiple of ``keep_every`` and ``keep_steps``."""
        self.directory = storage.path(directory)  # local, or gs:// (orbax writes it natively)
        if keep_steps:
            from orbax.checkpoint import checkpoint_managers as policies

            keep = dict(preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(keep_last), policies.EveryNSteps(keep_every),
                policies.CustomSteps(sorted(set(keep_steps)))]))
        else:
            keep = dict(max_to_keep=keep_last, keep_period=keep_every)
        self._options = ocp.CheckpointManagerOptions(
            **keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options,
                                              item_names=ITEMS)
        self.in_flight: int | None = None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an asynchronous save of ``step``; raises CheckpointError if orbax declines it."""
        self.check_for_errors()
        if self.in_flight is None:
            self.in_flight = step
        try:
            # orbax first waits for the previous asynchronous save: an error raised here is
            # usually that one's (``in_flight``), so the step is updated only afterwards.
            saved = self._manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as err:
            raise self._failed(err) from err
        self.in_flight = step
        if not saved:
            raise CheckpointError(
                f"orbax declined to save step {step} in {self.directory} (existing steps: "
                f"{self.all_steps()[-3:]}); the directory holds a newer or equal step")

    def _failed(self, err: BaseException) -> CheckpointError:
        step = f" of step {self.in_flight}" if self.in_flight is not None else ""
        return CheckpointError(f"the checkpoint{step} could not be written to {self.directory} "
                               f"({_describe(err)})")

    def check_for_errors(self) -> None:
        """Raise CheckpointError if a background save has failed (e.g. the disk is full)."""
        try:
            self._manager.check_for_errors()
        except Exception as err:
            raise self._failed(err) from err

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise self._failed(err) from err

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of one step; raises whatever orbax raises for a damaged step."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest good step, or None if there is none.

        Newer steps that fail to restore or hold non-finite parameters are moved to
        ``<workdir>/rejected/`` with a warning, so that training writes those steps again.
        """
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state)
                reason = None if all_finite(state["params"]) else "its parameters are not finite"
            except Exception as err:  # orbax raises many types for damaged files
                reason = f"it cannot be restored ({_describe(err)})"
            if reason is None:
                return step, state, meta
            self._reject(step, reason)
        return None

    def _reject(self, step: int, reason: str) -> None:
        self.close()  # the manager caches its step list; reopen it after the move
        where = rundir.move_aside(self.directory / str(step),
                                  rundir.RunDir(self.directory.parent).rejected)
        log.warning("checkpoint step %d rejected: %s; moved to %s", step, reason, where)
        print(f"WARNING: checkpoint step {step} rejected, {reason}; moved to {where}", flush=True)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options,
                                              item_names=ITEMS)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _listing_retried(list_steps: Callable[[], Any], attempts: int = 5) -> Any:
    """``list_steps()`` again when a step vanished while orbax was listing the directory: a live
    trainer's keep_last cleanup deletes old steps at any moment (orbax stats each step it lists)."""
    for attempt in range(attempts):
        try:
            return list_steps()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


class CheckpointReader:
    """Read-only access to a run's checkpoints: safe while a trainer is writing the same run."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = storage.path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} does not exist")
        # orbax warns that a read-only manager is read-only (twice): that is the point here.
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, cleanup_tmp_directories=False,
                enable_async_checkpointing=False)
            self._manager = _listing_retried(lambda: ocp.CheckpointManager(
                self.directory, options=options, item_names=ITEMS))
        finally:
            absl_log.setLevel(level)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def refresh(self) -> list[int]:
        """The finished steps now (a live trainer adds new ones and deletes old ones)."""
        _listing_retried(self._manager.reload)
        return self.all_steps()

    def meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_params(self, step: int, abstract_params: Any) -> tuple[Any, dict]:
        """(params, meta) of one step; ``abstract_params`` carries shapes, dtypes and shardings.

        Only the ``params`` subtree is read (orbax partial restore): no optimizer is needed.
        """
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                                    abstract_params)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                         restore_args={"params": restore_args}, partial_restore=True),
            meta=ocp.args.JsonRestore()))
        return restored["state"]["params"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()


def meta_from_checkpoints(directory: str | pathlib.Path) -> dict | None:
    """The meta of the newest step whose meta can be read and holds a config (read-only), or
    None."""
    directory = storage.path(directory)
    if not directory.is_dir():
        return None
    reader = CheckpointReader(directory)
    try:
        for step in reversed(reader.all_steps()):
            try:
                meta = reader.meta(step)
            except Exception:  # a damaged step: try the one before
                continue
            if isinstance(meta.get("config"), dict):
                return meta
    finally:
        reader.close()
    return None


def config_from_checkpoints(directory: str | pathlib.Path) -> dict | None:
    """The config stored in the newest step whose meta can be read (read-only), or None."""
    meta = meta_from_checkpoints(directory)
    return None if meta is None else meta["config"]


class RunConfigError(ValueError):
    """A run's ``config.json`` is the config to read and is not a JSON object."""


def read_run_config(run: rundir.RunDir) -> tuple[dict | None, str]:
    """A run's config as saved, by the one precedence rule every reader uses: the config stored
    in its newest readable checkpoint (what that step was trained as, so a deleted, damaged or
    edited ``config.json`` cannot change how a checkpoint is resumed or read), else
    ``config.json`` (a run without checkpoints yet).

    Returns ``(raw dict, where it came from)``, or ``(None, "")`` when the run has neither;
    RunConfigError when ``config.json`` is the source and not a JSON object.
    """
    raw = config_from_checkpoints(run.checkpoints)
    if raw is not None:
        return raw, f"the checkpoints' meta in {run.checkpoints}"
    path = run.config
    if not path.is_file():
        return None, ""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunConfigError(f"{path} is not valid JSON ({type(err).__name__}: "
                             f"{(str(err).splitlines() or [''])[0]})") from None
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path} is not valid JSON for a config: expected an object, got "
                             f"{type(raw).__name__}")
    return raw, str(path)
