#!/usr/bin/env python
"""Time and peak host memory of ``python -m sparsejax.hf_export`` on a run of a real shape.

    python benchmarks/hf_export_cost.py [--shape 0.1b] [--keep DIR]

Writes a run directory as train.py writes one (config.json, an orbax checkpoint of randomly
initialised parameters) for the Sparsing Law paper's shape (``--shape``,
:data:`sparsejax.config.PAPER_SIZES`, vocabulary 122,753; byte tokenizer), then exports it in separate
processes — float32, bfloat16, and float32 in 500 MB shards — and prints, per export, the wall
time, the peak resident memory of the export process (``ru_maxrss``) and the size written,
beside the size of the float32 parameters (the baseline: the least an export must hold). One
exporting process holds the parameters plus the converted tensors of one shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_run(workdir: pathlib.Path, shape: str) -> int:
    """The run; returns the parameters' float32 bytes."""
    import jax
    import numpy as np

    from sparsejax import checkpointing, config as config_lib, model as model_lib, rundir

    # The paper configs read TFDS C4 with a SentencePiece model trained on it; the byte
    # tokenizer of the embedded corpus stands in (the tokenizer does not change the cost).
    cfg = dataclasses.replace(config_lib.paper_config(shape), data=config_lib.DataConfig())
    workdir.mkdir(parents=True)
    raw = config_lib.to_json_dict(cfg)
    rundir.atomic_write(workdir / rundir.CONFIG, json.dumps(raw))
    params = model_lib.Model(cfg.model).init(jax.random.key(0), 8)
    ckpt = checkpointing.Checkpointer(workdir / rundir.CHECKPOINTS, keep_last=1, keep_every=1)
    ckpt.save(1, {"params": params}, {"tokens_seen": 0.0, "config": raw})
    ckpt.wait()
    ckpt.close()
    return sum(int(np.prod(a.shape)) * 4 for a in jax.tree.leaves(params))


# Runs its arguments as a child process and reports the child's peak RSS (KiB) on stderr.
_PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "print('maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(rc)")


def export(workdir: pathlib.Path, out: pathlib.Path, *flags: str) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of one ``python -m sparsejax.hf_export`` process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "sparsejax.hf_export",
                           "--workdir", str(workdir), "--out", str(out), *flags],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"export failed: {proc.stderr.strip()}")
    kib = int(proc.stderr.strip().splitlines()[-1].split()[1])
    return seconds, kib * 1024.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="0.1b")
    p.add_argument("--keep", default=None, help="write here and keep it (default: a temp dir)")
    args = p.parse_args()
    root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="hf_export_cost_"))
    try:
        param_bytes = write_run(root / "run", args.shape)
        gb = 1e9
        print(f"shape {args.shape}: float32 parameters {param_bytes / gb:.2f} GB")
        print("| export | seconds | peak RSS GB | written GB |")
        print("|---|---|---|---|")
        for label, flags in (("float32", ()), ("bfloat16", ("--dtype", "bfloat16")),
                             ("float32, 500MB shards", ("--max-shard-size", "500MB"))):
            out = root / label.replace(" ", "_").replace(",", "")
            seconds, rss = export(root / "run", out, *flags)
            written = sum(f.stat().st_size for f in out.iterdir())
            print(f"| {label} | {seconds:.1f} | {rss / gb:.2f} | {written / gb:.2f} |")
            shutil.rmtree(out)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
