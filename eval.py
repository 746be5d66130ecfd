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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="run directory written by train.py")
    p.add_argument("--checkpoints", default="all", help="all, last, or comma-separated steps")
    p.add_argument("--metrics", default="zero,fat,cett_ppl",
                   help="comma-separated subset of zero,fat,topk,topk_global,cett,cett_ppl")
    p.add_argument("--p", type=float, default=1.0, help="CETT-PPL-p%%: perplexity ratio 1 + p/100")
    p.add_argument("--fat-eps", type=float, default=0.01, help="FAT-ε threshold on |σ(gate)|")
    p.add_argument("--topk", type=float, default=0.3, help="top-k: fraction of d_ff (<1) or k")
    p.add_argument("--cett", type=float, default=0.2, help="target of the fixed-CETT metric")
    p.add_argument("--cett-ppl-mode", default="joint", choices=("joint", "per_checkpoint"),
                   help="joint: one c searched on the last --joint-last checkpoints (paper)")
    p.add_argument("--joint-last", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=1e-3, help="CETT-PPL bisection tolerance on c")
    p.add_argument("--eval-batches", type=int, default=0,
                   help="validation batches (0: the run's train.eval_batches)")
    p.add_argument("--cett-search", default="incremental", choices=("incremental", "reference"))
    p.add_argument("--max-cache-gib", type=float, default=2.0,
                   help="above this, cached FFN intermediates for CETT spill to disk")
    p.add_argument("--out", default=None, help="results JSON path (default WORKDIR/eval/results.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparsejax import lifecycle

    lifecycle.die_with_parent()  # started by a sweep: end with it
    import logging
    import pathlib

    # Library warnings (absl, orbax) stay off the console; our own messages are printed.
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger().setLevel(logging.ERROR)

    from sparsejax import evaluation, plotting, results as results_lib, rundir, trained_run

    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "eval" / "results.json"
    try:
        # Before any compute: a results path that cannot be written fails now, not after the run.
        if out.is_dir():
            raise evaluation.EvalError(f"--out {out} is a directory; give a file path such as {out / 'results.json'}")
        rundir.check_writable_dir(out.parent, "--out directory")
    except (trained_run.RunError, rundir.RunDirError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    try:
        options = evaluation.EvalOptions(
            metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
            fat_eps=args.fat_eps, topk=args.topk, cett=args.cett, ppl_p=args.p,
            tolerance=args.tolerance, cett_ppl_mode=args.cett_ppl_mode, joint_last=args.joint_last,
            eval_batches=args.eval_batches, cett_search=args.cett_search,
            max_cache_gib=args.max_cache_gib)
        results = evaluation.evaluate_run(args.workdir, options, checkpoints=args.checkpoints,
                                          progress=args.progress)
    except trained_run.RunError as err:
        print(f"eval error: {err}", file=sys.stderr)
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
