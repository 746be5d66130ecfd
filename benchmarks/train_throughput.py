#!/usr/bin/env python
"""Train-step throughput: tokens/s, step time, model GFLOP/s and MFU over shapes, dtypes, with
and without the in-graph activation statistics, and for scanned / rematerialised layouts.

    python benchmarks/train_throughput.py [--shapes tiny,small,d512] [--dtypes float32,bfloat16]
        [--layouts scan,scan+full] [--steps 5] [--rounds 3] [--config C --set k=v ...]

Shapes (:data:`SHAPES`): ``tiny`` and ``d512`` are the two shapes timed against nanodo (plain
tanh-GELU FFN as nanodo's, seq 256, vocab 256, synthetic tokens; README "Performance");
``small`` is configs/small_relu.py; ``config`` is ``--config`` with ``--set`` as given.

Within one (shape, dtype) every variant is compiled first, then timed in alternating rounds of
``--steps`` steps each (so drift in machine load hits all alike); each step is timed alone with
``block_until_ready`` and the table shows the median. Variants: activation statistics on (the
training default) and off; each ``--layouts`` entry (``scan`` sets model.scan_layers, a remat
policy name sets model.remat_policy, ``scan+<policy>`` both; statistics on). Model GFLOP/s are
``sparsejax.flops.train_flops_per_token`` × tokens/s (6N plus attention, no remat recompute);
MFU needs a known device peak (``flops.PEAK_TFLOPS``) or ``--peak-tflops``: "n/a" on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax import flops, optim, sharding, step  # noqa: E402
from sparsejax import configure

ROOT = Path(__file__).resolve().parents[1]
_NANODO_LIKE = ("model.ffn_type=plain", "model.activation=gelu_tanh", "model.vocab_size=256",
                "model.max_seq_len=256", "train.seq_len=256")
# name -> (config file, overrides). The nanodo shapes: head_dim = d_model / heads as nanodo's.
SHAPES = {
    "tiny": ("configs/tiny_relu.py", _NANODO_LIKE + (
        "model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.head_dim=64",
        "model.d_ff=1024", "train.batch_size=16")),
    "d512": ("configs/tiny_relu.py", _NANODO_LIKE + (
        "model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.head_dim=64",
        "model.d_ff=2048", "train.batch_size=8")),
    "small": ("configs/small_relu.py", ()),
}


def _batches(cfg, plan, n: int):
    """Uniform random tokens in [1, vocab), as the peer benchmarks feed (no data pipeline)."""
    rng = np.random.default_rng(0)
    b, length, vocab = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        toks = rng.integers(1, vocab, size=(b, length + 1), dtype=np.int32)
        out.append(plan.global_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                                      "weights": np.ones((b, length), np.float32)}))
    return out


def _variants(cfg, layouts: str):
    runs = [("stats on", cfg, True), ("stats off", cfg, False)]
    for layout in filter(None, layouts.split(",")):
        extra = ["model.scan_layers=true" if part == "scan" else f"model.remat_policy={part}"
                 for part in layout.split("+")]
        runs.append((layout, configure.apply_overrides(cfg, extra), True))
    return runs


def time_shape(cfg, layouts: str, steps: int, rounds: int) -> dict[str, list[float]]:
    """Per-step seconds of each variant, compiled first, then timed in alternating rounds."""
    plan = sharding.plan(cfg.mesh)
    mesh = plan.mesh
    tx = optim.make_optimizer(cfg)
    batches = _batches(cfg, plan, steps)
    live = {}
    for name, run_cfg, log_activations in _variants(cfg, layouts):
        fns = step.make_step_functions(run_cfg, mesh, tx, log_activations=log_activations)
        state = fns.init(jax.random.key(0))
        for b in batches[:2]:  # compile + one warm step
            state, m = fns.train(state, b)
        jax.block_until_ready(m)
        live[name] = [fns, state, []]
    for _ in range(rounds):
        for fns_state_times in live.values():
            fns, state, times = fns_state_times
            for b in batches:
                start = time.perf_counter()
                state, m = fns.train(state, b)
                jax.block_until_ready((state, m))
                times.append(time.perf_counter() - start)
            fns_state_times[1] = state
    return {name: times for name, (_, _, times) in live.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,small,d512",
                   help=f"comma-separated, from {sorted(SHAPES) + ['config']}")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--config", default="configs/small_relu.py", help="for --shapes config")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra override for every shape (k=v)")
    p.add_argument("--layouts", default="scan,scan+full",
                   help="extra model layouts beside the default (comma-separated; '' = none)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES and s != "config"]
    if bad:
        p.error(f"--shapes: {bad} not allowed; allowed values: {sorted(SHAPES) + ['config']}")

    peak = args.peak_tflops or flops.peak_tflops_for(jax.devices()[0].device_kind)
    rows = []
    for shape in shapes:
        path, sets = (args.config, ()) if shape == "config" else SHAPES[shape]
        for dtype in args.dtypes.split(","):
            cfg = configure.load(str(ROOT / path) if shape != "config" else path,
                              [*sets, f"model.dtype={dtype}", *args.overrides])
            print(f"timing {shape} {dtype} ...", file=sys.stderr, flush=True)
            times = time_shape(cfg, args.layouts, args.steps, args.rounds)
            tokens = cfg.train.batch_size * cfg.train.seq_len
            fpt = flops.train_flops_per_token(cfg.model, cfg.train.seq_len)
            off = statistics.median(times["stats off"])
            for name, ts in times.items():
                t = statistics.median(ts)
                mfu = flops.mfu(tokens / t, fpt, jax.device_count(), peak)
                rows.append((shape, dtype, name, t * 1e3, tokens / t, fpt * tokens / t / 1e9,
                             "n/a" if np.isnan(mfu) else f"{mfu:.1%}", t / off))

    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"{args.rounds} alternating rounds x {args.steps} steps per variant (median step)")
    header = (f"{'shape':<7}{'dtype':<10}{'variant':<14}{'step ms':>10}{'tokens/s':>11}"
              f"{'GFLOP/s':>9}{'MFU':>7}{'vs off':>8}")
    print(header)
    print("-" * len(header))
    for shape, dtype, name, ms, tps, gf, mfu, rel in rows:
        print(f"{shape:<7}{dtype:<10}{name:<14}{ms:>10.1f}{tps:>11,.0f}{gf:>9.1f}{mfu:>7}{rel:>8.3f}")


if __name__ == "__main__":
    main()
