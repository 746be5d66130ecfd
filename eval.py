#!/usr/bin/env python
"""Measure the activation sparsity of a trained run, checkpoint by checkpoint.

    python eval.py --workdir runs/tiny_relu [--checkpoints all|last|STEP,...]
                   [--metrics zero,fat,topk,topk_global,cett,cett_ppl] [--p 1] [--out results.json]

Writes results.json (per checkpoint, per metric: mean and per-layer activation ratio, loss and
perplexity ratio of the sparse pass, dead neurons, chunk-level sparsity, magnitude histograms),
results.csv (tidy rows) and PNG plots next to it (default: WORKDIR/eval/results.json).
Definitions: docs/sparsity_metrics_and_laws.md (Sparsing Law paper); see sparsejax/evaluation.py.
Read-only on the run: safe while its trainer is still writing checkpoints.
Exit codes: 0 done, 1 error, 2 bad arguments or a missing/incompatible workdir (nothing written).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from sparsejax.eval_options import CETT_PPL_MODES, CETT_SEARCHES, FLAGS, METRICS, EvalOptions

    d = EvalOptions()  # the one place evaluation defaults live
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="run directory written by train.py")
    p.add_argument("--checkpoints", default="all", help="all, last, or comma-separated steps")
    helps = {
        "metrics": (str, f"comma-separated subset of {','.join(METRICS)}", ",".join(d.metrics)),
        "ppl_p": (float, "CETT-PPL-p%%: perplexity ratio 1 + p/100", d.ppl_p),
        "fat_eps": (float, "FAT-ε threshold on |σ(gate)|", d.fat_eps),
        "topk": (float, "top-k: fraction of d_ff (<1) or k", d.topk),
        "cett": (float, "target of the fixed-CETT metric", d.cett),
        "cett_ppl_mode": (str, f"{' or '.join(CETT_PPL_MODES)}; joint: one c searched on the last "
                          "--joint-last checkpoints (paper)", d.cett_ppl_mode),
        "joint_last": (int, "checkpoints of the joint CETT-PPL search", d.joint_last),
        "tolerance": (float, "CETT-PPL bisection tolerance on c", d.tolerance),
        "eval_batches": (int, "validation batches (0: the run's train.eval_batches)", d.eval_batches),
        "dead_min_rate": (float, "a neuron active on fewer tokens than this share is dead",
                          d.dead_min_rate),
        "cett_search": (str, f"{' or '.join(CETT_SEARCHES)} threshold search", d.cett_search),
        "max_cache_gib": (float, "above this, cached FFN intermediates for CETT spill to disk",
                          d.max_cache_gib),
    }
    for field, flag in FLAGS.items():
        kind, text, default = helps[field]
        p.add_argument(flag, dest=field, type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument("--out", default=None, help="results JSON path (default WORKDIR/eval/results.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparsejax import lifecycle

    lifecycle.die_with_parent()  # started by a sweep: end with it
    lifecycle.cpu_unless_accelerator()  # no TPU/GPU here: keep libtpu from probing for one
    import logging
    import pathlib

    # Library warnings (absl, orbax) stay off the console; our own messages are printed. So do
    # the tracebacks orbax's background tasks print after a damaged checkpoint failed to read.
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger().setLevel(logging.ERROR)
    lifecycle.library_errors_to_logging()

    from sparsejax import (config, eval_options, evaluation, plotting, results as results_lib, rundir,
                           trained_run)

    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "eval" / "results.json"
    try:
        # Before any compute: a results path that cannot be written fails now, not after the run.
        if out.is_dir():
            raise eval_options.EvalError(f"--out {out} is a directory; give a file path such as {out / 'results.json'}")
        rundir.check_writable_dir(out.parent, "--out directory")
    except (eval_options.EvalError, rundir.RunDirError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    try:
        options = eval_options.from_flags({f: getattr(args, f) for f in eval_options.FLAGS})
        results = evaluation.evaluate_run(args.workdir, options, checkpoints=args.checkpoints,
                                          progress=args.progress)
    except (trained_run.RunError, eval_options.EvalError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    except config.ConfigError as err:  # e.g. the run's mesh needs more devices than this host has
        print(f"eval error: the run's config does not fit this machine: {str(err).splitlines()[0]}",
              file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        try:
            written = results_lib.write_results(results, out)
            written += plotting.plot_eval_results(results, out.with_suffix(""))
        except OSError as err:
            print(f"eval error: writing {out} failed: {err.strerror or err}", file=sys.stderr)
            return 1
        print(results_lib.summary_table(results))
        for path in written:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
