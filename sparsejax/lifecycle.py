"""How a training process starts and stops: stop signals, dying with a parent, a debug log.

* :class:`StopSignals`: SIGTERM / SIGINT become a flag the training loop checks after each
  step (it then checkpoints once and exits 143 / 130) instead of killing the process mid-write.
* :func:`debug_log`: library logging (orbax, absl, warnings, tracebacks of library threads) goes
  to a file in the run directory, not to the console.
* :func:`die_with_parent`: a sweep's child processes end with their parent (below).

Child processes that end with their parent (a sweep's train.py / eval.py):

A parent that starts a job sets ``SPARSEJAX_PARENT_PID`` in the child's environment; the child
calls :func:`die_with_parent` first thing, which asks the kernel (Linux ``PR_SET_PDEATHSIG``) to
send it SIGTERM when that parent dies, however it dies, SIGKILL included. The trainer treats
SIGTERM as a preemption: it checkpoints and exits 143. Doing this in the child itself, rather
than in a ``preexec_fn``, keeps fork-without-exec out of the (multithreaded) parent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

ENV = "SPARSEJAX_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: dict) -> dict:
    """``env`` plus the marker that makes a child started with it die with this process."""
    return {**env, ENV: str(os.getpid())}


def die_with_parent() -> bool:
    """Arrange SIGTERM on the parent's death; True if armed. Exits if the parent is already gone."""
    parent = os.environ.get(ENV)
    if not parent:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if str(os.getppid()) != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            self.signum = signum
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def debug_log(path):
    """While active, library logging (orbax, absl, warnings) goes to the file ``path``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # Exceptions in library threads (orbax's background writers after a failed write) would
    # print full tracebacks to stderr; the error that matters is raised in the main thread.
    hooks = (threading.excepthook, sys.unraisablehook)
    threading.excepthook = lambda a: logging.getLogger("thread").error(
        "exception in thread %s", getattr(a.thread, "name", "?"),
        exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    sys.unraisablehook = lambda a: logging.getLogger("unraisable").error(
        "%s: %r", a.err_msg or "unraisable exception", a.object,
        exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    try:
        yield
    finally:
        threading.excepthook, sys.unraisablehook = hooks
        logging.captureWarnings(False)
        root.handlers, level = saved
        root.setLevel(level)
        handler.close()
