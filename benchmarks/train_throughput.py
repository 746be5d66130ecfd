#!/usr/bin/env python
"""Train-step throughput with and without the in-graph activation statistics, and of the
scanned / rematerialised model layouts beside the default.

    python benchmarks/train_throughput.py --config configs/small_relu.py [--steps 20] [--set k=v]
        [--layouts none,scan,scan+full,minimal]

All variants are compiled for the same config and mesh, then timed in alternating rounds (so
drift in machine load hits all alike) on the same batches. Prints tokens/s, step time, MFU
(needs a known device peak or --peak-tflops) and the overhead of activation logging. Layouts:
``none`` is the config as given; ``scan`` sets model.scan_layers; a remat policy name sets
model.remat_policy; ``scan+<policy>`` both (all with activation logging on).
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

from sparsejax import config, data, flops, optim, sharding, step  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/small_relu.py")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--layouts", default="scan,scan+full",
                   help="extra model layouts to time beside the default (comma-separated; '' = none)")
    args = p.parse_args(argv)

    cfg = config.load(args.config, args.overrides)
    mesh = sharding.make_mesh(cfg.mesh)
    tx = optim.make_optimizer(cfg.train)
    ds = data.Dataset(cfg, jax.process_index(), jax.process_count())
    batches = [sharding.global_batch(next(ds.train), mesh) for _ in range(args.steps)]
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    flops_per_token = flops.train_flops_per_token(cfg.model, cfg.train.seq_len)
    peak = args.peak_tflops or flops.peak_tflops_for(jax.devices()[0].device_kind)

    variants = {}
    runs = [("activation logging on", cfg, True), ("activation logging off", cfg, False)]
    for layout in filter(None, args.layouts.split(",")):
        extra = []
        for part in layout.split("+"):
            extra.append("model.scan_layers=true" if part == "scan" else f"model.remat_policy={part}")
        runs.append((f"layout {layout}", config.apply_overrides(cfg, extra), True))
    for name, run_cfg, log_activations in runs:
        fns = step.make_step_functions(run_cfg, mesh, tx, log_activations=log_activations)
        state = fns.init(jax.random.key(0))
        state, m = fns.train(state, batches[0])  # compile + warm up
        jax.block_until_ready(m)
        variants[name] = {"fns": fns, "state": state, "times": []}

    for _ in range(args.rounds):
        for v in variants.values():
            state = v["state"]
            start = time.perf_counter()
            for batch in batches:
                state, m = v["fns"].train(state, batch)
            jax.block_until_ready((state, m))
            v["times"].append((time.perf_counter() - start) / len(batches))
            v["state"] = state

    print(f"config {cfg.name}: {flops.param_counts(cfg.model).total / 1e6:.2f}M params, "
          f"batch {cfg.train.batch_size}x{cfg.train.seq_len}, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, {args.rounds} rounds x {args.steps} steps (median)")
    header = f"{'variant':<28}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}{'vs off':>9}"
    print(header)
    print("-" * len(header))
    base = statistics.median(variants["activation logging off"]["times"])
    for name, v in variants.items():
        t = statistics.median(v["times"])
        tps = tokens_per_step / t
        mfu = flops.mfu(tps, flops_per_token, jax.device_count(), peak)
        mfu_text = "n/a" if np.isnan(mfu) else f"{mfu:.1%}"
        print(f"{name:<28}{t * 1e3:>10.1f}{tps:>12,.0f}{mfu_text:>8}{t / base:>9.3f}")
    on = statistics.median(variants["activation logging on"]["times"])
    print(f"activation-logging overhead: {(on / base - 1):+.1%} of step time")


if __name__ == "__main__":
    main()
