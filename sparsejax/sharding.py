"""Device mesh, logical-axis sharding rules and multi-host start-up.

The mesh has axes ``(data, fsdp, tensor)``. Parameters carry logical axis names (see
:mod:`sparsejax.model`); ``MeshConfig.rules`` maps them to mesh axes (MaxText style), so the same
code runs on 1 CPU device, 8 fake CPU devices and a TPU pod slice.

:class:`ShardingPlan` is the one place shardings are computed: ``(mesh section, mesh) →`` the
state's and parameters' shardings (from their logical axis names), the batch's and micro-batch's
(from the ``batch`` rule) and the replicated one. The step, the trainer, evaluation, checkpoint
readers and the benchmarks all take them from a plan, so a custom ``batch`` rule reaches the
batches the trainer feeds and the shardings the step was compiled for alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsejax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)



def spec_axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shard_ways(mesh, axes: tuple[str, ...]) -> int:
    """Into how many shards the mesh axes ``axes`` split a dimension."""
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the one -1 axis to the remaining devices and check the product."""
    sizes = [getattr(mesh_cfg, a) for a in MESH_AXES]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices are not "
                              f"divisible by the fixed axes' product {fixed}")
        sizes[sizes.index(-1)] = n_devices // fixed
    if int(np.prod(sizes)) != n_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                          f"devices, but {n_devices} are available; set one mesh axis to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: jit's in/out shardings and the logical constraints drive GSPMD propagation.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except Exception:  # pragma: no cover - topology-aware layout unavailable (e.g. odd slices)
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def rules(mesh_cfg: MeshConfig) -> tuple:
    return tuple((logical, mesh_axis) for logical, mesh_axis in mesh_cfg.rules)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def mesh_spec(logical: PartitionSpec | tuple, mesh_cfg: MeshConfig) -> PartitionSpec:
    """Logical axis names (one per dimension, None = replicated) -> mesh PartitionSpec by the
    rules; a name without a rule is replicated, as Flax's logical rules do."""
    table = dict(rules(mesh_cfg))
    return PartitionSpec(*(None if name is None else table.get(name) for name in logical))


def logical_shardings(specs_tree, mesh: Mesh, mesh_cfg: MeshConfig):
    """NamedShardings for a tree of logical PartitionSpecs (``model.Model.logical_specs``)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, mesh_spec(spec, mesh_cfg)), specs_tree,
                        is_leaf=_is_spec)


# The config field that sets each logical axis's length (for errors users can act on).
LOGICAL_AXIS_FIELDS = {"embed": "model.d_model", "mlp": "model.d_ff", "heads": "model.n_heads",
                       "kv_heads": "model.n_kv_heads",
                       "kv": "model.head_dim", "vocab": "model.vocab_size",
                       "layers": "model.n_layers", "norm": "model.d_model"}


def check_divisible(abstract_tree, specs_tree, mesh: Mesh, mesh_cfg: MeshConfig) -> None:
    """ConfigError naming the config field when a sharded dimension does not divide evenly.

    ``abstract_tree``: arrays or ShapeDtypeStructs; ``specs_tree``: their logical PartitionSpecs.
    Without this, XLA reports an ``IndivisibleError`` about an anonymous array shape.
    """
    table = dict(rules(mesh_cfg))
    specs = jax.tree.leaves(specs_tree, is_leaf=_is_spec)
    for leaf, names in zip(jax.tree.leaves(abstract_tree), specs):
        if not names:
            continue
        for size, logical in zip(leaf.shape, names):
            target = table.get(logical)
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if size % ways:
                field = LOGICAL_AXIS_FIELDS.get(logical, f"the {logical!r} dimension")
                mesh_desc = " × ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
                raise ConfigError(
                    f"{field}={size} is not divisible by {mesh_desc} (logical axis {logical!r} is "
                    f"sharded over {list(axes)}); choose a multiple of {ways}, change the mesh, or "
                    f"map {logical!r} to None in mesh.rules")


def batch_axes(mesh_cfg: MeshConfig) -> tuple[str, ...]:
    """Mesh axes the ``batch`` logical rule splits batches over (default rules: data, fsdp)."""
    target = dict(rules(mesh_cfg)).get("batch")
    return (target,) if isinstance(target, str) else tuple(target or ())


def batch_spec(mesh_cfg: MeshConfig, *, leading: int = 0) -> PartitionSpec:
    """[B, ...] split by the ``batch`` rule; ``leading`` unsplit axes first (micro-batches)."""
    axes = batch_axes(mesh_cfg)
    return PartitionSpec(*([None] * leading), axes or None, None)


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh, mesh_cfg: MeshConfig) -> None:
    axes = batch_axes(mesh_cfg)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    names = " × ".join(f"mesh.{a}" for a in axes) or "1"
    if batch_size % (grad_accum * ways):
        raise ConfigError(
            f"train.batch_size={batch_size} must be divisible by train.grad_accum={grad_accum} × "
            f"{names} = {grad_accum} × {ways}; choose a multiple of {grad_accum * ways}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# The arrays of a training / evaluation batch: [B, L] each (sparsejax.data yields them host-local).
BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32}


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Every sharding of a run, from the config's mesh section and a mesh (module docstring).

    ``mesh_cfg``'s rules decide all of them: parameters and optimizer moments by their logical
    axis names, batches by the ``batch`` rule.
    """

    mesh: Mesh
    mesh_cfg: MeshConfig

    # -- batches ---------------------------------------------------------------------------
    @property
    def batch(self) -> NamedSharding:
        """[B, ...] split over the ``batch`` rule's mesh axes (default: data × fsdp)."""
        return NamedSharding(self.mesh, batch_spec(self.mesh_cfg))

    @property
    def micro_batch(self) -> NamedSharding:
        """[accum, B / accum, ...]: micro-batches stacked in front, each split like a batch."""
        return NamedSharding(self.mesh, batch_spec(self.mesh_cfg, leading=1))

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    def batch_shapes(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The abstract batch the step is compiled for (``jit(...).lower``)."""
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=self.batch)
                for k, dtype in BATCH_DTYPES.items()}

    def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble each host's rows into global arrays sharded as :attr:`batch`."""
        return {k: jax.make_array_from_process_local_data(self.batch, v)
                for k, v in local_batch.items()}

    def check_batch(self, batch_size: int, grad_accum: int) -> None:
        check_batch(batch_size, grad_accum, self.mesh, self.mesh_cfg)

    # -- parameters and state --------------------------------------------------------------
    def spec(self, logical: PartitionSpec | tuple) -> PartitionSpec:
        return mesh_spec(logical, self.mesh_cfg)

    def shardings(self, specs_tree) -> Any:
        """NamedShardings for a tree of logical PartitionSpecs."""
        return logical_shardings(specs_tree, self.mesh, self.mesh_cfg)

    def abstract(self, annotated_tree) -> tuple[Any, Any]:
        """(shardings, ShapeDtypeStructs carrying them) of an abstract tree whose leaves carry
        logical axis names (Flax-boxed, e.g. ``jax.eval_shape`` of an annotated init); checks
        that every sharded dimension divides (ConfigError naming the config field)."""
        import flax.linen as nn  # noqa: PLC0415 - only the boxed-metadata helpers

        specs = nn.get_partition_spec(annotated_tree)
        plain = nn.meta.unbox(annotated_tree)
        check_divisible(plain, specs, self.mesh, self.mesh_cfg)
        shardings = self.shardings(specs)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                plain, shardings)
        return shardings, abstract


