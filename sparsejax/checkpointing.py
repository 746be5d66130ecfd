"""Orbax checkpoints of the train state plus the data-iterator position, with safe restore.

Each step directory holds two items: ``state`` (params, optimizer state, step; sharded arrays)
and ``meta`` (JSON: data-iterator state, tokens seen, RNG seed). Saves are asynchronous; orbax
writes to a temporary directory and renames it when complete, so a crash mid-save leaves no
half-written step that looks finished. A finished step that fails to restore (corrupted or
truncated files) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, keep_last: int, keep_every: int):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every, create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        return self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, meta) of one step; raises whatever orbax raises for a damaged step."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest step that restores cleanly, or None if none does."""
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as err:  # orbax raises many types for damaged files
                log.warning("checkpoint at step %d in %s cannot be restored (%s: %s); "
                            "trying the previous one", step, self.directory, type(err).__name__, err)
                print(f"WARNING: skipping unreadable checkpoint step {step}: {type(err).__name__}")
                continue
            return step, state, meta
        return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
