#!/usr/bin/env python
"""Time per token of ``eval.py --hf`` passes on this machine, on a random checkpoint of a real
shape (nothing downloaded).

    python benchmarks/hf_eval_cost.py [--shape 0.1b] [--seq-len 256] [--batch-size 2]
                                      [--batches 2] [--dtype float32] [--keep DIR]

Writes a random MiniCPM-architecture checkpoint of the Sparsing Law paper's shape (``--shape``,
:data:`sparsejax.config.PAPER_SIZES`, vocabulary 122,753, tied embeddings, ReLU; the paper's
released checkpoints have this architecture) as config.json + model.safetensors, imports it with
:mod:`sparsejax.hf_import`, and times — after one compiling call each — the dense pass that
records the CETT intermediates and one CETT sparse pass (the unit a CETT-PPL search repeats
about 10 times). Prints seconds per 1,000 tokens per pass and the same scaled to 1B parameters
(by the forward FLOPs, 2 per matmul weight, embedding lookups free).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from sparsejax import config as config_lib, data, evaluation, hf_import  # noqa: E402

FIXTURE_TOKENIZER = (pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
                     / "minicpm" / "tokenizer.json")


def write_checkpoint(path: pathlib.Path, shape: str) -> None:
    from safetensors.numpy import save_file

    d, n, f, h = config_lib.PAPER_SIZES[shape]
    k, v = 128, config_lib.PAPER_VOCAB_SIZE
    rng = np.random.default_rng(0)
    w = {"model.embed_tokens.weight": rng.standard_normal((v, d), dtype=np.float32),
         "model.norm.weight": np.ones(d, np.float32)}
    for i in range(n):
        p = f"model.layers.{i}."
        for name, out_in in (("self_attn.q_proj", (h * k, d)), ("self_attn.k_proj", (h * k, d)),
                             ("self_attn.v_proj", (h * k, d)), ("self_attn.o_proj", (d, h * k)),
                             ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)),
                             ("mlp.down_proj", (d, f))):
            w[p + name + ".weight"] = rng.standard_normal(out_in, dtype=np.float32) / math.sqrt(out_in[1])
        w[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
    path.mkdir(parents=True, exist_ok=True)
    save_file(w, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "minicpm", "architectures": ["MiniCPMForCausalLM"], "vocab_size": v,
        "hidden_size": d, "intermediate_size": f, "num_hidden_layers": n, "num_attention_heads": h,
        "num_key_value_heads": h, "hidden_act": "relu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "scale_emb": 12,
        "dim_model_base": 256, "scale_depth": 1.4, "bos_token_id": 1, "eos_token_id": 2}))
    shutil.copy(FIXTURE_TOKENIZER, path / "tokenizer.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="0.1b", choices=sorted(config_lib.PAPER_SIZES))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--keep", default=None, help="write the checkpoint here and keep it")
    args = p.parse_args(argv)

    scratch = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="hf_bench_"))
    try:
        if not (scratch / "config.json").is_file():
            write_checkpoint(scratch, args.shape)
        ckpt = hf_import.open_checkpoint(scratch, seq_len=args.seq_len, dtype=args.dtype)
        m = ckpt.model
        tokens = np.random.default_rng(1).integers(3, 320, 10 * args.batches * args.batch_size
                                                   * args.seq_len).astype(np.int32)
        batches = data.sequential_batches(tokens, args.batch_size, args.seq_len, args.batches,
                                          bos_id=1, overlap=False)
        cfg = hf_import.run_config(m, "bench", batch_size=args.batch_size, seq_len=args.seq_len,
                                   eval_batches=args.batches)
        run = hf_import.HfRun(ckpt, cfg, hf_import.load_params(ckpt))
        ev = evaluation.Evaluator(cfg, evaluation.EvalOptions(), batches)
        params, _ = run.params(0, ev.mesh)

        def timed(fn):
            fn()  # compile
            start = time.perf_counter()
            out = fn()
            return time.perf_counter() - start, out

        dense_s, dense = timed(lambda: ev.dense(params, keep_hidden=True))
        sparse_s, _ = timed(lambda: ev.cett_pass(params, dense.hidden, 0.2))
        n_tokens = ev.eval_tokens
        # Forward matmul weights: attention and FFN of every layer plus the output projection.
        matmul = (m.n_layers * (2 * m.d_model * (m.n_heads + m.kv_heads) * m.head_dim
                                + 3 * m.d_model * m.d_ff) + m.d_model * m.vocab_size)
        print(f"shape {args.shape}: {hf_import.n_params_human(ckpt.n_params)} parameters "
              f"({matmul / 1e6:.0f}M matmul weights), {args.dtype}, {n_tokens} tokens per pass "
              f"({args.batches} x {args.batch_size} x {args.seq_len})")
        for name, seconds in (("dense pass + CETT cache", dense_s), ("CETT sparse pass", sparse_s)):
            per_k = seconds / n_tokens * 1000
            print(f"{name:<26}{seconds:8.2f} s  {per_k:7.2f} s / 1k tokens  "
                  f"{per_k * 1e9 / matmul:7.2f} s / 1k tokens per 1B matmul weights")
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
