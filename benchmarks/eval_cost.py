#!/usr/bin/env python
"""Cost of the sparsity evaluation: CETT-PPL-p% search and the CETT threshold search.

    python benchmarks/eval_cost.py --workdir runs/tiny_relu [--p 1] [--synthetic-tokens 4096]

1. CETT-PPL-p% on the run's last checkpoint (per-checkpoint search): wall seconds, outer
   iterations, forward passes (in evaluation batches) and the share of time in threshold searches.
2. Per-layer CETT threshold search, the incremental search vs the 65,536-candidate reference, on
   the run's real intermediates and on a synthetic layer of the paper's 0.1B shape (d_ff 1920,
   d_model 768, ReLU-like 20% density), both timed in the same process; thresholds must agree.
Train the run first, e.g. ``python train.py --config configs/tiny_relu.py --workdir runs/tiny_relu``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from sparsejax import cett, evaluation, model as model_lib, trained_run  # noqa: E402


def _time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/tiny_relu")
    p.add_argument("--p", type=float, default=1.0)
    p.add_argument("--cett", type=float, default=0.2, help="target for the threshold-search timing")
    p.add_argument("--synthetic-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    try:
        run = trained_run.load(args.workdir)
    except trained_run.RunError as err:
        print(f"{err}\nTrain a run first: python train.py --config configs/tiny_relu.py "
              f"--workdir {args.workdir}", file=sys.stderr)
        return 2
    options = evaluation.EvalOptions(cett_ppl_mode="per_checkpoint", ppl_p=args.p)
    ev = evaluation.Evaluator(run.cfg, options)
    params, _ = run.params(run.steps[-1], ev.mesh)
    dense = ev.dense(params, keep_hidden=True)
    ev.dense(params)  # compile the plain dense pass too, outside the timing

    search_seconds = [0.0]
    original = ev.cett_thresholds

    def timed_thresholds(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        search_seconds[0] += time.perf_counter() - start
        return out

    ev.cett_thresholds = timed_thresholds
    ev.cett_pass(params, dense.hidden, 0.5)  # compile the sparse pass
    search_seconds[0], passes_before = 0.0, ev.forward_passes
    start = time.perf_counter()
    search = evaluation.bisect_cett(
        lambda c: evaluation.ppl_ratio(ev.cett_pass(params, dense.hidden, c)[0].loss, dense.loss),
        1 + args.p / 100, options.tolerance)
    total = time.perf_counter() - start
    final = evaluation.ppl_ratio(ev.cett_pass(params, dense.hidden, search.cett)[0].loss, dense.loss)
    print(f"## CETT-PPL-{args.p:g}% on {run.cfg.name} step {run.steps[-1]} "
          f"({ev.eval_tokens} eval tokens, {len(ev.batches)} batches, {ev.n_layers} layers)")
    print(f"| found c | ppl ratio | iterations | forward passes (batches) | seconds | in threshold search |")
    print(f"|---|---|---|---|---|---|")
    print(f"| {search.cett:.4f} | {final:.5f} | {len(search.evaluations)} | "
          f"{ev.forward_passes - passes_before} (+{len(ev.batches)} cached dense) | {total:.2f} | "
          f"{search_seconds[0] / total:.0%} |")

    cases = []
    w_outs = model_lib.w_out_per_layer(params, ev.n_layers)
    cases.append((f"{run.cfg.name} layer 0 (T={ev.eval_tokens}, F={ev.d_ff})", dense.hidden.layer(0),
                  np.asarray(w_outs[0])))
    rng = np.random.default_rng(0)
    T, F, D = args.synthetic_tokens, 1920, 768
    hidden = rng.standard_normal((T, F), dtype=np.float32) * (rng.random((T, F)) < 0.2)
    cases.append((f"synthetic 0.1B layer (T={T}, F={F}, D={D})", hidden.astype(np.float32),
                   (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32)))
    print(f"\n## CETT threshold search, target {args.cett} (best of {args.repeats})")
    print("| layer | reference s | incremental s | speed-up | same threshold | evaluations |")
    print("|---|---|---|---|---|---|")
    for name, h, w in cases:
        cett.cett_threshold_reference(h, w, args.cett)  # compile both outside the timing
        cett.cett_threshold_incremental(h, w, args.cett)
        t_ref, ref = _time(lambda: cett.cett_threshold_reference(h, w, args.cett), args.repeats)
        t_inc, inc = _time(lambda: cett.cett_threshold_incremental(h, w, args.cett), args.repeats)
        print(f"| {name} | {t_ref:.3f} | {t_inc:.3f} | {t_ref / t_inc:.2f}x | "
              f"{ref.threshold == inc.threshold} | {ref.num_evaluations} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
