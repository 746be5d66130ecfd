"""Child processes that end with their parent (a sweep's train.py / eval.py).

A parent that starts a job sets ``SPARSEJAX_PARENT_PID`` in the child's environment; the child
calls :func:`die_with_parent` first thing, which asks the kernel (Linux ``PR_SET_PDEATHSIG``) to
send it SIGTERM when that parent dies, however it dies, SIGKILL included. The trainer treats
SIGTERM as a preemption: it checkpoints and exits 143. Doing this in the child itself, rather
than in a ``preexec_fn``, keeps fork-without-exec out of the (multithreaded) parent.
"""

from __future__ import annotations

import os
import signal

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
