"""Run-directory paths that are local or in an object store (``gs://``), through ``etils.epath``.

``etils.epath`` is what orbax uses, so checkpoints, metrics, plots and the config of one run go
through one path type: a local path stays a :class:`pathlib.Path` (every local behaviour of
:mod:`sparsejax.rundir` is unchanged), a ``gs://`` / ``s3://`` URL becomes an ``epath.Path``
(fsspec underneath: ``gcsfs`` for ``gs://``; install it on the TPU VMs).

What changes on an object store, and why:

* **Whole objects only.** An object store has no append and no rename-over; a single upload
  (PUT) is atomic, readers see the old object or the new one, never a part. So
  :func:`write_atomic` uploads the whole content once, and ``metrics.jsonl`` is kept by
  :class:`ObjectLog`: the writer (process 0) holds the file's content, appends in memory and
  **re-uploads the whole file** at most every ``upload_every_s`` seconds, before every
  checkpoint (:meth:`ObjectLog.sync`) and on close. A reader always sees a complete JSONL
  file; a crash loses only lines after the last checkpoint, which the resumed run recomputes.
  Cost: for a 100k-step run logging every 10 steps (~0.5 KB a line) the file grows to ~5 MB;
  one upload a minute is < 0.1 MB/s.
* **TensorBoard** events go through the same :class:`ObjectLog` rewrite (a tensorboardX writer
  factory registered for ``gs://`` and ``s3://``), not through google-cloud-storage.
* **No lock.** ``flock`` needs a kernel that sees every writer; a bucket has none. On an object
  store :class:`ObjectLock` writes ``.lock`` with the holder (PID, host, time) for people to
  read and removes it on exit; an existing ``.lock`` is reported as a warning, not a refusal (a
  killed trainer's ``.lock`` stays behind and cannot be told apart from a live one). Run one
  trainer per workdir; the launchers (``sparsejax.launch``) start exactly one job per run.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import socket
import tempfile
import time
import uuid
from typing import Callable, Union

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://")
AnyPath = Union[pathlib.Path, epath.Path]


class StorageError(RuntimeError):
    """A workdir in an object store cannot be used (one line)."""


def is_remote(p) -> bool:
    return os.fspath(p).startswith(REMOTE_PREFIXES)


def path(p) -> AnyPath:
    """A local path (absolute ``pathlib.Path``) or an object-store ``epath.Path``."""
    text = os.fspath(p)
    if text.startswith(REMOTE_PREFIXES):
        return epath.Path(text)
    return pathlib.Path(text).absolute()


def write_atomic(target: AnyPath, data: str | bytes | Callable[[pathlib.Path], None]) -> AnyPath:
    """One upload of the whole content (a function that writes a local path is run on a temp file)."""
    if callable(data):
        with tempfile.TemporaryDirectory(prefix="sparsejax-upload-") as tmp:
            local = pathlib.Path(tmp) / target.name
            data(local)
            data = local.read_bytes()
    target.write_bytes(data.encode() if isinstance(data, str) else data)
    return target


def check_writable_dir(target: AnyPath, what: str) -> None:
    """StorageError unless an object can be written under ``target`` (probe written, then removed)."""
    probe = target / f".write_probe.{uuid.uuid4().hex}"
    try:
        if target.exists() and not target.is_dir():
            raise StorageError(f"{what} {target} exists and is not a directory; choose another path")
        probe.write_bytes(b"")
        probe.unlink()
    except StorageError:
        raise
    except Exception as err:  # fsspec raises many types (PermissionError, FileNotFoundError, ...)
        raise StorageError(f"{what} {target} is not writable ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); check the bucket "
                           f"name and your credentials") from None


def local_log_path(workdir: AnyPath, name: str) -> pathlib.Path:
    """Where a log file of ``workdir`` is written: in it when local; for an object store (no
    appends) in ``$TMPDIR/sparsejax/<bucket path>/`` on this host."""
    if not is_remote(workdir):
        return pathlib.Path(workdir) / name
    local = pathlib.Path(tempfile.gettempdir()) / "sparsejax" / os.fspath(workdir).split("://", 1)[1]
    local.mkdir(parents=True, exist_ok=True)
    return local / name


class ObjectLog:
    """An append-only text file kept in an object store by whole-object rewrites (see module doc)."""

    def __init__(self, target: AnyPath, *, upload_every_s: float = 60.0):
        self.target, self.upload_every_s = target, upload_every_s
        self._buf = io.StringIO()
        if target.exists():
            self._buf.write(target.read_text())
        self._dirty, self._last = False, time.monotonic()

    def append(self, text: str) -> None:
        self._buf.write(text)
        self._dirty = True
        if time.monotonic() - self._last >= self.upload_every_s:
            self.sync()

    def replace(self, text: str) -> None:
        self._buf = io.StringIO(text)
        self._buf.seek(0, io.SEEK_END)
        self._dirty = True
        self.sync()

    def sync(self) -> None:
        if self._dirty:
            self.target.write_text(self._buf.getvalue())
            self._dirty = False
        self._last = time.monotonic()

    def text(self) -> str:
        return self._buf.getvalue()


class ObjectLock:
    """The object-store stand-in for :class:`sparsejax.rundir.RunLock`: a record, no exclusion."""

    def __init__(self, workdir: AnyPath, name: str = ".lock"):
        self.path = workdir / name
        self.warning: str | None = None
        self._held = False

    def acquire(self) -> "ObjectLock":
        if self.path.exists():
            try:
                info = json.loads(self.path.read_text())
                holder = f"PID {info['pid']} on host {info['host']} (since {info['since']})"
            except Exception:
                holder = "an unknown process"
            self.warning = (f"WARNING: {self.path} names {holder}; object stores cannot lock, so "
                            f"if that trainer is still running, stop one of the two")
            print(self.warning, flush=True)
        self.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        self._held = True
        return self

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if self._held:
            try:
                self.path.unlink()
            except Exception:  # already gone, or the bucket is unreachable at exit
                pass
            self._held = False

    def __enter__(self) -> "ObjectLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------- TensorBoard to object stores
class _EventObjectWriter:
    """tensorboardX record-writer file object: buffers the events, rewrites the object on flush."""

    def __init__(self, url: str, upload_every_s: float = 60.0):
        self._target, self._every = epath.Path(url), upload_every_s
        self._bytes = io.BytesIO()
        self._last = -float("inf")

    def write(self, data: bytes) -> None:
        self._bytes.write(data)

    def flush(self, force: bool = False) -> None:
        if force or time.monotonic() - self._last >= self._every:
            self._target.write_bytes(self._bytes.getvalue())
            self._last = time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


class _EventObjectFactory:
    def open(self, url: str):
        return _EventObjectWriter(url)

    def directory_check(self, url: str) -> None:
        epath.Path(url).mkdir(parents=True, exist_ok=True)


def register_tensorboard() -> None:
    """Route tensorboardX's ``gs://`` and ``s3://`` event files through epath."""
    from tensorboardX import record_writer

    for prefix in ("gs", "s3"):
        record_writer.register_writer_factory(prefix, _EventObjectFactory())
