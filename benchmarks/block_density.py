#!/usr/bin/env python
"""Measured block density of a trained run's FFN activations: what a block-sparse kernel sees.

    python benchmarks/block_density.py --workdir runs/tiny_relu [--step last] [--fat-eps 0.01]

For each layer, the fraction of (token block × neuron block) tiles with at least one active
(token, neuron) pair, for token blocks bt ∈ {1, 8, 32, 128} (consecutive tokens of one sequence)
and neuron blocks bf ∈ {128, 256, 512}, on the run's validation batches. bt = 1, bf = 1 would be
the usual activation ratio; it is printed as "r" for reference. Two activity criteria:

* zero: σ(gate) ≠ 0 (exact for the ReLU family; everything is active for SiLU/GELU);
* FAT-ε: |σ(gate)| ≥ ε (+1e-18, as the Sparsing Law reference's ``prune_fat``), the fixed
  threshold of FATReLU (Kurtz et al. 2020) / ProSparse (Song et al. 2024) and CATS.

A block-sparse FFN costs about density × dense at best, so 1/density is the speedup bound. If
every neuron were active independently with the layer's rate r, a block of 8 tokens would be
dense in a neuron with probability 1 − (1 − r)^8: the "indep.8x1" column, to compare with a
measured 8x1 (``--block-f 1 ...``); measured below it means activity is correlated over tokens. A bt larger than
the sequence length, or a bf larger than d_ff, is clamped (and said so); a d_ff that bf does not
divide gets a last, narrower neuron block.
Train a run first, e.g. ``python train.py --config configs/tiny_relu.py --workdir /tmp/kr
--set train.steps=100 --no-progress``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax import evaluation, metrics, model as model_lib, sharding, trained_run  # noqa: E402

BLOCK_T = (1, 8, 32, 128)
BLOCK_F = (128, 256, 512)


def tile_counts(active_BxLxF: np.ndarray, valid_BxL: np.ndarray, bt: int, bf: int
                ) -> tuple[int, int]:
    """(active tiles, tiles) over token blocks holding at least one valid token."""
    b, length, f = active_BxLxF.shape
    pad_l, pad_f = -length % bt, -f % bf
    active = np.pad(active_BxLxF & valid_BxL[..., None], ((0, 0), (0, pad_l), (0, pad_f)))
    valid = np.pad(valid_BxL, ((0, 0), (0, pad_l)))
    n, m = (length + pad_l) // bt, (f + pad_f) // bf
    tiles_BxNxM = active.reshape(b, n, bt, m, bf).any(axis=(2, 4))
    block_valid_BxN = valid.reshape(b, n, bt).any(axis=2)
    return int(tiles_BxNxM[block_valid_BxN].sum()), int(block_valid_BxN.sum()) * m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", default="last", help="checkpoint step or 'last'")
    p.add_argument("--fat-eps", type=float, default=0.01)
    p.add_argument("--eval-batches", type=int, default=0, help="0: the run's train.eval_batches")
    p.add_argument("--block-t", type=int, nargs="+", default=list(BLOCK_T))
    p.add_argument("--block-f", type=int, nargs="+", default=list(BLOCK_F))
    args = p.parse_args(argv)

    try:
        run = trained_run.load(args.workdir)
    except trained_run.RunError as err:
        print(f"{err}\nTrain a run first: python train.py --config configs/tiny_relu.py "
              f"--workdir {args.workdir} --set train.steps=100 --no-progress", file=sys.stderr)
        return 2
    try:
        (step,) = trained_run.select_steps(run.steps, args.step)
    except (trained_run.RunError, ValueError):  # its message names eval.py's --checkpoints
        print(f"--step {args.step}: use 'last' or one step of {run.steps}", file=sys.stderr)
        return 2
    cfg, m = run.cfg, run.cfg.model
    ev = evaluation.Evaluator(cfg, evaluation.EvalOptions(eval_batches=args.eval_batches))
    params, _ = run.params(step, ev.mesh)
    mesh, rules = ev.mesh, sharding.rules(cfg.mesh)
    model = model_lib.Transformer(m)

    @jax.jit
    def activations(params, inputs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            _, inter = model.apply({"params": params}, inputs, mutable=["intermediates"])
        return model_lib.ffn_intermediates(inter, m.n_layers)[0]

    seq_len = cfg.train.seq_len
    notes = []
    bts = sorted({min(bt, seq_len) for bt in args.block_t})
    bfs = sorted({min(bf, m.d_ff) for bf in args.block_f})
    if max(args.block_t) > seq_len:
        notes.append(f"block_t clamped to the sequence length {seq_len}")
    if max(args.block_f) > m.d_ff:
        notes.append(f"block_f clamped to d_ff {m.d_ff}")
    combos = [(bt, bf) for bt in bts for bf in bfs]
    rules_eps = {"zero": 0.0, f"FAT-{args.fat_eps:g}": args.fat_eps + metrics.FAT_FLOOR}
    counts = {(c, layer, k): [0, 0] for c in rules_eps for layer in range(m.n_layers)
              for k in combos + [(1, 1)]}
    for batch in ev.batches:
        acts = activations(params, ev.plan.global_batch(batch)["inputs"])
        valid_BxL = np.asarray(batch["weights"]) > 0
        for layer, act in enumerate(acts):
            mag = np.abs(np.asarray(act, np.float32))
            for crit, eps in rules_eps.items():
                active = mag > 0 if eps == 0.0 else mag >= eps
                for k in combos + [(1, 1)]:
                    a, t = tile_counts(active, valid_BxL, *k)
                    counts[(crit, layer, k)][0] += a
                    counts[(crit, layer, k)][1] += t

    print(f"run {run.workdir} step {step}: {m.n_layers} layers, d_model {m.d_model}, d_ff "
          f"{m.d_ff}, activation {m.activation} ({m.ffn_type}), seq_len {seq_len}, "
          f"{len(ev.batches)} validation batches")
    for note in notes:
        print("note:", note)
    for crit in rules_eps:
        print(f"\nblock density, {crit} criterion (columns bt×bf; r = per-token activation ratio)")
        print(f"{'layer':>5} {'r':>6} {'indep.8x1':>9} " +
              " ".join(f"{f'{bt}x{bf}':>8}" for bt, bf in combos))
        mean = np.zeros(len(combos) + 2)
        for layer in range(m.n_layers):
            a, t = counts[(crit, layer, (1, 1))]
            r = a / max(t, 1)
            indep = 1 - (1 - r) ** 8
            dens = [counts[(crit, layer, k)][0] / max(counts[(crit, layer, k)][1], 1)
                    for k in combos]
            mean += np.array([r, indep] + dens) / m.n_layers
            print(f"{layer:5d} {r:6.3f} {indep:9.3f} " + " ".join(f"{d:8.3f}" for d in dens))
        print(f"{'mean':>5} {mean[0]:6.3f} {mean[1]:9.3f} " +
              " ".join(f"{d:8.3f}" for d in mean[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
