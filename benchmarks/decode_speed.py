#!/usr/bin/env python
"""Decode tokens/s, dense against the sparse decode FFN, beside the bounds that limit each.

    python benchmarks/decode_speed.py --workdir RUN [--step N]
    python benchmarks/decode_speed.py --hf PATH
    python benchmarks/decode_speed.py --random-init configs/sparsing_law_0.1b.py \\
        --set sparsity.topk=0.1                     # a randomly initialised model, labelled so
        [--batch 1,4] [--chunk 1,4,8] [--context 256] [--steps 16] [--rounds 7] [--capacity K]
        [--threshold EPS] [--decode-kernel auto|xla|cpu]

In one process, alternating dense and sparse rounds (so a busy machine slows both alike) and
reporting medians, for each batch size (one new token per row and step) and, at batch 1, each
chunk of k tokens verified at once (BlockFFN's speculative-decoding view):

* ``tok/s``: decode tokens per second of the whole jitted step (attention over a fixed cache of
  ``--context`` slots, half of it filled by the prompt), dense and sparse;
* ``active``: the measured share of FFN neurons active in the step's union of tokens (per layer
  on the last line), over ``--steps`` teacher-forced steps of real text (the run's validation
  split) or random tokens (``--random-init``); ``read``: the share of rows the sparse step
  actually reads — with XLA's gather (``--decode-kernel xla``) its capacity, the most any
  measured step needed or ``--capacity``; with the C++ CPU row reader (``cpu``, chosen by
  ``auto`` where it builds) exactly the active rows, so the measured active share;
* ``FFN x``: the sparse FFN stack's speedup over the dense one (the FFN of every layer alone, on
  the step's real FFN inputs, one layer after the other as in the step); its bound ``1/(g + d(1 − g))`` with g the dense gate's share of the
  FFN's weights (1/3 gated, 1/2 plain) and d the read share;
* ``share``: the FFN stack's share of the dense step; the model bound is Amdahl's on it,
  ``1/((1 − s) + s / FFN bound)``, and ``of bound`` the measured step speedup over it;
* ``roofline``: bytes read per step (weights — the embedding table once if tied, else the
  output projection; the cache's ``2·N·B·S·G·K`` values) over this machine's read bandwidth,
  measured in the same run (a reduction over 512 MiB), against the measured step time.

Activations without exact zeros (SiLU, GELU, SwiGLU) are run thresholded at ``--threshold``
(FAT-ε on |σ(gate)|, approximate: the loss change on validation text is printed; random-init
models have no meaningful loss). Timings on a shared machine are noisy: the ratios, taken in
alternation, are the result; rerun on an idle machine for absolute numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax import (configure, data, decode, decode_ffn,  # noqa: E402
                       model as model_lib, sharding, trained_run)
from sparsejax.sparsity import Sparsity  # noqa: E402
from sparsejax.sparsity_plan import SparsityPlan  # noqa: E402
from sparse_speed import ffn_bound, gate_share, model_bound  # noqa: E402 - the FFN bounds


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a float32 sum over ``mib`` MiB (reads only), median of repeats."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    fn = jax.jit(jnp.sum)
    fn(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(times)


def step_bytes(cfg, params, batch: int, cache_len: int, read: float = 1.0) -> int:
    """Bytes one decode step reads: every weight once (the embedding table only as the tied
    output projection; untied, one row of it, not counted), the FFN's non-gate matrices at the
    ``read`` share, and the whole fixed-size cache."""
    flat = jax.tree_util.tree_leaves_with_path(params)
    total = 0
    for path, leaf in flat:
        names = [getattr(k, "key", "") for k in path]
        if names[0] == "embed" and not cfg.tie_embeddings:
            continue
        nbytes = leaf.size * (2 if cfg.dtype == "bfloat16" else 4)
        if "ffn" in names and names[-2] in ("w_out", "w_in") and not (
                names[-2] == "w_in" and cfg.ffn_type == "plain"):
            nbytes *= read
        if "ffn" in names and names[-1] == "w_in_FxD":
            continue  # the sparse path's copy of W_in, counted as w_in
        total += nbytes
    return int(total + decode.cache_bytes(cfg, batch, cache_len))


def alternate(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def load(args):
    """(label, model config, params, sparsity input, validation batches or None)."""
    if args.workdir:
        run = trained_run.load(args.workdir)
        step = args.step or run.steps[-1]
        cfg = dataclasses.replace(run.cfg, mesh=dataclasses.replace(run.cfg.mesh, data=1))
        run.cfg = cfg
        params, _ = run.params(step, sharding.plan(cfg.mesh, jax.devices()[:1]).mesh)
        plan = SparsityPlan.of(cfg)
        sp = plan.model_input(plan.coefficients(step) if plan.traced else None)
        eval_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_batches=1))
        return f"{args.workdir} step {step}", cfg.model, params, sp, data.validation_batches(eval_cfg)
    if args.hf:
        from sparsejax import hf_import

        hf = hf_import.read_config(args.hf)
        ckpt = hf_import.open_checkpoint(args.hf, seq_len=min(
            args.context, int(hf.get("max_position_embeddings") or args.context)))
        return f"{args.hf} (imported)", ckpt.model, hf_import.load_params(ckpt), Sparsity(), None
    cfg = configure.load(args.random_init, args.set)
    m = dataclasses.replace(cfg.model, scan_layers=False, remat_policy="none")
    plan = SparsityPlan.of(cfg)
    params = model_lib.Model(m).init(jax.random.key(0), 8)
    return (f"{args.random_init} {' '.join(args.set)} (random init)", m, params,
            plan.model_input(None), None)


def ffn_stack(cfg, params, sp, decode_arg):
    """The FFN of every layer alone, in sequence as in the step: ``xs_N`` (each layer's FFN
    input) -> sum of outputs. Layer i reads ``xs[i] + 0 · (the outputs so far)``: its own input's
    values, but it waits on the layer before, as it does in the decode step (independent layers
    would let XLA overlap one layer's reads with another's, which a step cannot)."""
    layers = [params[f"layer_{i}"]["ffn"] for i in range(cfg.n_layers)]
    ff = model_lib.FeedForward(cfg)

    @jax.jit
    def run(xs):
        y = jnp.zeros_like(xs[0])
        for i, (p, x) in enumerate(zip(layers, xs)):
            y = y + ff.apply({"params": p}, x + 0.0 * y, sp.layer(i),
                             None if decode_arg is None else decode_arg.layer(i))
        return y
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir")
    src.add_argument("--hf")
    src.add_argument("--random-init", dest="random_init", help="a config file, randomly initialised")
    p.add_argument("--set", action="append", default=[], help="config override (--random-init)")
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--batch", default="1,4")
    p.add_argument("--chunk", default="1,4,8")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--capacity", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.01)
    p.add_argument("--decode-kernel", dest="decode_kernel", default="auto",
                   help="the sparse FFN's row reader: auto, xla (gather to a capacity) or cpu")
    args = p.parse_args(argv)

    label, cfg, params, sp, batches = load(args)
    cfg = dataclasses.replace(cfg, scan_layers=False)
    params = model_lib.convert_layout(model_lib.Model.unbox(params), cfg.n_layers, False)
    context = min(args.context, cfg.max_seq_len)
    chunks = [int(k) for k in args.chunk.split(",")]
    prompt_len = context - args.steps * max(chunks)  # room for the longest measured continuation
    if prompt_len < 8:
        p.error(f"--context {context} (at most model.max_seq_len={cfg.max_seq_len}) leaves "
                f"{prompt_len} prompt tokens for --steps {args.steps} x chunk {max(chunks)}; "
                f"lower --steps")
    exact = decode_ffn.exact_zeros(cfg, sp)
    notes = [f"model: {label}; {cfg.n_layers} layers, D {cfg.d_model}, F {cfg.d_ff} "
             f"({cfg.ffn_type} {cfg.activation}), vocab {cfg.vocab_size}, {cfg.dtype}"]
    model = model_lib.Model(cfg)
    if not exact:
        thresholds = decode.fat_thresholds(cfg, args.threshold)
        if batches is not None:
            dense_loss, sparse_loss = decode.loss_change(model, params, batches, sp, thresholds)
            notes.append(f"thresholded (no exact zeros): FAT-eps {args.threshold:g}, validation "
                         f"loss {dense_loss:.4f} -> {sparse_loss:.4f} ({sparse_loss - dense_loss:+.4f})")
        else:
            notes.append(f"thresholded (no exact zeros): FAT-eps {args.threshold:g}")
        sp = sp.replace(thresholds=thresholds, mask_target="activation")
    try:
        kernel, why = decode_ffn.resolve_kernel(args.decode_kernel, cfg)
    except decode_ffn.KernelError as err:
        p.error(f"--decode-kernel: {err}")
    reader = decode_ffn.DECODE_KERNELS[kernel]
    notes.append(f"sparse FFN row reader: {kernel} ({reader.description})"
                 f"{'; ' + why if why else ''}")
    bandwidth = read_bandwidth()
    notes.append(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (float32 sum over 512 MiB); "
                 f"{jax.devices()[0].platform}, jax {jax.__version__}")
    rng = np.random.default_rng(0)
    if batches is not None:
        stream = np.concatenate([b["inputs"].reshape(-1) for b in batches])
    else:
        stream = rng.integers(0, cfg.vocab_size, 1 << 16).astype(np.int32)
    dec = decode.Decoder(cfg, params, sp)
    g = gate_share(cfg.ffn_type)
    rows = []
    configs = [(b, 1) for b in map(int, args.batch.split(","))]
    configs += [(1, k) for k in chunks if k > 1]
    for batch, k in configs:
        span = prompt_len + args.steps * k
        if span > cfg.max_seq_len:
            notes.append(f"batch {batch} chunk {k}: skipped, {span} tokens exceed max_seq_len")
            continue
        starts = rng.integers(0, len(stream) - span, batch)
        seqs = np.stack([stream[s:s + span] for s in starts]).astype(np.int32)
        prompts, cont = list(seqs[:, :prompt_len]), seqs[:, prompt_len:]
        _, stats = dec.teacher_forced(prompts, cont, ffn="sparse", capacity=cfg.d_ff,
                                      tokens_per_step=k, kernel=kernel)
        active = np.array([decode.step_stats(s, cfg.n_layers)[0] for s in stats])  # [steps, N]
        # Per layer the most any measured step needed, rounded up to a multiple of 8.
        capacity = (args.capacity if args.capacity else
                    tuple(int(min(cfg.d_ff, -(-c // 8) * 8)) for c in active.max(0)))
        density = float(active.mean()) / cfg.d_ff
        if reader.capacity:
            read = (capacity if isinstance(capacity, int) else float(np.mean(capacity))) / cfg.d_ff
        else:  # it reads the active rows themselves
            read = density
        # Timed: one step at the end of the prompt, dense and sparse, alternating.
        cache_len = context
        tokens_BxP, start_B = decode.left_pad(prompts)
        start = jnp.asarray(start_B)
        step_in = jnp.asarray(cont[:, :k])
        timed = {}
        for name, ffn, cap in (("dense", "dense", 0), ("sparse", "sparse", capacity)):
            step = dec.step_fn(ffn, cap, kernel=kernel)
            _, cache = dec._prefill(dec.params, dec.init_cache(batch, cache_len),
                                    jnp.asarray(tokens_BxP), start, sp, cache_len=cache_len)
            box = {"cache": cache}

            def run(step=step, box=box, n=args.steps):
                for _ in range(n):
                    tok, _, box["cache"], _ = step(dec.params, box["cache"], step_in,
                                                   jnp.int32(prompt_len), start, sp,
                                                   jax.random.key(0), cache_len=cache_len)
                tok.block_until_ready()
            run()
            timed[name] = run
        # The FFN stack alone on this step's real FFN inputs (ffn_norm outputs).
        seq = jnp.asarray(seqs[:, :prompt_len + k])
        _, inter = jax.jit(lambda p, t: model.module.apply(
            {"params": p}, t, sparsity=sp, capture_intermediates=(
                lambda mdl, _: mdl.name == "ffn_norm"), mutable=["intermediates"]))(params, seq)
        xs = [inter["intermediates"][f"layer_{i}"]["ffn_norm"]["__call__"][0][:, -k:]
              for i in range(cfg.n_layers)]
        idx = jnp.int32(prompt_len)
        dense_ffn = ffn_stack(cfg, dec.params, sp, None)
        sparse_ffn = ffn_stack(cfg, dec.params, sp, model_lib.Decode(
            index=idx, start_B=start, cache_len=cache_len, ffn="sparse", capacity=capacity,
            step_fallback=True, kernel=kernel))  # as in the step: overflow checked once per step
        for fn in (dense_ffn, sparse_ffn):
            fn(xs).block_until_ready()

        def loop(fn, n=args.steps):
            for _ in range(n):
                out = fn(xs)
            out.block_until_ready()
        timed["dense_ffn"] = lambda: loop(dense_ffn)
        timed["sparse_ffn"] = lambda: loop(sparse_ffn)
        t = {name: v / args.steps for name, v in alternate(timed, args.rounds).items()}
        share = t["dense_ffn"] / t["dense"]
        fb = ffn_bound(read, g)
        mb = model_bound(fb, min(share, 1.0))
        step_x = t["dense"] / t["sparse"]
        bytes_dense = step_bytes(cfg, params, batch, cache_len)
        bytes_sparse = step_bytes(cfg, params, batch, cache_len, read)
        tokens = batch * k
        rows.append([batch, k, f"{density:.1%}", f"{read:.1%}",
                     f"{tokens / t['dense']:.1f}", f"{tokens / t['sparse']:.1f}", f"{step_x:.2f}",
                     f"{t['dense_ffn'] / t['sparse_ffn']:.2f}", f"{fb:.2f}", f"{share:.0%}",
                     f"{mb:.2f}", f"{step_x / mb:.0%}",
                     f"{bytes_dense / 1e6:.0f}", f"{bytes_dense / bandwidth / t['dense']:.0%}",
                     f"{bytes_sparse / bandwidth / t['sparse']:.0%}"])
        notes.append(f"batch {batch} chunk {k}: per-layer active "
                     f"{[f'{a / cfg.d_ff:.1%}' for a in active.mean(0)]}"
                     f"{f', capacity {capacity}' if reader.capacity else ''}; "
                     f"step ms dense {t['dense'] * 1e3:.2f} sparse {t['sparse'] * 1e3:.2f}, "
                     f"FFN stack ms dense {t['dense_ffn'] * 1e3:.2f} sparse {t['sparse_ffn'] * 1e3:.2f}")
    head = ["batch", "chunk k", "active", "read", "dense tok/s", "sparse tok/s", "step x",
            "FFN x", "FFN bound", "FFN share", "model bound", "of bound", "MB/step (dense)",
            "dense of roofline", "sparse of roofline"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")
    for n in notes:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
