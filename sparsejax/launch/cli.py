"""Command line of ``python -m sparsejax.launch`` (engines: :mod:`sparsejax.launch`).

    python -m sparsejax.launch local  --processes 2 --devices-per-process 4 -- TRAIN_ARGS
    python -m sparsejax.launch tpu-vm --tpu-type v5e-16 --name NAME --zone ZONE [--run] -- TRAIN_ARGS
    python -m sparsejax.launch xpk    --tpu-type v5e-256 --cluster C --name W --image IMG [--run] -- TRAIN_ARGS
    python -m sparsejax.launch jobset --tpu-type v5e-256 --name N --image IMG [--out FILE] [--run] -- TRAIN_ARGS

TRAIN_ARGS are train.py's (``--config ... --workdir ... --set ...``), the same on every host.
The cloud engines print what they would run; ``--run`` runs it. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import shutil
import subprocess
import sys

from sparsejax.launch import cloud, local


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: argument --grace: invalid float value``), exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m sparsejax.launch",
                                description="start train.py on several processes or hosts; "
                                            "train.py's arguments follow '--'")
    sub = p.add_subparsers(dest="engine", required=True)
    lp = sub.add_parser("local", help="N CPU processes on this machine (jax.distributed over gloo)")
    lp.add_argument("--processes", type=int, default=2)
    lp.add_argument("--devices-per-process", type=int, default=4)
    lp.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    lp.add_argument("--heartbeat-timeout", type=int,
                    help="seconds before a process whose peer went silent aborts (JAX default 100)")
    lp.add_argument("--grace", type=float, default=120.0,
                    help="seconds to wait after forwarding SIGTERM/SIGINT before SIGKILL")
    for engine, what in (("tpu-vm", "a Cloud TPU VM slice: gcloud create, copy, install, ssh --worker=all"),
                         ("xpk", "a GKE TPU cluster: xpk workload create"),
                         ("jobset", "a GKE TPU cluster: a JobSet manifest (kubectl apply)")):
        sp = sub.add_parser(engine, help=what)
        sp.add_argument("--tpu-type", required=True, help="e.g. v5e-256 (= v5litepod-256), v4-128, v5p-64")
        sp.add_argument("--name", required=True, help="TPU VM / workload / JobSet name")
        sp.add_argument("--run", action="store_true", help="execute (default: print only)")
        sp.add_argument("--project")
        if engine == "tpu-vm":
            sp.add_argument("--zone", required=True)
            sp.add_argument("--spot", action="store_true")
            sp.add_argument("--no-create", dest="create", action="store_false",
                            help="the slice exists already")
        else:
            sp.add_argument("--image", required=True, help="container image holding this repository")
            sp.add_argument("--num-slices", type=int, default=1)
            sp.add_argument("--max-restarts", type=int, default=0)
        if engine == "xpk":
            sp.add_argument("--cluster", required=True)
            sp.add_argument("--zone")
        if engine == "jobset":
            sp.add_argument("--out", help="write the manifest here (default: stdout)")
    jp = sub.add_parser("job", help="(on each host of a sweep job) train.py, then the sweep's marker")
    jp.add_argument("--run-name", required=True)
    jp.add_argument("--marker", required=True)
    return p


def _train_config(train_args: list[str]):
    """The config train.py will load (to check the batch against the slice before launching)."""
    from sparsejax import config
    from sparsejax import configure

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("--workdir")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    ns, _ = p.parse_known_args(train_args)
    if not ns.config or not ns.workdir:
        raise cloud.CloudError("train.py's arguments after '--' must include --config and --workdir")
    path = ns.config if ns.config.startswith("/") else str(local.REPO / ns.config)
    try:
        return configure.load(path, ns.overrides)
    except config.ConfigError as err:
        raise cloud.CloudError(f"config error: {str(err).splitlines()[0]}") from None


def _check_local(args) -> None:
    """Every option of ``local``, before any process starts (one line, exit 2)."""
    if args.processes < 1:
        raise local.LaunchError(f"--processes={args.processes}; allowed values: integers >= 1")
    if args.devices_per_process < 1:
        raise local.LaunchError(f"--devices-per-process={args.devices_per_process}; allowed values: "
                                f"integers >= 1")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise local.LaunchError(f"--port={args.port}; allowed values: 1 … 65535 (default: a free port)")
    if args.heartbeat_timeout is not None and args.heartbeat_timeout < 1:
        raise local.LaunchError(f"--heartbeat-timeout={args.heartbeat_timeout}; allowed values: "
                                f"seconds >= 1")
    if not args.grace > 0:  # also NaN; inf (wait for ever) is allowed
        raise local.LaunchError(f"--grace={args.grace}; allowed values: seconds > 0 (the time the "
                                f"processes get to save after SIGTERM)")


def _check_cloud(args, train_args: list[str], sl, slices: int) -> None:
    """Every option of the cloud engines, before anything is printed, written or submitted."""
    if getattr(args, "max_restarts", 0) < 0:
        raise cloud.CloudError(f"--max-restarts={args.max_restarts}; allowed values: integers >= 0")
    cloud.check_workdir(_train_workdir(train_args), sl, slices)
    out = getattr(args, "out", None)
    if out:
        from sparsejax import rundir, storage

        if not storage.is_remote(out):
            path = pathlib.Path(out)
            if path.is_dir():
                raise cloud.CloudError(f"--out={out} is a directory; give a file path such as "
                                       f"{path / 'jobset.yaml'}")
            if not path.parent.is_dir():
                raise cloud.CloudError(f"--out={out}: directory {path.parent} does not exist")
        try:
            rundir.check_writable_dir(storage.path(out).parent, "--out directory")
        except rundir.RunDirError as err:
            raise cloud.CloudError(str(err)) from None


def _train_workdir(train_args: list[str]) -> str | None:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--workdir")
    return p.parse_known_args(train_args)[0].workdir


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise cloud.CloudError(f"{tool} is not on PATH; install it, or omit --run to print the commands")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_args = _split(argv)
    p = _parser()
    args = p.parse_args(own)
    if not train_args:
        p.error("give train.py's arguments after '--', e.g. -- --config configs/tiny_relu.py --workdir runs/x")
    try:
        if args.engine == "local":
            _check_local(args)
            return local.run(train_args, args.processes, args.devices_per_process, port=args.port,
                             heartbeat_timeout=args.heartbeat_timeout, grace=args.grace)
        if args.engine == "job":
            from sparsejax.launch import jobs

            return jobs.run_job(args.run_name, args.marker, train_args)
        sl = cloud.parse_slice(args.tpu_type)
        slices = getattr(args, "num_slices", 1)
        if slices < 1:
            raise cloud.CloudError(f"--num-slices={slices}; allowed values: integers >= 1")
        cfg = _train_config(train_args)
        cloud.check_batch(sl, slices, cfg.train.batch_size)
        cloud.check_name(args.name)
        _check_cloud(args, train_args, sl, slices)
        print(f"# {cfg.name}: {slices} × {sl.accelerator_type} = {slices * sl.hosts} host(s) × "
              f"{sl.chips_per_host} chips; train.py runs on every host with the same arguments",
              file=sys.stderr)
        if args.engine == "tpu-vm":
            steps = cloud.tpu_vm_steps(sl, cloud.TpuVm(args.name, args.zone, args.project, args.spot),
                                       train_args, create=args.create)
            if not args.run:
                print(cloud.tpu_vm_script(steps), end="")
                return 0
            _need("gcloud")
            for what, cmd in steps:
                print(f"# {what}\n{shlex.join(cmd)}" if what else shlex.join(cmd), flush=True)
                rc = subprocess.run(cmd, cwd=local.REPO).returncode
                if rc:
                    print(f"error: {cmd[0]} exited {rc}", file=sys.stderr)
                    return rc
            return 0
        if args.engine == "xpk":
            cmd = cloud.xpk_command(sl, train_args, workload=args.name, cluster=args.cluster,
                                    image=args.image, num_slices=slices, project=args.project,
                                    zone=args.zone, max_restarts=args.max_restarts)
            print(shlex.join(cmd))
            if args.run:
                _need("xpk")
                return subprocess.run(cmd, cwd=local.REPO).returncode
            return 0
        manifest = cloud.to_yaml(cloud.jobset_manifest(sl, train_args, name=args.name, image=args.image,
                                                       num_slices=slices, max_restarts=args.max_restarts))
        if args.out:
            from sparsejax import rundir

            rundir.atomic_write(args.out, manifest)
        else:
            print(manifest, end="")
        if args.run:
            _need("kubectl")
            return subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True).returncode
        return 0
    except (local.LaunchError, cloud.CloudError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
