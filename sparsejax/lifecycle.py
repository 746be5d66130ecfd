"""How a training process starts and stops: stop signals, dying with a parent, a debug log.

* :class:`StopSignals`: SIGTERM / SIGINT become a flag the training loop checks after each
  step (it then checkpoints once and exits 143 / 130) instead of killing the process mid-write;
  a watchdog exits with one line if the loop is blocked and never sees the flag.
* :func:`debug_log`: library logging (orbax, absl, warnings, tracebacks of library threads) goes
  to a file in the run directory, not to the console.
* :func:`die_with_parent`: a sweep's child processes end with their parent (below).
* :func:`cpu_unless_accelerator`: on a machine without a TPU or GPU, JAX uses the CPU without
  first initialising libtpu (installed for the TPU compile tests), whose failed TPU probe
  otherwise prints C++ errors (``TPU_WORKER_HOSTNAMES``) on the console.

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


# PCI ids of Google TPU chips (vendor 0x1ae0), as jax._src.hardware_utils lists them; the
# vendor's other devices (e.g. the gVNIC network card) are not TPUs.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _tpu_attached() -> bool:
    import glob

    if glob.glob("/dev/accel[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() != _GOOGLE_PCI_VENDOR:
                continue
            if open(os.path.join(os.path.dirname(vendor), "device")).read().strip() in _TPU_PCI_DEVICES:
                return True
        except OSError:
            continue
    return False


def quiet_native_logs(environ=None) -> None:
    """Keep XLA's C++ INFO/WARNING lines (e.g. the SPMD partitioner's "Involuntary full
    rematerialization" on an fsdp mesh) off the console, before jax is imported: ``train.py`` and
    ``eval.py`` promise one line per event. Errors still print; an explicit
    ``TF_CPP_MIN_LOG_LEVEL`` (e.g. 0 to debug the compiler) is kept."""
    environ = os.environ if environ is None else environ
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_unless_accelerator(environ=None) -> bool:
    """Set ``JAX_PLATFORMS=cpu`` (before jax is imported) when no ``JAX_PLATFORMS`` is given and
    this machine has no TPU chip (PCI, as on TPU VMs and GKE TPU nodes) and no GPU device. True if
    it was set. ``TPU_*`` variables are no sign of a TPU: importing libtpu sets some of them
    (``TPU_LIBRARY_PATH``, ``TPU_SKIP_MDS_QUERY``) and child processes inherit them."""
    env = os.environ if environ is None else environ
    if env.get("JAX_PLATFORMS"):
        return False
    if any(os.path.exists(f) for f in _GPU_DEVICE_FILES) or _tpu_attached():
        return False
    env["JAX_PLATFORMS"] = "cpu"
    return True


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def quiet_console() -> None:
    """What every command-line entry point does before importing JAX: XLA's C++ warnings off the
    console (:func:`quiet_native_logs`), no libtpu probe without a TPU or GPU
    (:func:`cpu_unless_accelerator`), library logging (absl, orbax, tfds) below ERROR dropped, and
    exceptions in library threads sent to logging (:func:`library_errors_to_logging`), so that
    the console shows the command's own messages."""
    quiet_native_logs()
    cpu_unless_accelerator()
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger().setLevel(logging.ERROR)
    library_errors_to_logging()


@contextlib.contextmanager
def stop_before_start(what: str = "training started"):
    """While active, SIGTERM / SIGINT end the process at once with one line and 128 + signal.

    For the seconds before the trainer's :class:`StopSignals` take over (importing jax, loading
    the config, joining the other processes): nothing has been written yet, so there is nothing
    to save, but the default action would kill the process silently. ``os.write``/``os._exit``:
    the handler may interrupt a print or an import, where Python-level I/O could fail.
    """
    def handler(signum, frame):
        name = signal.Signals(signum).name
        os.write(2, f"stopped by {name} before {what}; nothing was written\n".encode())
        os._exit(128 + signum)

    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


DEFAULT_STOP_TIMEOUT_S = 90.0  # below the local launcher's default --grace of 120 s


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step, with a watchdog.

    The flag is set by a Python signal handler, which runs only when the main thread returns to
    the interpreter; a main thread blocked in a collective whose peer never answers (a stopped
    or hung process) would never see it, and the launcher's SIGKILL would follow in silence. So,
    with ``timeout_s``, a watchdog thread learns of the signal from the C-level handler
    (``signal.set_wakeup_fd``) and, if the loop has not reached its stop point
    (:meth:`stopping`) ``timeout_s`` seconds later, prints one line saying why and exits with
    128 + signal, without a final checkpoint (the newest one on disk stays good).
    """

    def __init__(self, timeout_s: float | None = None):
        self.signum: int | None = None
        self.timeout_s = timeout_s
        self._previous: dict = {}
        self._reached = threading.Event()
        self._wakeup = None

    def __enter__(self):
        def handler(signum, frame):
            self.signum = signum
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        if self.timeout_s and self._previous:
            import socket

            read, write = socket.socketpair()
            write.setblocking(False)
            self._wakeup = (read, write, signal.set_wakeup_fd(write.fileno(),
                                                              warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(read,), name="stop-watchdog",
                             daemon=True).start()
        return self

    def stopping(self) -> None:
        """The loop has seen the stop flag and is saving and leaving: the watchdog stands down."""
        self._reached.set()

    def _watch(self, read) -> None:
        while True:
            try:
                received = read.recv(64)
            except OSError:
                return
            if not received:  # closed by __exit__
                return
            signums = [b for b in received if b in tuple(STOP_SIGNALS)]
            if signums:
                break
        if self._reached.wait(self.timeout_s):
            return
        name = signal.Signals(signums[0]).name
        os.write(2, (f"stopped by {name}: the run did not reach a step boundary within "
                     f"{self.timeout_s:g} s of the signal (blocked, e.g. in a collective with a "
                     f"process that does not respond); exiting without a final checkpoint, the "
                     f"newest checkpoint on disk is unchanged\n").encode())
        os._exit(128 + signums[0])

    def __exit__(self, *exc):
        self._reached.set()
        if self._wakeup is not None:
            read, write, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            write.close()  # the watchdog's recv returns b"" and it ends
            self._wakeup = None
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def library_errors_to_logging() -> tuple:
    """Exceptions in library threads and coroutines go to logging, not to stderr; returns the
    previous (threading.excepthook, sys.unraisablehook).

    orbax/TensorStore, after a failed read or write, finish their background work on a closed
    event loop and print hundreds of lines of ``RuntimeError: Event loop is closed`` tracebacks
    (``Exception ignored in coroutine``); the error that matters is raised in the main thread and
    reported there in one line. Exceptions of the main thread are not affected.
    """
    hooks = (threading.excepthook, sys.unraisablehook)
    threading.excepthook = lambda a: logging.getLogger("thread").error(
        "exception in thread %s", getattr(a.thread, "name", "?"),
        exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    sys.unraisablehook = lambda a: logging.getLogger("unraisable").error(
        "%s: %r", a.err_msg or "unraisable exception", a.object,
        exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    return hooks


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
    hooks = library_errors_to_logging()
    try:
        yield
    finally:
        threading.excepthook, sys.unraisablehook = hooks
        logging.captureWarnings(False)
        root.handlers, level = saved
        root.setLevel(level)
        handler.close()
