#!/usr/bin/env python
"""Does a trained model's activation sparsity turn into speed? ``model.ffn_impl=block_sparse``
against the einsum FFN, on one trained run, in the same process.

    python benchmarks/sparse_speed.py --workdir runs/recipes/chunk [--block-t 8 --block-f 32]

Loads the run's last checkpoint (or ``--step``) and its own validation batches, builds the
model twice — ``model.ffn_impl=reference`` (einsum) and ``block_sparse`` with tiles of
``--block-t`` tokens × ``--block-f`` neurons (defaults: the recipe's chunk length, or
``model.ffn_block_t``, and ``model.ffn_block_f``) — and times, alternating the two so that a
busy machine slows both alike, the forward pass with the loss (what evaluation runs) and a full
train step, reporting medians over ``--repeats`` rounds.

Printed per row: the tile density (share of (token block × neuron block) tiles with any active
neuron, by the zero rule on σ(gate), over the evaluation batches and layers), the measured
speedup einsum / block-sparse, and the bounds of the FFN's speedup at that density:

* ``1 / (g + d·(1 − g))``: the mask costs the dense gate matmul (share g of the FFN: 1/3 gated,
  1/2 plain) and the other matmuls run on active tiles only;
* ``1 / (g + d)``: what the kernels do today, recomputing the gate for active tiles (the bound
  for that implementation; gated only — a plain FFN's kernel reuses nothing either, 1/(1/2 + d)).

The bounds are for the FFN; the model also runs attention, norms and the vocabulary projection,
so the model-level bound (also printed) is Amdahl's with the FFN's share of the forward FLOPs.
The train step runs without the run's recipe (``block_sparse`` refuses recipe terms): both
variants train the plain LM loss from the same weights. Above
``kernels.ffn.DENSE_FALLBACK_DENSITY`` of the backend the block-sparse FFN switches to the dense
FFN at run time (same result).

On a CPU there is no Pallas kernel: ``block_sparse`` runs the pure-JAX tile path (a gather
over active neuron blocks + einsums), and the output says so. Numbers on a shared machine are
noisy; the alternation and medians make the ratio, not the absolute times, the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax import (config as config_lib, data, model as model_lib, optim, sharding,  # noqa: E402
                       step as step_lib, trained_run)
from sparsejax import configure  # noqa: E402
from sparsejax.kernels import block_mask as bm, ffn as kernel_ffn  # noqa: E402
from sparsejax.loss import model_loss  # noqa: E402


def gate_share(ffn_type: str) -> float:
    """Share of the FFN's matmul FLOPs that builds the mask: σ(W_gate x) of 3 (gated) or
    σ(W_in x) of 2 (plain) equal-sized matmuls."""
    return {"gated": 1 / 3, "plain": 1 / 2}[ffn_type]


def ffn_bound(density: float, share: float) -> float:
    """Speedup bound of the FFN: the mask's matmul dense, the rest on active tiles only."""
    return 1.0 / (share + density * (1.0 - share))


def kernel_bound(density: float, share: float) -> float:
    """Speedup bound of the FFN as the kernels compute it: the dense mask matmul, then every
    matmul (the gate again) on active tiles."""
    return 1.0 / (share + density)


def ffn_flop_share(cfg: config_lib.ModelConfig, seq_len: int) -> float:
    """The FFN's share of one token's forward matmul FLOPs (attention projections, scores,
    FFN and the vocabulary projection)."""
    d, f, h, k, v = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.head_dim, cfg.vocab_size
    ffn = (3 if cfg.ffn_type == "gated" else 2) * d * f
    attn = 4 * d * h * k + 2 * seq_len * h * k / 2  # q, k, v, out + causal QKᵀ and AV (mean)
    return cfg.n_layers * ffn / (cfg.n_layers * (ffn + attn) + d * v)


def model_bound(ffn_speedup_bound: float, share: float) -> float:
    """Amdahl: the rest of the model is unchanged."""
    return 1.0 / ((1.0 - share) + share / ffn_speedup_bound)


def tile_density(model: model_lib.Model, params, batches, block_t: int, block_f: int) -> float:
    """Active tiles / all tiles over the batches and layers (zero rule on σ(gate), padded
    positions excluded as their own tiles only when a whole tile is padding)."""
    @jax.jit
    def activations(params, inputs):
        _, inter = model.apply(params, inputs, collect=("intermediates",))
        return jnp.stack(model.ffn_intermediates(inter)[0])

    active, total = 0, 0
    for batch in batches:
        act_NxBxLxF = np.asarray(activations(params, batch["inputs"]))
        valid_BxL = np.asarray(batch["weights"]) > 0
        for act_BxLxF in act_NxBxLxF:
            active_BxLxF = np.asarray(bm.active_TxF(jnp.asarray(act_BxLxF)))  # the tile rule
            act_TxF = np.where(valid_BxL[..., None], active_BxLxF, False).reshape(
                -1, act_BxLxF.shape[-1])
            t = act_TxF.shape[0] // block_t * block_t
            tiles = np.asarray(bm.block_activity_NxM(jnp.asarray(act_TxF[:t]), block_t, block_f))
            active += int(tiles.sum())
            total += tiles.size
    return active / max(total, 1)


