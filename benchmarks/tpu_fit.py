#!/usr/bin/env python
"""Does each paper model's real train step fit a TPU slice? Compiled on CPU, nothing executed.

    python benchmarks/tpu_fit.py [--sizes 0.1b,0.2b] [--topologies v5e:16x16,v4:4x4x4] [--set k=v]

``jax.experimental.topologies.get_topology_desc`` describes a TPU slice from libtpu without any TPU
attached; a mesh built from its devices and ``jax.jit(train_step).lower(abstract_state,
abstract_batch).compile()`` run the real TPU compiler (SPMD partitioning, fusion, rematerialisation,
memory assignment). ``memory_analysis()`` gives the bytes one chip holds (arguments: sharded
params + optimizer state + batch; temp: activations and workspace), ``cost_analysis()`` the FLOPs
one chip executes — but XLA counts each while-loop body once (the micro-batch loop and the
scan over layers), so that count is a per-micro-batch, per-layer-body figure, printed as a check
only. FLOPs per step and chip are therefore the analytic model FLOPs
(``flops.train_flops_per_token`` × tokens / chips) times the recompute factor of the remat
policy (:data:`REMAT_RECOMPUTE`), the attention products as the chosen attention implementation
executes them (below), plus, with ``train.loss_tile_len``, the logits the tiled loss
recomputes in its backward pass (2·D·V per token); the MFU at peak is model / executed FLOPs.

``--loss-tile-lens 0,128`` compiles every row without and with the vocabulary-tiled loss;
``--attention-impls xla,splash`` with the einsum attention and with TPU splash attention
(``model.attention_impl``; ``--set train.seq_len=8192 --set model.max_seq_len=8192`` for a
longer context). The attention column's FLOPs are analytic
(:func:`sparsejax.attention.train_flops_per_token`): the einsum path computes every score of the
[L, L] square, splash only the causal blocks of its block grid, with 9 block matmuls per
training step instead of 6 (its backward recomputes the scores in its dq and dkv kernels; 11
and 8 when the remat policy recomputes the forward pass). XLA's own count does not see splash:
a Pallas call without a cost estimate counts 0.
``--per-device-batches 2,4,8`` compiles each at those sequences per device and micro-batch
(``train.grad_accum`` follows) until one does not fit, and names the largest that does.

For each ``configs/sparsing_law_<size>.py`` × topology it compiles the config's own train step
(mesh, scan, remat, dtype), keeping the config's per-chip micro-batch (``train.batch_size /
(train.grad_accum × chips)`` on the size's intended slice, :data:`INTENDED`) by choosing
``train.grad_accum`` for the other slices, and prints: parameters, mesh, remat, per-chip batch,
argument + temp bytes against the chip's HBM, FLOPs per step and chip, the step time if those
FLOPs ran at the chip's peak, and the MFU that implies.

Needs libtpu (``pip install 'jax[tpu]==<jax version>'``). Compiles of the big models take minutes
each on a small CPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only a compile target here
# Nothing runs on a TPU here, so several compiling processes may share libtpu (its lockfile
# otherwise lets one process at a time load it: parallel tests and benchmarks would abort).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from sparsejax import attention, config, flops, optim, sharding, step  # noqa: E402
from sparsejax import configure

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("0.1b", "0.2b", "0.4b", "0.8b", "1.2b", "2.4b")
TOPOLOGIES = ("v5e:16x16", "v4:4x4x4", "v5p:4x4x8", "v6e:16x16", "v5e:2x2")
# HBM per chip (GiB) and dense bf16 peak (TFLOP/s) by generation (vendor datasheets).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
PEAK = {"v4": flops.PEAK_TFLOPS["TPU v4"], "v5e": flops.PEAK_TFLOPS["TPU v5e"],
        "v5p": flops.PEAK_TFLOPS["TPU v5p"], "v6e": flops.PEAK_TFLOPS["TPU v6 lite"]}
# The slice each paper config's defaults (mesh, remat, grad_accum) are chosen for.
INTENDED = {"0.1b": "v5e:16x16", "0.2b": "v5e:16x16", "0.4b": "v5e:16x16",
            "0.8b": "v4:4x4x4", "1.2b": "v6e:16x16", "2.4b": "v6e:16x16"}
HEADROOM = 0.85  # "fits": arguments + temp within this share of HBM (fragmentation, runtime)
# Per device below: a JAX device is a chip on v5e/v6e and a TensorCore on v4/v5p.
# Executed / model FLOPs of each remat policy: "full" recomputes the forward pass in the backward
# (fwd 1 + bwd 2 + recompute 1 = 4/3 of 3); the others recompute a subset, bounded by that.
REMAT_RECOMPUTE = {"none": 1.0, "full": 4 / 3}


def topology_devices(name: str):
    """TPU devices of a slice description (libtpu, no TPU needed)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices


def n_chips(name: str) -> int:
    """Chips of a topology name ("4x4x8" -> 128)."""
    count = 1
    for dim in name.split(":")[1].split("x"):
        count *= int(dim)
    return count


