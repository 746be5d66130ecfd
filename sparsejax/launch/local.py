"""N training processes on this machine, one JAX process each, joined by ``jax.distributed``.

    python -m sparsejax.launch local --processes 2 --devices-per-process 4 -- \\
        --config configs/tiny_relu.py --workdir runs/mh --set mesh.fsdp=4

starts ``train.py ARGS --coordinator localhost:PORT --num-processes N --process-id I`` for
I = 0 … N-1 with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` and ``JAX_PLATFORMS=cpu``
(CPU collectives over gloo), so a laptop runs the same multi-host code paths as a TPU slice:
per-host data rows, global arrays, orbax's multi-process checkpointing, process-0-only writers.

Failure handling, in two layers:

* **This launcher.** It waits on its children. When one exits with an error or is killed, the
  others are SIGKILLed at once — they cannot finish or save without the lost peer (every step and
  every checkpoint is collective) — and the launcher exits with the failed child's code
  (128 + signal for a signal). SIGTERM / SIGINT to the launcher are forwarded to every child,
  which agree on a step, save once and exit 143 / 130; after ``--grace`` seconds the launcher
  SIGKILLs what is left. The children are started with ``PR_SET_PDEATHSIG`` (``train.py`` calls
  ``lifecycle.die_with_parent``), so a SIGKILLed launcher takes them with it.
* **JAX's coordination service**, for processes started without this launcher (TPU VM workers,
  GKE pods): a process whose peer stops heart-beating aborts after ``--heartbeat-timeout``
  seconds (JAX's default 100) instead of blocking in a collective for ever.

Output: process 0's stdout and stderr pass through; the others' lines are prefixed ``[I]``.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

from sparsejax import lifecycle

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN = REPO / "train.py"
# The flags this launcher sets; passing them through as well would be ambiguous.
OWN_FLAGS = ("--coordinator", "--num-processes", "--process-id")


class LaunchError(ValueError):
    """Bad launcher input (one line, exit 2)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_commands(train_args: list[str], processes: int, port: int, *,
                     python: str = sys.executable, heartbeat_timeout: int | None = None,
                     stop_timeout: float | None = None) -> list[list[str]]:
    """The ``train.py`` command of each process (same args, its own ``--process-id``).
    ``stop_timeout``: ``train.py --stop-timeout`` unless the args set it."""
    if processes < 1:
        raise LaunchError(f"--processes={processes}; allowed values: integers >= 1")
    clash = [a.split("=")[0] for a in train_args if a.split("=")[0] in OWN_FLAGS]
    if clash:
        raise LaunchError(f"{clash[0]} is set by the launcher; remove it from the train.py args")
    extra = ["--heartbeat-timeout", str(heartbeat_timeout)] if heartbeat_timeout else []
    if stop_timeout and not any(a.split("=")[0] == "--stop-timeout" for a in train_args):
        extra += ["--stop-timeout", f"{stop_timeout:g}"]
    return [[python, str(TRAIN), *train_args, "--coordinator", f"localhost:{port}",
             "--num-processes", str(processes), "--process-id", str(i), *extra]
            for i in range(processes)]


def stop_timeout_for(grace: float) -> float:
    """The ``--stop-timeout`` the launcher gives its processes: three quarters of ``--grace``
    (90 s of the default 120), at least 1 s."""
    return max(1.0, 0.75 * grace)


def process_env(devices_per_process: int, base: dict | None = None) -> dict:
    if devices_per_process < 1:
        raise LaunchError(f"--devices-per-process={devices_per_process}; allowed values: integers >= 1")
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    # train.py reads this and arms PR_SET_PDEATHSIG (lifecycle.die_with_parent): a SIGKILLed
    # launcher takes its children with it (each gets SIGTERM, saves and exits 143).
    return lifecycle.child_env(env)


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        if "[Gloo] Rank" in line or "Expected number of connected peer ranks" in line:
            # gloo's connection chatter, one line per device (lines of processes interleave)
            continue
        out.write(prefix + line)
        out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(train_args: list[str], processes: int, devices_per_process: int, *, port: int | None = None,
        heartbeat_timeout: int | None = None, grace: float = 120.0) -> int:
    """Start the processes, wait for them, stop all if one fails. Returns the exit code."""
    port = port or free_port()
    # A process blocked in a collective after the forwarded signal exits with a line saying why
    # (train.py's watchdog) before the grace ends in a silent SIGKILL.
    cmds = process_commands(train_args, processes, port, heartbeat_timeout=heartbeat_timeout,
                            stop_timeout=stop_timeout_for(grace))
    env = process_env(devices_per_process)
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i, cmd in enumerate(cmds):
            p = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
            procs.append(p)
            for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, "" if i == 0 else f"[{i}] ", out),
                                     daemon=True)
                t.start()
                pumps.append(t)
        print(f"launch: {processes} processes × {devices_per_process} CPU devices, coordinator "
              f"localhost:{port}, pids {' '.join(str(p.pid) for p in procs)}", file=sys.stderr, flush=True)
        code = _wait(procs, forwarded, grace)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)
    return code


def _wait(procs: list[subprocess.Popen], forwarded: list[int], grace: float) -> int:
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed and not forwarded:
            i, c = failed[0]
            alive = [p for p in procs if p.poll() is None]
            for p in alive:
                p.kill()
            what = f"signal {signal.Signals(-c).name}" if c < 0 else f"exit {c}"
            print(f"launch: process {i} ended with {what}; stopped the {len(alive)} other(s) "
                  f"(SIGKILL: they cannot continue or save without it)", file=sys.stderr, flush=True)
            return _exit_code(c)
        if all(c is not None for c in codes):
            return max((_exit_code(c) for c in codes), key=lambda c: (c != 0, c))
        if forwarded and deadline is None:
            deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            print(f"launch: processes still running {grace:.0f}s after {signal.Signals(forwarded[0]).name}; "
                  f"SIGKILL", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return 128 + forwarded[0]
        time.sleep(0.1)
