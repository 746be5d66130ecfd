"""The launcher targets: one table of where training runs, read by ``python -m sparsejax.launch``
(one training run) and ``python -m sparsejax.sweep --launch`` (one job per sweep run).

A :class:`Target` is a name, a help line, its options (:class:`Option`: flag, type, default,
help, and whether a sweep's ``--launch-opts`` takes it) and its builders:

* ``launch(args, train_args, slice, num_slices) -> exit code``: what ``python -m sparsejax.launch
  NAME ... -- TRAIN_ARGS`` does, by the commands and manifests of :mod:`sparsejax.launch.cloud`
  (or the processes of :mod:`sparsejax.launch.local`);
* ``sweep_job(opts, slice, job name, train_args, program, workdir) -> [argv, ...]``: the commands
  that submit one sweep run (``None``: a sweep cannot submit through this target).

``local`` in a sweep is the sweep's own runner (train here, one run after another), so it is a
sweep target without a ``sweep_job`` builder and without ``--launch-opts``.

A default lives here and only here: ``--max-restarts`` is :data:`MAX_RESTARTS` for ``launch`` and
``sweep`` alike, and the help of both shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import subprocess
import sys
from typing import Any, Callable, Optional, Sequence

from sparsejax.launch import cloud, local

# How many times xpk / the JobSet restart a failed job before giving up. train.py resumes from
# its last checkpoint (and saves one on SIGTERM), so a restart after a preemption or a host
# failure loses at most the steps since that checkpoint, while a deterministic failure costs at
# most three more starts.
MAX_RESTARTS = 3


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option of a target (argparse's vocabulary)."""

    flag: str
    help: str = ""
    type: Optional[Callable] = None
    default: Any = None
    required: bool = False
    action: Optional[str] = None  # "store_true" / "store_false"
    dest: Optional[str] = None
    minimum: Optional[int] = None  # integers >= minimum (checked by check_options)
    in_sweep: bool = True  # also in a sweep's --launch-opts (False: a sweep sets it per run)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kw: dict = {"help": self.help}
        if self.action:
            kw["action"] = self.action
        else:
            kw["type"] = self.type
            if self.default is not None:
                kw["default"] = self.default
                kw["help"] = f"{self.help} (default: {self.default})".lstrip()
        if self.required:
            kw["required"] = True
        if self.dest:
            kw["dest"] = self.dest
        parser.add_argument(self.flag, **kw)

    @property
    def attr(self) -> str:
        return self.dest or self.flag.lstrip("-").replace("-", "_")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    help: str
    options: tuple[Option, ...]
    launch: Callable[..., int]
    sweep_job: Optional[Callable[..., list[list[str]]]] = None
    sweep: bool = False  # a choice of ``python -m sparsejax.sweep --launch``
    tool: Optional[str] = None  # the program ``--run`` needs on PATH

    def add_options(self, parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
        for option in self.options:
            if option.in_sweep or not sweep:
                option.add_to(parser)


# ----------------------------------------------------------------------------- the options
def _tpu_type(required: bool = True) -> Option:
    return Option("--tpu-type", "e.g. v5e-256 (= v5litepod-256), v4-128, v5p-64", required=required)


NAME = Option("--name", "TPU VM / workload / JobSet name", required=True, in_sweep=False)
RUN = Option("--run", "execute (default: print only)", action="store_true")
PROJECT = Option("--project", "Google Cloud project (default: gcloud's)")
IMAGE = Option("--image", "container image holding this repository", required=True)
NUM_SLICES = Option("--num-slices", "TPU slices per job", type=int, default=1, minimum=1)
MAX_RESTARTS_OPTION = Option("--max-restarts", "restarts of a failed job (train.py resumes from "
                             "its checkpoints)", type=int, default=MAX_RESTARTS, minimum=0)

LOCAL_OPTIONS = (
    Option("--processes", "CPU processes", type=int, default=2, minimum=1),
    Option("--devices-per-process", "CPU devices per process", type=int, default=4, minimum=1),
    Option("--port", "coordinator port (default: a free one)", type=int),
    Option("--heartbeat-timeout", "seconds before a process whose peer went silent aborts "
           "(JAX default 100)", type=int),
    Option("--grace", "seconds to wait after forwarding SIGTERM/SIGINT before SIGKILL",
           type=float, default=120.0),
)
TPU_VM_OPTIONS = (
    _tpu_type(), NAME, RUN, PROJECT,
    Option("--zone", "e.g. us-west4-a", required=True),
    Option("--spot", "spot (preemptible) capacity", action="store_true"),
    Option("--no-create", "the slice exists already", action="store_false", dest="create",
           in_sweep=False),
)
XPK_OPTIONS = (
    _tpu_type(), NAME, RUN, PROJECT, Option("--cluster", "the GKE cluster", required=True), IMAGE,
    Option("--zone", "the cluster's zone (default: xpk's)"), NUM_SLICES, MAX_RESTARTS_OPTION,
)
JOBSET_OPTIONS = (
    _tpu_type(), NAME, RUN, PROJECT, IMAGE, NUM_SLICES, MAX_RESTARTS_OPTION,
    Option("--out", "write the manifest here (default: stdout)", in_sweep=False),
)


def check_options(target: Target, ns: argparse.Namespace) -> None:
    """Every option's range (CloudError, one line): before anything is printed or submitted."""
    for option in target.options:
        value = getattr(ns, option.attr, None)
        if option.minimum is not None and value is not None and value < option.minimum:
            raise cloud.CloudError(f"{option.flag}={value}; allowed values: integers >= "
                                   f"{option.minimum}")


# ---------------------------------------------------------------------------- the builders
def need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise cloud.CloudError(f"{tool} is not on PATH; install it, or omit --run to print the commands")


def _launch_local(args, train_args: list[str], sl=None, slices: int = 1) -> int:
    return local.run(train_args, args.processes, args.devices_per_process, port=args.port,
                     heartbeat_timeout=args.heartbeat_timeout, grace=args.grace)


def _launch_tpu_vm(args, train_args: list[str], sl: cloud.Slice, slices: int) -> int:
    steps = cloud.tpu_vm_steps(sl, cloud.TpuVm(args.name, args.zone, args.project, args.spot),
                               train_args, create=args.create)
    if not args.run:
        print(cloud.tpu_vm_script(steps), end="")
        return 0
    need(TARGETS["tpu-vm"].tool)
    for what, cmd in steps:
        print(f"# {what}\n{shlex.join(cmd)}" if what else shlex.join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=local.REPO).returncode
        if rc:
            print(f"error: {cmd[0]} exited {rc}", file=sys.stderr)
            return rc
    return 0


def _launch_xpk(args, train_args: list[str], sl: cloud.Slice, slices: int) -> int:
    cmd = cloud.xpk_command(sl, train_args, workload=args.name, cluster=args.cluster,
                            image=args.image, num_slices=slices, project=args.project,
                            zone=args.zone, max_restarts=args.max_restarts)
    print(shlex.join(cmd))
    if args.run:
        need(TARGETS["xpk"].tool)
        return subprocess.run(cmd, cwd=local.REPO).returncode
    return 0


def _launch_jobset(args, train_args: list[str], sl: cloud.Slice, slices: int) -> int:
    manifest = cloud.to_yaml(cloud.jobset_manifest(sl, train_args, name=args.name, image=args.image,
                                                   num_slices=slices,
                                                   max_restarts=args.max_restarts))
    if args.out:
        from sparsejax import rundir  # noqa: PLC0415 - only when writing a file

        rundir.atomic_write(args.out, manifest)
    else:
        print(manifest, end="")
    if args.run:
        need(TARGETS["jobset"].tool)
        return subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True).returncode
    return 0