def hbm_per_device(topology: str, n_devices: int) -> int:
    """HBM bytes of one JAX device: v4 / v5p topologies list each chip's two TensorCores as
    devices (no megacore here), which then share the chip's HBM."""
    return HBM_GIB[topology.split(":")[0]] * 2**30 * n_chips(topology) // n_devices


@dataclasses.dataclass
class FitRow:
    config: str
    topology: str
    params: int
    mesh: str
    remat: str
    scan: bool
    per_chip_batch: int
    grad_accum: int
    loss_tile_len: int
    attention: str
    seq_len: int
    attention_flops_per_chip: float
    argument_bytes: int
    temp_bytes: int
    hbm_bytes: int
    flops_per_chip: float
    xla_flops: float
    step_s_at_peak: float
    mfu_at_peak: float
    compile_s: float

    @property
    def used_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.used_bytes <= HEADROOM * self.hbm_bytes


class CompiledStep(NamedTuple):
    cfg: config.Config  # with the train.grad_accum used
    compiled: Any  # the compiled TPU train step (jax.stages.Compiled)
    mesh: Any
    compile_s: float


def compile_step(cfg: config.Config, topology: str, per_chip_batch: int | None = None
                 ) -> CompiledStep:
    """Compile ``cfg``'s train step for ``topology`` (nothing executed).

    ``per_chip_batch``: sequences per chip per micro-batch; sets ``train.grad_accum``
    (None: the config's own grad_accum).
    """
    devices = topology_devices(topology)
    chips = len(devices)
    if per_chip_batch is not None:
        accum, rest = divmod(cfg.train.batch_size, per_chip_batch * chips)
        if rest or accum < 1:
            raise config.ConfigError(
                f"train.batch_size={cfg.train.batch_size} is not a multiple of {per_chip_batch} "
                f"sequences per chip × {chips} chips of {topology}")
        cfg = configure.apply_overrides(cfg, [f"train.grad_accum={accum}"])
    shards = sharding.plan(cfg.mesh, devices)
    shards.check_batch(cfg.train.batch_size, cfg.train.grad_accum)
    mesh = shards.mesh
    fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg))
    batch = fns.plan.batch_shapes(cfg.train.batch_size, cfg.train.seq_len)
    start = time.perf_counter()
    compiled = fns.train.lower(fns.abstract_state, batch).compile()
    return CompiledStep(cfg, compiled, mesh, time.perf_counter() - start)


def compile_fit(cfg: config.Config, topology: str, per_chip_batch: int | None = None) -> FitRow:
    """Compile ``cfg``'s train step for ``topology`` and measure it (see module docstring).

    ``per_chip_batch``: sequences per chip per micro-batch; sets ``train.grad_accum``
    (None: the config's own grad_accum).
    """
    return fit_row(compile_step(cfg, topology, per_chip_batch), topology)


def fit_row(compiled_step: CompiledStep, topology: str) -> FitRow:
    """The memory and FLOPs of a compiled train step (see module docstring)."""
    cfg, compiled, mesh, compile_s = compiled_step
    chips = len(topology_devices(topology))
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan")))
    generation = topology.split(":")[0]
    tokens = cfg.train.batch_size * cfg.train.seq_len
    model_flops_per_chip = flops.train_flops_per_token(cfg.model, cfg.train.seq_len) * tokens / chips
    recompute = REMAT_RECOMPUTE.get(cfg.model.remat_policy, REMAT_RECOMPUTE["full"])
    # Attention products as the chosen kernel executes them (splash: causal blocks only; XLA's
    # cost analysis counts a Pallas call without a cost estimate as 0), the rest × recompute.
    impl = attention.resolve(cfg.model.attention_impl, "tpu")
    attn_model = attention.train_flops_per_token(
        dataclasses.replace(cfg.model, remat_policy="none"), cfg.train.seq_len, "xla")
    attn_executed = attention.train_flops_per_token(cfg.model, cfg.train.seq_len, impl)
    attention_per_chip = attn_executed * tokens / chips
    flops_per_chip = (model_flops_per_chip - attn_model * tokens / chips) * recompute + attention_per_chip
    if cfg.train.loss_tile_len:
        # The tiled loss recomputes each tile's logits in the backward pass: one more
        # [tokens, D] x [D, V] matmul (sparsejax.loss).
        flops_per_chip += 2 * cfg.model.d_model * cfg.model.vocab_size * tokens / chips
    # PEAK is per chip; a v4 / v5p device is half a chip.
    step_s = flops_per_chip / (PEAK[generation] * 1e12 * n_chips(topology) / chips)
    return FitRow(
        config=cfg.name, topology=topology, params=flops.param_counts(cfg.model).total,
        mesh="x".join(str(mesh.shape[a]) for a in sharding.MESH_AXES),
        remat=cfg.model.remat_policy, scan=cfg.model.scan_layers,
        per_chip_batch=cfg.train.batch_size // (cfg.train.grad_accum * chips),
        grad_accum=cfg.train.grad_accum, loss_tile_len=cfg.train.loss_tile_len,
        attention=impl, seq_len=cfg.train.seq_len, attention_flops_per_chip=attention_per_chip,
        argument_bytes=int(memory.argument_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes), hbm_bytes=hbm_per_device(topology, chips),
        flops_per_chip=flops_per_chip, xla_flops=xla_flops, step_s_at_peak=step_s,
        mfu_at_peak=model_flops_per_chip / flops_per_chip, compile_s=compile_s)


