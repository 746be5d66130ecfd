"""The run directory: its one layout, its one writer, atomic writes, and moving bad files aside.

Layout of a run directory (``--workdir``)::

    config.json           the run's config (also stored in every checkpoint's meta, see below)
    checkpoints/<step>/   orbax steps: ``state`` (params, opt_state, step) and ``meta`` (JSON)
    metrics.jsonl         one JSON line per training step, plus eval lines
    tensorboard/          the same scalars as TensorBoard events
    activation_ratio.png  the training plot
    eval/                 eval.py's results.json, results.csv and plots
    sweep_train_done.json a sweep's marker: this run's training finished (sparsejax.sweep)
    train.log, eval.log   a sweep's capture of train.py's / eval.py's console (sparsejax.sweep)
    train_debug.log       library logging (orbax, absl): kept out of the console
    rejected/             checkpoint steps that could not be restored, moved aside (never deleted)
    previous/<time>/      an earlier run's files, moved aside by ``train.py --no-resume``
    .lock                 held (``flock``) by the one process that writes the run

:class:`RunDir` names every one of these paths; code reaches a run's files through it, and reads
a run's config by the one precedence rule of ``checkpointing.read_run_config`` (the newest
readable checkpoint's own copy first, ``config.json`` only without one).

Rules every writer follows:

* **One writer.** :class:`RunLock` takes an exclusive, non-blocking ``flock`` on ``.lock``; a
  second trainer (or a sweep restarting a run whose trainer is still alive) is refused with the
  holder's PID and host. The kernel drops the lock when its process dies, however it dies, so a
  killed run never leaves a stale lock. ``flock`` is advisory and local: on network filesystems
  (NFS, gcsfuse) it may not exclude a writer on another machine.
* **Whole files or nothing.** :func:`atomic_write` writes a temporary file in the same directory,
  fsyncs it and renames it over the target.
* **Readers change nothing.** Evaluation opens checkpoints through
  ``checkpointing.CheckpointReader``, which never creates, cleans up or deletes anything here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import posixpath
import socket
import tempfile
import time
from typing import Any, Callable

from sparsejax import storage

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PLOT = "activation_ratio.png"
EVAL = "eval"
EVAL_RESULTS = "results.json"  # in EVAL
SWEEP_MARKER = "sweep_train_done.json"
SWEEP_RUNS = "runs"  # a sweep directory holds each run at runs/<run name>
DEBUG_LOG = "train_debug.log"
TRAIN_LOG, EVAL_LOG = "train.log", "eval.log"
REJECTED = "rejected"
PREVIOUS = "previous"
LOCK = ".lock"

# What belongs to one training run (moved aside together by --no-resume).
RUN_FILES = (CONFIG, CHECKPOINTS, METRICS, TENSORBOARD, PLOT, EVAL, REJECTED)


def _member(*parts: str, doc: str = "") -> property:
    """A RunDir property: the path ``root/parts...`` (of root's kind)."""
    return property(lambda self: self._join(*parts), doc=doc or "/".join(parts))


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (layout above). ``root`` is a local ``pathlib.Path``, an
    object-store path (``storage.path``) or a string (a path on another machine, as printed in a
    command line); every property is a path of the same kind."""

    root: Any

    def _join(self, *parts: str):
        if isinstance(self.root, str):
            return posixpath.join(self.root, *parts)
        return self.root.joinpath(*parts)

    config = _member(CONFIG)
    checkpoints = _member(CHECKPOINTS)
    metrics = _member(METRICS)
    tensorboard = _member(TENSORBOARD)
    plot = _member(PLOT)
    eval_dir = _member(EVAL)
    eval_results = _member(EVAL, EVAL_RESULTS,
                           doc="eval.py's default output (results.csv and plots go beside it)")
    rejected = _member(REJECTED)
    previous = _member(PREVIOUS)
    lock = _member(LOCK)
    sweep_marker = _member(SWEEP_MARKER)
    train_log = _member(TRAIN_LOG, doc="train.py's console, as a sweep captured it")
    eval_log = _member(EVAL_LOG, doc="eval.py's console, as a sweep captured it")

    @staticmethod
    def debug_log_name(process_index: int = 0) -> str:
        """One debug log per process: hosts may share the run directory."""
        return DEBUG_LOG if process_index == 0 else DEBUG_LOG.replace(".log", f".{process_index}.log")

    def has_checkpoints(self) -> bool:
        """Whether ``checkpoints/`` holds any step directory (finished or not)."""
        ckpt = self.checkpoints
        return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def sweep_run(out, name: str) -> RunDir:
    """Where a sweep directory ``out`` keeps its run ``name`` (``OUT/runs/<name>``)."""
    return RunDir(out / SWEEP_RUNS / name)


class RunDirError(RuntimeError):
    """The run directory cannot be used (locked by another process, not writable, ...)."""


def atomic_write(path: str | pathlib.Path, data: str | bytes | Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Write ``data`` (text, bytes, or a function that writes a given path) to ``path`` whole.

    The temporary file is in the target's directory (a rename is atomic only within one
    filesystem) and carries the PID, so two processes never share one. In an object store
    (``gs://``) the whole content is uploaded once instead (:func:`storage.write_atomic`).
    """
    if storage.is_remote(path):
        return storage.write_atomic(storage.path(path), data)
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def check_writable_dir(path: pathlib.Path, what: str) -> None:
    """Raise RunDirError unless ``path`` is (or can be created as) a writable directory.

    Leaves nothing: a missing directory is checked through its nearest existing parent, with
    a probe file that is removed at once.
    """
    if storage.is_remote(path):
        try:
            return storage.check_writable_dir(storage.path(path), what)
        except storage.StorageError as err:
            raise RunDirError(str(err)) from None
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{what} {path} exists and is not a directory; choose another path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"{what} {path}: {probe} is a file, so the directory cannot be created")
    # Probe with a real file: permission bits say nothing for root or on read-only mounts.
    try:
        fd, name = tempfile.mkstemp(prefix=".write_probe.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise RunDirError(f"{what} {path} is not writable ({probe}: {err.strerror}); "
                          f"choose a directory you can write to") from None


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def move_aside(path: pathlib.Path, into: pathlib.Path) -> pathlib.Path:
    """Rename ``path`` into directory ``into`` under a unique name; returns the new path."""
    into.mkdir(parents=True, exist_ok=True)
    target = into / f"{path.name}.{_stamp()}"
    path.replace(target)  # os.replace locally; a copy and delete in an object store
    return target


def move_previous_run(workdir: pathlib.Path) -> pathlib.Path | None:
    """Move every file of an earlier run to ``previous/<time>/`` (``--no-resume``)."""
    present = [workdir / name for name in RUN_FILES if (workdir / name).exists()]
    if not present:
        return None
    target = RunDir(workdir).previous / _stamp()
    target.mkdir(parents=True)
    for path in present:
        path.replace(target / path.name)
    return target


def run_lock(workdir) -> "RunLock | storage.ObjectLock":
    """The run's lock: ``flock`` locally; in an object store only a record (see ``storage``)."""
    return storage.ObjectLock(storage.path(workdir), LOCK) if storage.is_remote(workdir) else RunLock(workdir)


class RunLock:
    """Exclusive ownership of a run directory for the life of this process (see module doc)."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = RunDir(pathlib.Path(workdir)).lock
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunDirError(f"{self.path.parent} is in use by {self.holder()}; "
                              f"wait for it or stop it, or use another --workdir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """'PID n on host h (since t)', as recorded by the process that holds the lock."""
        try:
            info = json.loads(self.path.read_text())
            return f"PID {info['pid']} on host {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