def _sweep_xpk(ns, sl: cloud.Slice, name: str, train_args: list[str], program: list[str],
               workdir: str) -> list[list[str]]:
    return [cloud.xpk_command(sl, train_args, workload=name, cluster=ns.cluster, image=ns.image,
                              num_slices=ns.num_slices, project=ns.project, zone=ns.zone,
                              max_restarts=ns.max_restarts, program=program)]


def tpu_vm_job_steps(sl: cloud.Slice, vm: cloud.TpuVm, job: list[str], workdir: str):
    """The TPU VM flow for one sweep run: create if absent, copy, install, start in the
    background on every worker unless that workdir's trainer already runs there."""
    steps = cloud.tpu_vm_steps(sl, vm, [], create=True)
    describe = cloud._gcloud("describe", vm.name, vm=vm)
    what, create = steps[0]
    steps[0] = (what, ["bash", "-c", f"{shlex.join(describe)} >/dev/null 2>&1 || {shlex.join(create)}"])
    ssh_all = cloud._gcloud("ssh", vm.name, vm=vm) + ["--worker=all"]
    start = (f"cd {vm.code_dir} && if pgrep -f -- {shlex.quote('--workdir ' + workdir)} >/dev/null; "
             f"then echo already running; else nohup {shlex.join(job)} > job.log 2>&1 & fi")
    steps[-1] = ("start the job on every worker", ssh_all + [f"--command={start}"])
    return steps


