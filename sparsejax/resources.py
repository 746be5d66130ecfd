"""Will the run fit? Memory available to this process and the compiled step's needs.

Checked twice before any parameter is allocated: first the training state's bytes from abstract
shapes (before compiling, which for a multi-billion-parameter model on a small host can itself
exhaust memory), then the compiled step's own ``memory_analysis()`` (arguments + outputs −
donated aliases + temporaries). On accelerators the limit is the device's ``bytes_limit``; on CPU
all local devices share the host, whose limit is the smallest of free memory, the cgroup's
``memory.max`` and ``RLIMIT_AS``.
"""

from __future__ import annotations

import os
import pathlib
import resource

import jax
import numpy as np

from sparsejax.config import ConfigError

GIB = 2**30
KNOBS = ("lower train.batch_size (or raise train.grad_accum), shorten train.seq_len, "
         "or shard the state with mesh.fsdp")


def _read_int(path: str) -> int | None:
    try:
        text = pathlib.Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> int:
    """Bytes this process can still allocate on the host (an upper bound, not a promise)."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    limit, usage = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and usage is not None:
        candidates.append(max(limit - usage, 0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            vm = int(pathlib.Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            vm = 0
        candidates.append(max(soft - vm, 0))
    return min(candidates) if candidates else 1 << 62


def device_budget(devices=None) -> tuple[int, str]:
    """(bytes one device may use, what limits it) for the first local device."""
    devices = jax.local_devices() if devices is None else devices
    stats = None
    try:
        stats = devices[0].memory_stats()
    except Exception:  # CPU devices raise or return None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{devices[0].device_kind} memory"
    return host_available_bytes() // max(len(devices), 1), (
        f"free host memory shared by {len(devices)} CPU device(s)")


def per_device_bytes(abstract_tree) -> int:
    """Bytes of one device's shard of each array (``ShapeDtypeStruct``s carrying shardings)."""
    total = 0
    for x in jax.tree.leaves(abstract_tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def _fail(what: str, need: int, budget: int, limit_name: str) -> None:
    raise ConfigError(f"{what} needs {need / GIB:.2f} GiB per device but {limit_name} allows "
                      f"{budget / GIB:.2f} GiB; {KNOBS}")


def check_state_fits(abstract_state, budget: int, limit_name: str) -> int:
    """Before compiling: one device's shard of the state (params + optimizer moments)."""
    need = per_device_bytes(abstract_state)
    if need > budget:
        _fail("the training state (parameters and optimizer moments)", need, budget, limit_name)
    return need


def compiled_bytes(compiled) -> int | None:
    """Peak bytes of one device for a compiled executable, or None when XLA does not say."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def check_compiled_fits(compiled, budget: int, limit_name: str) -> int | None:
    need = compiled_bytes(compiled)
    if need is not None and need > budget:
        _fail("the compiled train step", need, budget, limit_name)
    return need


def human_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
