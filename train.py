#!/usr/bin/env python
"""Train a sparse-activation transformer.

    python train.py --config configs/tiny_relu.py --workdir runs/tiny_relu [--set key=value ...]

Resumes automatically from the newest good checkpoint in --workdir (``--no-resume`` moves an
earlier run's files to WORKDIR/previous/ and starts over); refuses a workdir whose checkpoints
come from a different config unless ``--force``, and a workdir another trainer is using.
Exit codes: 0 done; 1 training failed (divergence, a checkpoint that could not be written, disk
full); 2 refused before training (bad config or input, workdir unusable or in use; nothing
written); 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint.
Library logging (orbax, absl) goes to WORKDIR/train_debug.log.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file in configs/ defining get_config()")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, plots")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.activation=silu (repeatable)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="ignore existing checkpoints and start from scratch")
    p.add_argument("--force", action="store_true",
                   help="resume even if the workdir's config differs from this one")
    p.add_argument("--distributed", default="auto", choices=("auto", "on", "off"),
                   help="call jax.distributed.initialize() (auto: when launched multi-host)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-process run without a cluster scheduler: the coordinator's address "
                        "(process 0's host); give with --num-processes and --process-id")
    p.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    p.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 … N-1")
    p.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                   help="abort when a peer process has been unresponsive this long (JAX default 100)")
    p.add_argument("--stop-timeout", type=float, default=90.0, metavar="SECONDS",
                   help="after SIGTERM/SIGINT, exit with one line if training has not reached a "
                        "step boundary this much later, e.g. blocked in a collective with a peer "
                        "that does not respond (default 90, below the local launcher's --grace; "
                        "0: wait for ever)")
    p.add_argument("--no-activation-logging", dest="log_activations", action="store_false",
                   help="skip the in-graph activation statistics (for overhead measurements)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _quiet_exit(workdir: str) -> None:
    """After the one-line error: send what background threads print at exit (orbax's asyncio
    tracebacks after a failed write) to the run's debug log instead of the console."""
    import os

    from sparsejax import storage

    sys.stderr.flush()
    path = storage.local_log_path(storage.path(workdir), "train_debug.log")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND) if path.exists() else os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    os.dup2(fd, 2)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stop_timeout < 0:
        print(f"config error: --stop-timeout={args.stop_timeout:g} must be >= 0 (0: wait for ever)",
              file=sys.stderr)
        return 2
    from sparsejax import lifecycle

    # Until the trainer handles them (from before its first write), SIGTERM / SIGINT during the
    # imports, the config and joining the other processes end the process with one line.
    with lifecycle.stop_before_start():
        cfg = _setup(args, lifecycle)
    if isinstance(cfg, int):
        return cfg
    code = _train(args, cfg)
    if code == 2 and _joined_other_processes():
        # A refusal (workdir in use, bad config for this run) in a multi-process job: at interpreter
        # exit jax.distributed's shutdown waits for every peer, tens of seconds when they are stuck
        # in their first collective. Nothing was written, so leave at once; the launcher (or the
        # cluster) sees the exit and stops the others.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _joined_other_processes() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax

    try:
        return jax.process_count() > 1
    except Exception:  # noqa: BLE001  (no backend: not a multi-process job)
        return False


def _setup(args, lifecycle):
    """The config, with the process ready to train; or an exit code after a one-line error."""
    lifecycle.die_with_parent()  # started by a sweep or the local launcher: end with it
    # Library warnings (absl, orbax, tfds) stay off the console; once the workdir exists they go
    # to WORKDIR/train_debug.log (trainer._debug_log). Our own messages are printed.
    lifecycle.quiet_console()
    logging.captureWarnings(True)  # Python warnings too (e.g. a compilation-cache write failing)
    import signal

    # With `ulimit -f`, an oversized write would kill the process silently; make it an OSError.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from sparsejax import config, sharding
    from sparsejax import configure

    try:
        cfg = configure.load(args.config, args.overrides)
        sharding.maybe_initialize_distributed(
            args.distributed, coordinator=args.coordinator, num_processes=args.num_processes,
            process_id=args.process_id, heartbeat_timeout_s=args.heartbeat_timeout)
    except config.ConfigError as err:
        print(f"config error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    from sparsejax import trainer  # noqa: F401  (imported here, under the early signal handler)

    return cfg


def _train(args, cfg) -> int:
    import jax

    from sparsejax import config, rundir, trainer

    try:
        summary = trainer.train(cfg, args.workdir, resume=args.resume, force=args.force,
                                progress=args.progress, log_activations=args.log_activations,
                                stop_timeout_s=args.stop_timeout or None)
    except trainer.Stopped as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    except config.ConfigError as err:
        print(f"config error: {_one_line(err)}", file=sys.stderr)
        return 2
    except rundir.RunDirError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except trainer.TrainingError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        _quiet_exit(args.workdir)
        return 1
    except OSError as err:  # disk full, file-size limit, permissions changed under the run
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: writing the run failed: {err.strerror or err}{where}", file=sys.stderr)
        _quiet_exit(args.workdir)
        return 1
    if jax.process_index() == 0:
        if summary.steps_run == 0:
            print(f"nothing to do: {summary.workdir} is already trained to step "
                  f"{summary.final_step} (train.steps={cfg.train.steps})")
        if math.isfinite(summary.final_loss):
            print(f"final step {summary.final_step}: loss {summary.final_loss:.4f}")
        if summary.final_activation_ratio is not None:
            print(f"final activation ratio (mean over layers): {summary.final_activation_ratio:.4f}")
        if summary.plot_path is not None:
            print(f"activation-ratio plot: {summary.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