def config_per_chip_batch(cfg: config.Config, size: str) -> int:
    """Sequences per device per micro-batch of the config's defaults on its intended slice."""
    return cfg.train.batch_size // (cfg.train.grad_accum * len(topology_devices(INTENDED[size])))


HEADER = ("| config | topology | params | mesh (data×fsdp×tensor) | remat | per-device batch × accum "
          "| loss tile | attention | seq len | args GiB | temp GiB | HBM GiB | fits | TFLOP/step/device "
          "| of which attention | XLA TFLOP (loop bodies once) | step s at peak | MFU at peak "
          "| compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown(row: FitRow) -> str:
    gib = 2**30
    return (f"| {row.config} | {row.topology} | {row.params / 1e9:.2f}B | {row.mesh} | "
            f"{row.remat}{' + scan' if row.scan else ''} | {row.per_chip_batch} × {row.grad_accum} | "
            f"{row.loss_tile_len or 'off'} | {row.attention} | {row.seq_len} | "
            f"{row.argument_bytes / gib:.2f} | {row.temp_bytes / gib:.2f} | "
            f"{row.hbm_bytes / gib:.0f} | {'yes' if row.fits else 'NO'} | "
            f"{row.flops_per_chip / 1e12:.1f} | {row.attention_flops_per_chip / 1e12:.1f} | "
            f"{row.xla_flops / 1e12:.2f} | "
            f"{row.step_s_at_peak:.2f} | {row.mfu_at_peak:.0%} | "
            f"{row.compile_s:.0f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                   help="comma-separated; INTENDED = each size's own slice (INTENDED table)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--loss-tile-lens", default="",
                   help="comma-separated train.loss_tile_len values to compile each row with "
                        "(0 = the full logits); default: the config's own")
    p.add_argument("--attention-impls", default="",
                   help="comma-separated model.attention_impl values to compile each row with "
                        "(xla, splash, auto; auto = splash on TPU); default: the config's own")
    p.add_argument("--per-device-batches", default="",
                   help="comma-separated sequences per device per micro-batch, ascending; each "
                        "row is compiled at each until one does not fit (default: the config's "
                        "own); the last line names the largest that fits")
    args = p.parse_args(argv)
    import importlib.metadata as md

    versions = {name: md.version(name) for name in ("jax", "jaxlib", "libtpu")}
    print(f"# {datetime.date.today()} · " + " · ".join(f"{k} {v}" for k, v in versions.items()),
          flush=True)
    print(HEADER, flush=True)
    for size in args.sizes.split(","):
        cfg = configure.load(ROOT / "configs" / f"sparsing_law_{size}.py", args.overrides)
        batches = ([int(b) for b in args.per_device_batches.split(",")]
                   if args.per_device_batches else [config_per_chip_batch(cfg, size)])
        tiles = ([int(t) for t in args.loss_tile_lens.split(",")] if args.loss_tile_lens
                 else [cfg.train.loss_tile_len])
        impls = (args.attention_impls.split(",") if args.attention_impls
                 else [cfg.model.attention_impl])
        for topology in args.topologies.replace("INTENDED", INTENDED[size]).split(","):
            for tile, impl in itertools.product(tiles, impls):
                row_cfg = configure.apply_overrides(
                    cfg, [f"train.loss_tile_len={tile}", f"model.attention_impl={impl}"])
                largest = fit_rows(row_cfg, topology, batches)
                print(f"<!-- {cfg.name} {topology} L {cfg.train.seq_len} loss tile "
                      f"{tile or 'off'} attention {impl}: largest per-device batch that fits "
                      f"among {batches}: {largest or 'none'} -->", flush=True)


def fit_rows(cfg: config.Config, topology: str, batches: list[int]) -> int:
    """Print a row per per-device batch in ``batches`` (ascending) until one does not fit or
    compile; return the largest that fits (0: none)."""
    largest = 0
    for per_chip in batches:
        try:
            row = compile_fit(cfg, topology, per_chip)
        except Exception as err:  # a row that does not compile is a result, not a crash
            first = (str(err).strip().splitlines() or [""])[0][:160]
            print(f"| {cfg.name} | {topology} | failed at {per_chip} per device: "
                  f"{type(err).__name__}: {first} |", flush=True)
            return largest
        print(markdown(row), flush=True)
        if not row.fits:
            return largest
        largest = per_chip
    return largest


if __name__ == "__main__":
    main()
