"""Waiting on a real train.py process, shared by the training, fault and recipe tests."""

import time

from sparsejax import writers


def logged_steps(workdir):
    """Steps with a logged loss in the run's metrics.jsonl (empty before the first line)."""
    path = workdir / "metrics.jsonl"
    if not (path.exists() and path.stat().st_size):
        return []
    return [r["step"] for r in writers.read_jsonl(path) if "loss" in r]


def wait_for(pred, proc, timeout=120, what="condition"):
    """Poll ``pred()`` until true; fail if ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached in {timeout}s")


def wait_for_step(workdir, step, proc, timeout=120):
    """Wait until the run has logged ``step`` (or later); returns the last logged step."""
    wait_for(lambda: (logged_steps(workdir) or [0])[-1] >= step, proc, timeout, f"step {step}")
    return logged_steps(workdir)[-1]
