#!/usr/bin/env python
"""Block-sparse FFN: dense vs kernel vs the pure-JAX tile path, and TPU compile cost.

    python benchmarks/block_sparse_ffn.py [--configs 0.1B 1.2B] [--tokens 2048] [--backward]
    python benchmarks/block_sparse_ffn.py --tpu-compile [--tokens 4096]

Timing mode: FFN shapes of the Sparsing Law paper's 0.1B (d_model 768, d_ff 1920) and 1.2B
(1792, 4480) models, gated (SwiGLU-shaped, SiLU), random tile masks with the same number of
active neuron blocks in every token block, at block densities from 5% to 100%. Columns: dense
FFN time, kernel time (``impl`` of the backend: Pallas TPU or GPU), pure-JAX time (gather +
einsum in XLA), and their speedups over dense next to the 1/density bound. On a CPU there is no
kernel to time (Pallas interpret mode measures the Python interpreter, not a kernel): only the
reference is timed, and the table says so. The reference's measured break-even density on CPU
is what ``ffn.DENSE_FALLBACK_DENSITY["cpu"]`` is set from.

``--tpu-compile``: with libtpu installed, compiles the TPU kernels' forward + backward
(value_and_grad) and the dense FFN's for each TPU generation (v4, v5e, v5p, v6e topologies from
``jax.experimental.topologies``), dtype and model shape on this CPU-only machine, and reports
compile time and XLA's ``memory_analysis`` (argument, output, temporary bytes; temporaries are
the HBM the step needs beyond its inputs and outputs) next to the dense FFN's. Nothing runs on a
TPU; a compile failure (e.g. VMEM over the generation's capacity) is reported as such.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Nothing runs on a TPU here, so this process may share libtpu with another compiling one (its
# lockfile otherwise aborts the second process), as in benchmarks/tpu_fit.py.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax.kernels import block_mask as bm  # noqa: E402
from sparsejax.kernels import ffn  # noqa: E402

SHAPES = {"0.1B": (768, 1920), "1.2B": (1792, 4480)}
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2")


def _problem(d, f, t, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(ks[0], (t, d), dtype)
    w = [(jax.random.normal(k, s) / s[0] ** 0.5).astype(dtype)
         for k, s in zip(ks[1:], ((d, f), (d, f), (f, d)))]
    return x, *w


def random_mask(n, m, density, seed=0) -> bm.BlockMask:
    """Each token block gets the same number of random active neuron blocks (≥ 1).

    k_max is that number: the lists are as wide as the busiest token block needs. The pure-JAX path
    computes every slot of the static width (padded slots are zeroed, not skipped), so an index
    list padded to M would cost it as much as the dense FFN.
    """
    per_row = max(1, round(density * m))
    rng = np.random.default_rng(seed)
    active = np.zeros((n, m), bool)
    for row in active:
        row[rng.choice(m, per_row, replace=False)] = True
    return bm.from_block_activity(jnp.asarray(active), k_max=per_row)


def _best(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def timing(args) -> None:
    backend = jax.default_backend()
    kernel_impl = {"tpu": "tpu", "gpu": "gpu"}.get(backend)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(f"backend {backend} ({jax.devices()[0].device_kind}), dtype {args.dtype}, "
          f"T={args.tokens}, block_t={args.block_t}, block_f={args.block_f}, "
          f"{'forward+backward' if args.backward else 'forward'}, best of {args.repeats}")
    if kernel_impl is None:
        print("CPU: no Pallas kernel to time (interpret mode is not a kernel); "
              "only the pure-JAX tile path is timed.")
    for name in args.configs:
        d, f = SHAPES[name]
        m = f // args.block_f
        n = args.tokens // args.block_t
        x, w_in, w_gate, w_out = _problem(d, f, args.tokens, dtype)

        def make(impl):
            def run(x, w_in, w_gate, w_out, index, count):
                mask = bm.BlockMask(index, count, count)
                y = lambda *a: ffn.block_sparse_ffn(  # noqa: E731
                    *a, jax.nn.silu, block_t=args.block_t, block_f=args.block_f, mask=mask,
                    impl=impl, dense_fallback_density=1.0)
                if not args.backward:
                    return y(x, w_in, w_gate, w_out)
                return jax.grad(lambda *a: jnp.sum(y(*a).astype(jnp.float32)), (0, 1, 2, 3))(
                    x, w_in, w_gate, w_out)
            return jax.jit(run)

        impls = ["dense"] + ([kernel_impl] if kernel_impl else []) + ["jax"]
        fns = {i: make(i) for i in impls}
        print(f"\n{name}: d_model {d}, d_ff {f}, M={m} neuron blocks, N={n} token blocks")
        head = f"{'density':>8} {'1/dens':>7} {'dense ms':>9}"
        if kernel_impl:
            head += f" {'kernel ms':>10} {'speedup':>8}"
        print(head + f" {'jax ms':>9} {'speedup':>8}")
        dense_ms = None
        for target in args.densities:
            mask = random_mask(n, m, target)
            dens = float(bm.density(mask, m))
            call = (x, w_in, w_gate, w_out, mask.index_NxK, mask.count_N)
            if dense_ms is None:  # the dense FFN ignores the density: time it once
                dense_ms = 1e3 * _best(fns["dense"], call, args.repeats)
            row = f"{dens:8.3f} {1 / dens:7.2f} {dense_ms:9.2f}"
            if kernel_impl:
                k_ms = 1e3 * _best(fns[kernel_impl], call, args.repeats)
                row += f" {k_ms:10.2f} {dense_ms / k_ms:8.2f}"
            r_ms = 1e3 * _best(fns["jax"], call, args.repeats)
            print(row + f" {r_ms:9.2f} {dense_ms / r_ms:8.2f}")


def tpu_compile(args) -> None:
    from jax.experimental import topologies

    print(f"TPU compile on {jax.default_backend()} host (no TPU attached): T={args.tokens}, "
          f"block_t={args.block_t}, block_f={args.block_f}, k_max=M, gated SiLU, "
          "value_and_grad of sum(y). MiB from memory_analysis().")
    head = (f"{'topology':>10} {'model':>5} {'dtype':>8} {'impl':>6} {'compile s':>9} "
            f"{'args MiB':>9} {'out MiB':>8} {'temp MiB':>9} {'code KiB':>9}")
    print(head)
    mib = 2.0**-20
    for topo_name in args.topologies:
        device = topologies.get_topology_desc(platform="tpu", topology_name=topo_name).devices[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        for name in args.configs:
            d, f = SHAPES[name]
            n, m = args.tokens // args.block_t, f // args.block_f
            for dtype in (jnp.float32, jnp.bfloat16):
                spec = lambda s, dt=dtype: jax.ShapeDtypeStruct(s, dt, sharding=sharding)  # noqa
                shapes = (spec((args.tokens, d)), spec((d, f)), spec((d, f)), spec((f, d)),
                          spec((n, m), jnp.int32), spec((n,), jnp.int32))
                for impl in ("tpu", "dense"):
                    def loss(x, w_in, w_gate, w_out, index, count, impl=impl):
                        mask = bm.BlockMask(index, count, count)
                        y = ffn.block_sparse_ffn(x, w_in, w_gate, w_out, jax.nn.silu,
                                                 block_t=args.block_t, block_f=args.block_f,
                                                 mask=mask, impl=impl, dense_fallback_density=1.0)
                        return jnp.sum(y.astype(jnp.float32))
                    start = time.perf_counter()
                    label = f"{topo_name:>10} {name:>5} {jnp.dtype(dtype).name:>8} {impl:>6}"
                    try:
                        compiled = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3))).trace(
                            *shapes).lower().compile()
                    except Exception as err:  # report and go on to the next configuration
                        msg = " ".join(str(err).split())[:200]
                        print(f"{label} FAILED after {time.perf_counter() - start:.1f}s: "
                              f"{type(err).__name__}: {msg}")
                        continue
                    seconds = time.perf_counter() - start
                    mem = compiled.memory_analysis()
                    print(f"{label} {seconds:9.2f} {mem.argument_size_in_bytes * mib:9.1f} "
                          f"{mem.output_size_in_bytes * mib:8.1f} "
                          f"{mem.temp_size_in_bytes * mib:9.1f} "
                          f"{mem.generated_code_size_in_bytes / 1024:9.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--block-t", type=int, default=128)
    p.add_argument("--block-f", type=int, default=128)
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tpu-compile", action="store_true")
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    args = p.parse_args(argv)
    if args.tpu_compile:
        tpu_compile(args)
    else:
        timing(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
