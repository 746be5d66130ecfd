"""Command line of ``python -m sparsejax.launch``."""

from __future__ import annotations

import argparse
import sys

from sparsejax.launch import local


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_args = _split(argv)
    p = argparse.ArgumentParser(prog="python -m sparsejax.launch",
                                description="start train.py on several processes; train.py's "
                                            "arguments follow '--'")
    sub = p.add_subparsers(dest="engine", required=True)
    lp = sub.add_parser("local", help="N CPU processes on this machine (jax.distributed over gloo)")
    lp.add_argument("--processes", type=int, default=2)
    lp.add_argument("--devices-per-process", type=int, default=4)
    lp.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    lp.add_argument("--heartbeat-timeout", type=int,
                    help="seconds before a process whose peer went silent aborts (JAX default 100)")
    lp.add_argument("--grace", type=float, default=120.0,
                    help="seconds to wait after forwarding SIGTERM/SIGINT before SIGKILL")
    args = p.parse_args(own)
    if not train_args:
        p.error("give train.py's arguments after '--', e.g. -- --config configs/tiny_relu.py --workdir runs/x")
    try:
        if args.engine == "local":
            return local.run(train_args, args.processes, args.devices_per_process, port=args.port,
                             heartbeat_timeout=args.heartbeat_timeout, grace=args.grace)
    except local.LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2