def plan(mesh_cfg: MeshConfig, devices=None) -> ShardingPlan:
    """The plan of a mesh built from ``mesh_cfg`` over ``devices`` (default: all devices)."""
    return ShardingPlan(make_mesh(mesh_cfg, devices), mesh_cfg)


# ---------------------------------------------------------------------------------- multi-host
def should_initialize_distributed(flag: str, environ: Mapping[str, str] | None = None) -> bool:
    """Decide whether to call ``jax.distributed.initialize()``.

    ``flag`` is ``"auto"``, ``"on"`` or ``"off"``. Auto turns it on when the environment says this
    process is one of several: a TPU VM slice with several workers (``TPU_WORKER_HOSTNAMES`` lists
    more than one host), an explicit coordinator address, or a SLURM / Open MPI job of more than
    one task.
    """
    if flag not in ("auto", "on", "off"):
        raise ConfigError(f"--distributed={flag!r}; allowed values: ['auto', 'on', 'off']")
    if flag != "auto":
        return flag == "on"
    env = os.environ if environ is None else environ
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return True
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(name, "1")) > 1:
                return True
        except ValueError:
            log.warning("ignoring non-integer %s=%r", name, env.get(name))
    return False


def check_process_args(coordinator: str | None, num_processes: int | None,
                       process_id: int | None) -> None:
    """ConfigError (naming the flag) unless the explicit multi-process flags are all set and sane."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        return
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be given with "
                          f"{', '.join(k for k in given if k not in missing)}; "
                          f"set all three of --coordinator, --num-processes, --process-id")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator={coordinator!r} is not HOST:PORT (e.g. localhost:12355)")
    if num_processes < 1:
        raise ConfigError(f"--num-processes={num_processes}; allowed values: integers >= 1")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id={process_id}; allowed values: 0 … {num_processes - 1} "
                          f"(--num-processes={num_processes})")


def maybe_initialize_distributed(flag: str = "auto", *, coordinator: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None,
                                 heartbeat_timeout_s: int | None = None) -> bool:
    """Initialise the JAX distributed runtime when launched as one of several processes.

    With ``coordinator``/``num_processes``/``process_id`` (``train.py --coordinator HOST:PORT
    --num-processes N --process-id I``, what ``python -m sparsejax.launch local`` passes) the
    runtime is started explicitly, e.g. several CPU processes on one machine; otherwise JAX's
    cluster detection (TPU VM metadata, SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``) fills them
    in. If a peer dies, the coordination service's heartbeat aborts every other process after
    ``heartbeat_timeout_s`` (JAX's default: 100 s) instead of leaving it blocked in a collective.
    """
    check_process_args(coordinator, num_processes, process_id)
    if heartbeat_timeout_s is not None and heartbeat_timeout_s < 1:
        # JAX aborts the process (SIGABRT, a C++ stack) on a value below 1.
        raise ConfigError(f"--heartbeat-timeout={heartbeat_timeout_s}; allowed values: seconds >= 1")
    explicit = coordinator is not None
    if flag == "off" and explicit:
        raise ConfigError("--distributed=off contradicts --coordinator/--num-processes/--process-id")
    if explicit or should_initialize_distributed(flag):
        kwargs = {}
        if heartbeat_timeout_s is not None:
            kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
        if explicit:
            # Cross-process collectives between CPU devices (the default in jax 0.10; explicit so
            # a laptop run does not depend on it). TPU and GPU clients ignore this setting.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            kwargs.update(coordinator_address=coordinator, num_processes=num_processes,
                          process_id=process_id)
        jax.distributed.initialize(**kwargs)
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False


def agreed_minimum(n: int) -> int:
    """The smallest ``n`` over all processes (every process calls this; one process: ``n``).

    For counts that must be equal for collectives to match: each process reads its own share of
    the validation records, so shares of uneven length give uneven batch counts, and a process
    that evaluated one batch more than its peers would wait for ever in that batch's all-reduce.
    """
    import jax

    if jax.process_count() == 1:
        return n
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int32(n))))
