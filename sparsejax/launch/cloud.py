"""TPU slices: topology table, and the commands of the existing tools that launch on them.

* :func:`tpu_vm_steps`: the documented Cloud TPU VM flow — ``gcloud compute tpus tpu-vm create``,
  copy the code to every worker (``scp --worker=all``), install the pinned requirements plus
  ``jax[tpu]`` on every worker, and ``ssh --worker=all`` to start ``train.py`` with the same
  arguments on all of them (JAX finds the other workers from the TPU metadata).
* :func:`xpk_command`: ``xpk workload create`` for a GKE cluster of TPU slices (xpk builds the
  JobSet, the multi-host and multi-slice environment, and the Kueue admission).
* :func:`jobset_manifest`: the JobSet that does the same for plain ``kubectl apply``.

Nothing here is a scheduler: each function returns commands or a manifest; ``--run`` executes
them one after another and stops at the first failure.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Sequence


class CloudError(ValueError):
    """Bad input for a cloud launch (one line, exit 2)."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation as Cloud TPU names and packages it."""

    name: str                # the accelerator-type prefix gcloud uses
    cores_per_chip: int      # the accelerator-type suffix counts TensorCores for v4/v5p, chips for v5e/v6e
    chips_per_host: int      # chips per VM in a multi-host slice
    single_host_chips: int   # the largest slice served by one VM
    sizes: tuple[int, ...]   # allowed suffixes
    runtime: str             # TPU VM software version (gcloud --version)
    gke_accelerator: str     # GKE node label cloud.google.com/gke-tpu-accelerator
    topology_dims: int       # 2-D (v5e, v6e) or 3-D (v4, v5p) torus


