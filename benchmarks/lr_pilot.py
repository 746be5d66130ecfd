#!/usr/bin/env python
"""Learning-rate pilot for the finding sweeps: eval loss and activation ratio of each shape at each LR,
on the protocol's regime (sparsejax.sweep.protocol) cut to its first ``--steps`` steps.

    python benchmarks/lr_pilot.py --shapes 16x8x8,24x4x8 --lrs 3e-3,1e-2,2e-2 \\
        [--steps 300] [--mup-bases 0,16] [--tokens-per-param 300] [--activation relu] [--jobs 2] \\
        [--json notebooks/results/lr_pilot_width_depth.json]

``--mup-bases``: the parametrisations to pilot, 0 = standard, B > 0 = µP with widths measured
against B (``protocol.mup_overrides``; the LR is then the base LR). Piloting several widths under
both gives the learning-rate transfer table (µP: one best LR for every width). Each row also carries
the run's in-graph activation ratio, averaged over the last 10% of its logged steps, so the same
table shows how the ratio moves with the learning rate at a fixed shape.

A shape is ``d_model x n_layers x head_dim`` (gated FFN, d_ff = 2.5·d_model, byte tokens on the
embedded corpus, configs/tiny_relu.py otherwise). Each (shape, LR) trains ``train.py`` in a child
process with the protocol's batch, warm-up and constant LR for min(--steps, the run's steps) steps
and reads the last ``eval_loss``. ``--json`` is rewritten after every run (``complete`` false
until the last), so a stopped pilot keeps what it finished. ``--jobs`` children run at once,
each single-threaded (tiny models are overhead-bound: two single-threaded runs in parallel use two
cores better than one run with two threads). The table marks each shape's best LR (``*``); the sweeps use that LR per shape.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsejax import results, rundir  # noqa: E402
from sparsejax.sweep import protocol, runner  # noqa: E402


def _shape(text: str) -> tuple[int, int, int]:
    try:
        d, layers, head = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be d_model x n_layers x head_dim, e.g. 16x8x8")
    if min(d, layers, head) < 1 or d % head:
        raise argparse.ArgumentTypeError(f"shape {text!r}: sizes must be >= 1 and head_dim divide d_model")
    return d, layers, head


def _lrs(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lrs {text!r} must be comma-separated numbers")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"--lrs {text!r} must be positive")
    return values


def _late_mean(train: dict, key: str, share: float = 0.1) -> float:
    """Mean of a training record field over the last ``share`` of the logged steps."""
    values = [(s, getattr(r, key)) for s, r in sorted(train.items()) if getattr(r, key) is not None]
    last = values[-1][0]
    late = [v for step, v in values if step >= (1 - share) * last]
    return sum(late) / len(late)


def pilot(shape, lr: float, steps: int, activation: str, workroot: Path, mup_base: int = 0,
          tokens_per_param: float = protocol.TOKENS_PER_PARAM, warmup: int | None = None) -> dict:
    d, layers, head = shape
    point = protocol.shape_point(d, layers, head_dim=head, learning_rate=lr, mup_base=mup_base,
                                 tokens_per_param=tokens_per_param)
    run = protocol.shape_regime(d, layers, head_dim=head, tokens_per_param=tokens_per_param)
    n = min(steps, run.steps)
    warmup = run.warmup_steps if warmup is None else warmup
    sets = [o for o in point.overrides if not o.startswith(("train.steps=", "train.checkpoint_steps=",
                                                            "train.checkpoint_every=", "train.keep_every=",
                                                            "train.eval_every=", "train.warmup_steps=",
                                                            "train.log_every="))]
    sets += [f"train.steps={n}", f"train.checkpoint_every={n}", f"train.keep_every={n}",
             f"train.eval_every={n}", f"train.warmup_steps={warmup}", f"train.log_every={max(1, n // 100)}",
             f"model.activation={activation}"]
    workdir = workroot / f"d{d}_l{layers}_h{head}_lr{lr:g}_mup{mup_base}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny_relu.py"),
           "--workdir", str(workdir), "--no-progress"] + [a for s in sets for a in ("--set", s)]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=runner.single_threaded(os.environ), capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode:
        raise RuntimeError(f"pilot {workdir.name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    train, evals = results.read_training(rundir.RunDir(workdir).metrics)
    return {"d_model": d, "n_layers": layers, "head_dim": head, "params": run.params, "mup_base": mup_base,
            "lr": lr, "steps": n, "warmup_steps": warmup, "batch_size": run.batch_size,
            "tokens": n * run.batch_size * protocol.SEQ_LEN,
            "eval_loss": evals[max(evals)].eval_loss, "activation_ratio": _late_mean(train, "activation_ratio"),
            "seconds": round(seconds, 1)}


def _bases(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mup-bases {text!r} must be comma-separated integers")
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--mup-bases {text!r}: 0 (standard) or a width > 0 (µP)")
    return values


def _param_name(base: int) -> str:
    return f"µP (base {base})" if base else "standard"


def best_lrs(rows: list[dict]) -> dict[tuple[int, int, int, int], dict]:
    """The row of lowest eval loss per (d_model, n_layers, head_dim, mup_base)."""
    best = {}
    for r in rows:
        key = (r["d_model"], r["n_layers"], r["head_dim"], r.get("mup_base", 0))
        if key not in best or r["eval_loss"] < best[key]["eval_loss"]:
            best[key] = r
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")], required=True)
    ap.add_argument("--lrs", type=_lrs, default=[3e-3, 1e-2, 2e-2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--mup-bases", type=_bases, default=[0],
                    help="comma-separated: 0 = standard parameterisation, B > 0 = µP with base width B")
    ap.add_argument("--tokens-per-param", type=float, default=protocol.TOKENS_PER_PARAM,
                    help="the regime's budget (the run stops at min(--steps, its steps))")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up steps of every run (default: each run's regime's); give one value "
                         "when comparing shapes, whose regimes differ")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the rows here (with the best LR per shape)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.jobs < 1 or args.tokens_per_param <= 0:
        ap.error("--steps and --jobs must be >= 1 and --tokens-per-param > 0")
    if args.warmup is not None and not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup {args.warmup} must be in [0, --steps)")
    grid = [(s, b, lr) for s in args.shapes for b in args.mup_bases for lr in args.lrs]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lr_pilot_") as tmp, \
            concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(pilot, s, lr, args.steps, args.activation, Path(tmp), b,
                               args.tokens_per_param, args.warmup): (s, b, lr) for s, b, lr in grid}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            row = fut.result()
            rows.append(row)
            print(f"[{i}/{len(grid)}] {row['d_model']}x{row['n_layers']} {_param_name(row['mup_base'])} "
                  f"lr {row['lr']:g}: eval loss {row['eval_loss']:.4f}, activation ratio "
                  f"{row['activation_ratio']:.3f} ({row['seconds']:.0f} s)", flush=True)
            if args.json:  # after every run: a stopped pilot keeps the rows it finished
                _write_json(args, rows, complete=i == len(grid))
    best = best_lrs(rows)
    for base in args.mup_bases:
        print(f"\n{_param_name(base)}: eval loss (activation ratio); * = best LR of the shape")
        print("| shape | params | tokens | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |")
        print("|---|---|---|" + "---|" * len(args.lrs))
        for shape in args.shapes:
            key = (*shape, base)
            cells = []
            for lr in args.lrs:
                r = next(r for r in rows if (r["d_model"], r["n_layers"], r["head_dim"], r["mup_base"]) == key
                         and r["lr"] == lr)
                cells.append(f"{r['eval_loss']:.4f} ({r['activation_ratio']:.3f}){' *' if r is best[key] else ''}")
            print(f"| {shape[0]}x{shape[1]} (heads of {shape[2]}) | {best[key]['params']} | "
                  f"{best[key]['tokens']} | " + " | ".join(cells) + " |")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _write_json(args, rows: list[dict], complete: bool) -> None:
    """The pilot's rows so far (``complete``: every grid point ran) and each shape's best LR."""
    best = best_lrs(rows)
    out = {"activation": args.activation, "steps": args.steps, "tokens_per_param": args.tokens_per_param,
           "warmup": args.warmup, "mup_bases": args.mup_bases, "complete": complete,
           "rows": sorted(rows, key=lambda r: (r["mup_base"], r["d_model"], r["n_layers"], r["lr"])),
           "best_lr": {f"{k[0]}x{k[1]}x{k[2]}" + (f"_mup{k[3]}" if k[3] else ""): v["lr"]
                       for k, v in best.items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
