"""The sparse decode FFN's CPU row reader: a C++ XLA FFI custom call (``cpu_decode.cc``).

:func:`rows_ffn` computes ``y = Σ_j coef[:, j] · (x · up[j]) · out[j]`` over the neurons j active
for any of the step's tokens, reading only their rows of ``up`` and ``out`` ([F, D]) in one pass.
It is what XLA's own path (:mod:`sparsejax.decode_ffn`, ``kernel="xla"``: gather the rows into a
buffer, then two matmuls) does, without writing the gathered rows out and reading them back, and
without a static capacity: the kernel reads exactly the active rows, however many.

The source is compiled on first use with the system's C++ compiler (``$CXX``, default ``g++``;
``-O3 -march=native``) against the FFI headers of the installed jaxlib, into
``$XDG_CACHE_HOME/sparsejax/kernels`` (default ``~/.cache``) under a name that hashes the source,
the compiler, the flags, jax's version and this CPU's instruction-set flags — so a cache shared
between machines never hands one a binary built for another. The build writes a temporary file
and renames it, so processes that build at once do not see each other's half-written file (a
temporary file a killed build left is removed by a later build after an hour). A
machine without a compiler gets :class:`KernelUnavailable` (one line saying why) and the decode
path falls back to XLA's gather (``kernel="auto"``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("cpu_decode.cc")
TARGET = "sparsejax_rows_ffn"
SYMBOL = "SparsejaxRowsFfn"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd")


class KernelUnavailable(RuntimeError):
    """The CPU decode kernel cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sparsejax" / "kernels"


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (Linux: /proc/cpuinfo), for the cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelUnavailable(f"no C++ compiler: CXX={cxx!r} is not on PATH")
    return path


def library_path() -> Path:
    """The built library's path in the cache (built now if it is not there yet)."""
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"the C++ compiler {cxx} does not run ({err})") from None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, cxx.encode(), " ".join(FLAGS).encode(), "".join(version).encode(),
        jax.__version__.encode(), platform.machine().encode(), _cpu_flags().encode()])).hexdigest()
    out = cache_dir() / f"cpu_decode-{key[:16]}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob("*.tmp"):  # left by a build that was killed
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as err:
        raise KernelUnavailable(f"cannot write the kernel cache {out.parent} ({err.strerror or err})"
                                ) from None
    try:
        done = subprocess.run([cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or [done.stderr.strip()]
            raise KernelUnavailable(f"{cxx} failed to build {SOURCE.name}: {errors[0][:300]}")
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"building {SOURCE.name} failed ({err})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _register() -> tuple[str, str]:
    """(library path, '') once built, loaded and registered, or ('', why not): built once per
    process, and a failure is remembered too (not retried on every call)."""
    if jax.default_backend() != "cpu":
        return "", (f"the CPU decode kernel runs on CPU; this backend is "
                    f"{jax.default_backend()!r}")
    try:
        path = library_path()
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, SYMBOL)),
                                    platform="cpu")
    except KernelUnavailable as err:
        return "", str(err)
    except Exception as err:  # noqa: BLE001 - a library that does not load is reported, not fatal
        return "", f"cannot load the CPU decode kernel ({type(err).__name__}: {err})"
    return str(path), ""


def ensure() -> str:
    """The loaded library's path; raises :class:`KernelUnavailable` saying why not."""
    path, why = _register()
    if why:
        raise KernelUnavailable(why)
    return path


def rows_ffn(x_NxD: jax.Array, coef_NxF: jax.Array, up_FxD: jax.Array | None,
             out_FxD: jax.Array) -> jax.Array:
    """``y [N, D] = Σ_j coef[:, j] · (x · up[j]) · out[j]`` (plain FFN, ``up`` None: without the
    up factor) over the neurons whose ``coef`` is nonzero for any token; float32."""
    ensure()
    if up_FxD is None:
        up_FxD = jnp.zeros((0, out_FxD.shape[1]), jnp.float32)
    args = (x_NxD, coef_NxF, up_FxD, out_FxD)
    if any(a.dtype != jnp.float32 for a in args):  # a cast here would copy every weight per step
        raise TypeError(f"rows_ffn reads float32 arrays; got {[str(a.dtype) for a in args]}")
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x_NxD.shape, jnp.float32))(*args)