_POW2 = tuple(2 ** i for i in range(0, 13))
GENERATIONS = {
    "v4": Generation("v4", 2, 4, 4, tuple(n for n in _POW2 if 8 <= n <= 4096), "tpu-ubuntu2204-base",
                     "tpu-v4-podslice", 3),
    "v5litepod": Generation("v5litepod", 1, 4, 8, (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite",
                            "tpu-v5-lite-podslice", 2),
    "v5p": Generation("v5p", 2, 4, 4, tuple(n for n in _POW2 if 8 <= n <= 4096) + (6144, 8960, 12288),
                      "v2-alpha-tpuv5", "tpu-v5p-slice", 3),
    "v6e": Generation("v6e", 1, 4, 8, (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e",
                      "tpu-v6e-slice", 2),
}
ALIASES = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator_type: str  # as gcloud and xpk spell it, e.g. v5litepod-256
    generation: Generation
    chips: int
    hosts: int
    chips_per_host: int

    @property
    def topology(self) -> str:
        """The GKE topology label: 2-D (v5e, v6e: 16x16) or 3-D (v4, v5p: 4x4x8), the smallest
        axis doubled until the axes hold every chip."""
        if self.chips < 4:
            return "x".join(["1"] * (self.generation.topology_dims - 1) + [str(self.chips)])
        dims = [2, 2] if self.generation.topology_dims == 2 else [1, 2, 2]
        while _prod(dims) < self.chips:
            dims[dims.index(min(dims))] *= 2
            dims.sort()
        if dims[0] == 1:  # 4 chips in 3-D: written 2x2x1
            dims = dims[1:] + [1]
        return "x".join(map(str, dims))


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def parse_slice(accelerator_type: str) -> Slice:
    """``v5litepod-256`` (or ``v5e-256``, ``v4-128``, ``v5p-512``, ``v6e-64``) -> chips and hosts."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type or "")
    allowed = ", ".join(f"{g}-N" for g in GENERATIONS)
    if not m:
        raise CloudError(f"--tpu-type={accelerator_type!r} is not GENERATION-SIZE; allowed: {allowed} "
                         f"(v5e-N is v5litepod-N)")
    prefix, size = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if prefix not in GENERATIONS:
        raise CloudError(f"--tpu-type={accelerator_type!r}: generation {m.group(1)!r} unknown; "
                         f"allowed: {allowed}")
    gen = GENERATIONS[prefix]
    if size not in gen.sizes:
        raise CloudError(f"--tpu-type={accelerator_type!r}: size {size} is not a {prefix} slice; "
                         f"allowed sizes: {list(gen.sizes)}")
    chips = size // gen.cores_per_chip
    if chips <= gen.single_host_chips:
        return Slice(f"{prefix}-{size}", gen, chips, 1, chips)
    return Slice(f"{prefix}-{size}", gen, chips, chips // gen.chips_per_host, gen.chips_per_host)


def check_batch(sl: Slice, num_slices: int, batch_size: int) -> None:
    """The global batch must split evenly over every host's and every chip's rows."""
    devices = sl.chips * num_slices
    if batch_size % devices:
        raise CloudError(f"train.batch_size={batch_size} is not divisible by the {devices} chips of "
                         f"{num_slices} × {sl.accelerator_type}; choose a multiple of {devices}")


def check_workdir(workdir: str | None, sl: Slice, num_slices: int) -> None:
    """Several hosts must share one run directory: a bucket, not each host's own disk (where
    every host would write its own partial run: checkpoints of its shards, no metrics)."""
    from sparsejax import storage

    hosts = sl.hosts * num_slices
    if workdir and hosts > 1 and not storage.is_remote(workdir):
        raise CloudError(f"--workdir={workdir!r} must be a gs:// URL for {num_slices} × "
                         f"{sl.accelerator_type} ({hosts} hosts): every host writes the same run "
                         f"directory, and a local path is a different directory on each host")


# ----------------------------------------------------------------------------- train commands
TRAIN_PROGRAM = ("python3", "train.py")


def train_argv(train_args: Sequence[str], *, multi_host: bool,
               program: Sequence[str] = TRAIN_PROGRAM) -> list[str]:
    """``train.py`` and its arguments, identical on every worker; ``--distributed on`` for slices
    of several hosts, so a missing TPU environment is an error instead of a single-host run.
    ``program`` may be a wrapper that passes the arguments on (``python3 -m sparsejax.launch job
    ... --``)."""
    argv = [*program, *train_args]
    if multi_host and "--distributed" not in train_args:
        argv += ["--distributed", "on"]
    return argv


def jax_tpu_requirement() -> str:
    """``jax[tpu]`` pinned to the jax this checkout was tested with (libtpu must match it)."""
    import jax

    return f"jax[tpu]=={jax.__version__}"


@dataclasses.dataclass(frozen=True)
class TpuVm:
    name: str
    zone: str
    project: str | None = None
    spot: bool = False
    code_dir: str = "sparsejax"


def _gcloud(*args: str, vm: TpuVm) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={vm.zone}"]
    if vm.project:
        cmd.append(f"--project={vm.project}")
    return cmd


def tpu_vm_steps(sl: Slice, vm: TpuVm, train_args: Sequence[str], *, archive: str = "sparsejax.tar.gz",
                 create: bool = True) -> list[tuple[str, list[str]]]:
    """(what, argv) of each step of the TPU VM flow, in order."""
    steps = []
    if create:
        create_cmd = _gcloud("create", vm.name, vm=vm) + [
            f"--accelerator-type={sl.accelerator_type}", f"--version={sl.generation.runtime}"]
        if vm.spot:
            create_cmd.append("--spot")
        steps.append(("create the slice", create_cmd))
    ssh_all = _gcloud("ssh", vm.name, vm=vm) + ["--worker=all"]
    steps.append(("copy the code to every worker (git archive of HEAD)",
                  ["bash", "-c", f"git archive --format=tar.gz -o {shlex.quote(archive)} HEAD"]))
    steps.append(("", _gcloud("scp", archive, f"{vm.name}:", vm=vm) + ["--worker=all"]))
    setup = (f"mkdir -p {vm.code_dir} && tar -xzf {archive} -C {vm.code_dir} && cd {vm.code_dir} && "
             f"python3 -m pip install -q -r requirements.txt {shlex.quote(jax_tpu_requirement())} "
             f"gcsfs")  # gcsfs: gs:// workdirs through etils.epath / fsspec
    steps.append(("install the pinned requirements and jax[tpu] on every worker",
                  ssh_all + [f"--command={setup}"]))
    run = f"cd {vm.code_dir} && {shlex.join(train_argv(train_args, multi_host=sl.hosts > 1))}"
    steps.append((f"train on all {sl.hosts} worker(s), same arguments", ssh_all + [f"--command={run}"]))
    return steps


def tpu_vm_script(steps: Sequence[tuple[str, list[str]]]) -> str:
    lines = ["#!/usr/bin/env bash", "set -euo pipefail"]
    for what, argv in steps:
        if what:
            lines.append(f"# {what}")
        lines.append(shlex.join(argv))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- GKE
_K8S_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")


def check_name(name: str, flag: str = "--name") -> str:
    if not _K8S_NAME.match(name or ""):
        raise CloudError(f"{flag}={name!r} must be lower-case letters, digits and '-', start with a "
                         f"letter, at most 40 characters (it names a Kubernetes object)")
    return name


def xpk_command(sl: Slice, train_args: Sequence[str], *, workload: str, cluster: str, image: str,
                max_restarts: int, num_slices: int = 1, project: str | None = None,
                zone: str | None = None, program: Sequence[str] = TRAIN_PROGRAM) -> list[str]:
    """``xpk workload create``: xpk sets the multi-host (and multi-slice) environment itself.
    ``max_restarts`` has no default here: it is the launcher table's
    (``sparsejax.launch.targets.MAX_RESTARTS``)."""
    check_name(workload, "--name")
    cmd = ["xpk", "workload", "create", f"--workload={workload}", f"--cluster={cluster}",
           f"--tpu-type={sl.accelerator_type}", f"--num-slices={num_slices}",
           f"--docker-image={image}", f"--max-restarts={max_restarts}",
           f"--command={shlex.join(train_argv(train_args, multi_host=sl.hosts * num_slices > 1, program=program))}"]
    if project:
        cmd.append(f"--project={project}")
    if zone:
        cmd.append(f"--zone={zone}")
    return cmd


def jobset_manifest(sl: Slice, train_args: Sequence[str], *, name: str, image: str,
                    max_restarts: int, num_slices: int = 1, workdir_in_image: str = "/app") -> dict:
    """A JobSet running ``train.py`` on every host of ``num_slices`` slices (GKE TPU node pools).

    GKE's TPU webhook injects ``TPU_WORKER_ID`` / ``TPU_WORKER_HOSTNAMES`` into JobSet pods, which
    ``jax.distributed.initialize()`` reads; several slices also need the MEGASCALE variables.
    """
    check_name(name, "--name")
    command = f"cd {workdir_in_image} && " + shlex.join(
        train_argv(train_args, multi_host=sl.hosts * num_slices > 1))
    env = [{"name": "JAX_PLATFORMS", "value": "tpu,cpu"}]
    if num_slices > 1:
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": f"{name}-slice-0-0.{name}"},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
            {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
        ]
    container = {
        "name": "train", "image": image, "command": ["bash", "-c", command], "env": env,
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": sl.chips_per_host}},
    }
    pod = {"spec": {
        "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet", "restartPolicy": "Never",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": sl.generation.gke_accelerator,
                         "cloud.google.com/gke-tpu-topology": sl.topology},
        "containers": [container]}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
        "metadata": {"name": name, "annotations": {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "replicatedJobs": [{"name": "slice", "replicas": num_slices, "template": {"spec": {
                "parallelism": sl.hosts, "completions": sl.hosts, "backoffLimit": 0,
                "template": pod}}}],
        },
    }


def to_yaml(manifest: dict) -> str:
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False)
