#!/usr/bin/env python
"""Train a sparse-activation transformer.

    python train.py --config configs/tiny_relu.py --workdir runs/tiny_relu [--set key=value ...]

Resumes automatically from the newest readable checkpoint in --workdir (``--no-resume`` starts
over); refuses a workdir whose checkpoints come from a different config unless ``--force``.
Exit codes: 0 done, 1 error, 2 bad config, 143 stopped by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--no-activation-logging", dest="log_activations", action="store_false",
                   help="skip the in-graph activation statistics (for overhead measurements)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparsejax import config, sharding, trainer  # after argparse: --help stays fast

    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    sharding.maybe_initialize_distributed(args.distributed)
    import jax

    try:
        summary = trainer.train(cfg, args.workdir, resume=args.resume, force=args.force,
                                progress=args.progress, log_activations=args.log_activations)
    except trainer.Preempted as stop:
        print(str(stop), file=sys.stderr)
        return trainer.PREEMPTED_EXIT_CODE
    except (trainer.TrainingError, config.ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(f"final step {summary.final_step}: loss {summary.final_loss:.4f}")
        if summary.final_activation_ratio is not None:
            print(f"final activation ratio (mean over layers): {summary.final_activation_ratio:.4f}")
        if summary.plot_path is not None:
            print(f"activation-ratio plot: {summary.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
