"""benchmarks/decode_speed.py: the bytes a decode step reads, and a run on the golden fixture."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

import golden_run

from sparsejax import model as model_lib
from sparsejax.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import decode_speed  # noqa: E402


@pytest.mark.parametrize("tied,ffn_type", [(True, "gated"), (False, "gated"), (True, "plain")])
def test_step_bytes_counts_weights_rows_and_cache(tied, ffn_type):
    d, f, n, h, k, g, v = 32, 96, 3, 4, 8, 2, 64
    cfg = ModelConfig(vocab_size=v, d_model=d, n_layers=n, n_heads=h, head_dim=k, d_ff=f,
                      n_kv_heads=g, tie_embeddings=tied, ffn_type=ffn_type)
    params = model_lib.Model(cfg).init(jax.random.key(0), 8)
    attn = d * h * k * 2 + d * g * k * 2  # query, out; key, value
    gate = d * f
    rest = (2 if ffn_type == "gated" else 1) * d * f  # W_in (gated) and W_out: rows gathered
    norms = 2 * d
    head = v * d  # the tied table as the output projection, or the untied unembed
    cache = 2 * n * 2 * 10 * g * k  # key and value, batch 2, 10 slots
    for read in (1.0, 0.25):
        want = 4 * (n * (attn + gate + rest * read + norms) + d + head + cache)
        assert decode_speed.step_bytes(cfg, params, 2, 10, read) == pytest.approx(want, abs=4)


@pytest.mark.slow
def test_benchmark_runs_on_a_trained_run(tmp_path):
    run = golden_run.build_run(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "benchmarks/decode_speed.py", "--workdir", str(run),
                        "--batch", "1,2", "--chunk", "1,4", "--steps", "2", "--rounds", "1",
                        "--context", "64"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "1"], ["| 2", "1"], ["| 1", "4"]]
    assert "read bandwidth" in r.stdout and "per-layer active" in r.stdout