def _sweep_tpu_vm(ns, sl: cloud.Slice, name: str, train_args: list[str], program: list[str],
                  workdir: str) -> list[list[str]]:
    vm = cloud.TpuVm(name=name, zone=ns.zone, project=ns.project, spot=ns.spot)
    job = cloud.train_argv(train_args, multi_host=sl.hosts > 1, program=program)
    return [argv for _, argv in tpu_vm_job_steps(sl, vm, job, workdir)]


# ------------------------------------------------------------------------------- the table
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("local", "N CPU processes on this machine (jax.distributed over gloo)", LOCAL_OPTIONS,
           _launch_local, sweep=True),
    Target("tpu-vm", "a Cloud TPU VM slice: gcloud create, copy, install, ssh --worker=all",
           TPU_VM_OPTIONS, _launch_tpu_vm, _sweep_tpu_vm, sweep=True, tool="gcloud"),
    Target("xpk", "a GKE TPU cluster: xpk workload create", XPK_OPTIONS, _launch_xpk, _sweep_xpk,
           sweep=True, tool="xpk"),
    Target("jobset", "a GKE TPU cluster: a JobSet manifest (kubectl apply)", JOBSET_OPTIONS,
           _launch_jobset, tool="kubectl"),
)}


def sweep_targets() -> tuple[str, ...]:
    """The choices of ``python -m sparsejax.sweep --launch`` ("local" first: the default)."""
    return tuple(name for name, t in TARGETS.items() if t.sweep)


def get(name: str, *, sweep: bool = False) -> Target:
    """The target ``name`` (a sweep's: ``sweep=True``), or CloudError naming the allowed ones."""
    allowed = list(sweep_targets()) if sweep else list(TARGETS)
    if name not in allowed:
        raise cloud.CloudError(f"--launch={name!r}; allowed values: {allowed}" if sweep
                               else f"target {name!r}; allowed values: {allowed}")
    return TARGETS[name]


def sweep_opts_parser(target: Target, error: Callable[[str], None]) -> argparse.ArgumentParser:
    """The parser of a sweep's ``--launch-opts`` for ``target``: its options a sweep takes."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, raised: the sweep prints it and exits 2
            error(message)

    p = Parser(prog=f"--launch {target.name} --launch-opts", add_help=False)
    target.add_options(p, sweep=True)
    return p


def parse_sweep_opts(name: str, opts: Sequence[str]) -> argparse.Namespace:
    """A sweep's ``--launch-opts`` words for target ``name`` (CloudError, one line)."""
    target = get(name, sweep=True)
    if target.sweep_job is None:
        raise cloud.CloudError(f"--launch {name} runs the sweep here and takes no --launch-opts")

    def error(message):
        raise cloud.CloudError(f"--launch-opts for {name}: {message}")

    ns = sweep_opts_parser(target, error).parse_args(list(opts))
    check_options(target, ns)
    return ns