def alternate(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, calling them in turn ``repeats`` times."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a run directory written by train.py")
    p.add_argument("--step", type=int, default=0, help="checkpoint step (0: the last)")
    p.add_argument("--block-t", type=int, default=0,
                   help="tokens per tile (0: the recipe's chunk_len if a chunk penalty is set, "
                        "else model.ffn_block_t)")
    p.add_argument("--block-f", type=int, default=0, help="neurons per tile (0: model.ffn_block_f "
                   "if it divides d_ff, else the largest power of two that does)")
    p.add_argument("--batches", type=int, default=2, help="validation batches to time and measure")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    try:
        run = trained_run.load(args.workdir)
        step = args.step or run.steps[-1]
        if step not in run.steps:
            raise trained_run.RunError(f"--step {step} not found; available: {run.steps}")
        cfg = run.cfg
        m = cfg.model
        chunked = any(cfg.sparsity.chunk.values)
        block_t = args.block_t or (cfg.sparsity.chunk_len if chunked else m.ffn_block_t)
        block_f = args.block_f or (m.ffn_block_f if m.d_ff % m.ffn_block_f == 0 else
                                   max(b for b in (8, 16, 32, 64, 128) if m.d_ff % b == 0))
        # Both variants: no recipe (block_sparse refuses its terms), one device, the run's model.
        base = dataclasses.replace(cfg, sparsity=config_lib.SparsityConfig(),
                                   mesh=config_lib.MeshConfig(data=1, fsdp=1, tensor=1))
        variants = {
            "einsum": configure.apply_overrides(base, ["model.ffn_impl=reference"]),
            "block_sparse": configure.apply_overrides(base, [
                "model.ffn_impl=block_sparse", f"model.ffn_block_t={block_t}",
                f"model.ffn_block_f={block_f}"]),
        }
    except (trained_run.RunError, config_lib.ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = sharding.plan(variants["einsum"].mesh, jax.devices()[:1])
    mesh = plan.mesh
    params, _ = run.params(step, mesh)
    eval_cfg = dataclasses.replace(base, train=dataclasses.replace(base.train,
                                                                   eval_batches=args.batches))
    batches = [plan.global_batch(b) for b in data.validation_batches(eval_cfg, 0, 1)]

    backend = jax.default_backend()
    impl = kernel_ffn.pick_impl("auto")
    fallback = kernel_ffn.DENSE_FALLBACK_DENSITY.get({"jax": backend}.get(impl, impl), 0.6)
    density = tile_density(model_lib.Model(variants["einsum"].model), params, batches,
                           block_t, block_f)
    g = gate_share(m.ffn_type)
    phi = ffn_flop_share(m, cfg.train.seq_len)

    forward, train = {}, {}
    for name, vcfg in variants.items():
        model = model_lib.Model(vcfg.model)
        tile = vcfg.train.loss_tile_len
        fwd = jax.jit(lambda p, b, model=model, tile=tile: model_loss(
            model, p, b, loss_tile_len=tile)[0])
        fns = step_lib.make_step_functions(vcfg, mesh, optim.make_optimizer(vcfg),
                                           log_activations=False)
        state = fns.init(jax.random.key(0))
        state = {**state, "params": params}
        # The train step donates its state: each call gets a fresh copy, made outside the timing.
        train_fn = fns.train
        forward[name] = lambda fwd=fwd: [fwd(params, b) for b in batches]
        train[name] = (train_fn, state)

    losses = {n: float(np.mean([float(x) for x in f()])) for n, f in forward.items()}

    def timed_train(name):
        fn, state = train[name]
        copies = [jax.tree.map(jnp.copy, state) for _ in batches]
        jax.block_until_ready(copies)
        return lambda: [fn(c, b)[1]["loss"] for c, b in zip(copies, batches)]

    for name in train:  # compile outside the timing
        jax.block_until_ready(timed_train(name)())
    fwd_s = alternate(forward, args.repeats)
    train_s = {n: [] for n in train}
    for _ in range(args.repeats):
        for name in train:
            call = timed_train(name)
            start = time.perf_counter()
            jax.block_until_ready(call())
            train_s[name].append(time.perf_counter() - start)
    train_s = {n: statistics.median(v) for n, v in train_s.items()}

    import importlib.metadata as md
    print(f"# {datetime.date.today()} · {backend} ({jax.devices()[0].device_kind}) · jax "
          f"{md.version('jax')} · run {args.workdir} step {step} ({cfg.name})")
    if impl == "jax":
        print(f"# no Pallas kernel on {backend}: block_sparse runs the pure-JAX tile path "
              f"(gather over active neuron blocks + einsum); dense fallback above tile density "
              f"{fallback}")
    tokens = sum(int(np.sum(np.asarray(b["weights"]) > 0)) for b in batches)
    print(f"# {len(batches)} batches × {cfg.train.batch_size} × {cfg.train.seq_len} "
          f"({tokens} tokens), tiles {block_t} tokens × {block_f} neurons, {m.ffn_type} FFN "
          f"(gate share g = {g:.3f}), FFN share of forward FLOPs {phi:.2f}, medians of "
          f"{args.repeats} alternating rounds; eval loss einsum {losses['einsum']:.4f}, "
          f"block_sparse {losses['block_sparse']:.4f}")
    print("| pass | tile density | einsum ms | block_sparse ms | speedup | FFN bound "
          "1/(g+d(1-g)) | FFN bound as implemented 1/(g+d) | model bound (Amdahl) |")
    print("|---|---|---|---|---|---|---|---|")
    fb, kb = ffn_bound(density, g), kernel_bound(density, g)
    for label, times in (("forward (eval loss)", fwd_s), ("train step", train_s)):
        e, s = times["einsum"], times["block_sparse"]
        print(f"| {label} | {density:.3f} | {1e3 * e:.1f} | {1e3 * s:.1f} | {e / s:.2f}× | "
              f"{fb:.2f}× | {kb:.2f}× | {model_bound(fb, phi):.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
