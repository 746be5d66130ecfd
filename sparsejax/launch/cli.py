"""Command line of ``python -m sparsejax.launch`` (engines: :mod:`sparsejax.launch`).

    python -m sparsejax.launch local  --processes 2 --devices-per-process 4 -- TRAIN_ARGS
    python -m sparsejax.launch tpu-vm --tpu-type v5e-16 --name NAME --zone ZONE [--run] -- TRAIN_ARGS
    python -m sparsejax.launch xpk    --tpu-type v5e-256 --cluster C --name W --image IMG [--run] -- TRAIN_ARGS
    python -m sparsejax.launch jobset --tpu-type v5e-256 --name N --image IMG [--out FILE] [--run] -- TRAIN_ARGS

TRAIN_ARGS are train.py's (``--config ... --workdir ... --set ...``), the same on every host.
The cloud engines print what they would run; ``--run`` runs it. Bad input: one line, exit 2.
The targets, their options and defaults are :data:`sparsejax.launch.targets.TARGETS`, the table
``python -m sparsejax.sweep --launch`` reads too.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from sparsejax.launch import cloud, local, targets


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
    for target in targets.TARGETS.values():
        target.add_options(sub.add_parser(target.name, help=target.help))
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
    targets.check_options(targets.TARGETS["local"], args)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_args = _split(argv)
    p = _parser()
    args = p.parse_args(own)
    if not train_args:
        p.error("give train.py's arguments after '--', e.g. -- --config configs/tiny_relu.py --workdir runs/x")
    try:
        if args.engine == "job":
            from sparsejax.launch import jobs

            return jobs.run_job(args.run_name, args.marker, train_args)
        target = targets.TARGETS[args.engine]
        if args.engine == "local":
            _check_local(args)
            return target.launch(args, train_args)
        sl = cloud.parse_slice(args.tpu_type)
        targets.check_options(target, args)
        slices = getattr(args, "num_slices", 1)
        cfg = _train_config(train_args)
        cloud.check_batch(sl, slices, cfg.train.batch_size)
        cloud.check_name(args.name)
        _check_cloud(args, train_args, sl, slices)
        print(f"# {cfg.name}: {slices} × {sl.accelerator_type} = {slices * sl.hosts} host(s) × "
              f"{sl.chips_per_host} chips; train.py runs on every host with the same arguments",
              file=sys.stderr)
        return target.launch(args, train_args, sl, slices)
    except (local.LaunchError, cloud.CloudError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
