"""benchmarks/sparse_speed.py: its bounds, and a run on a tiny recipe-trained model."""

import pathlib
import re
import subprocess
import sys

import pytest

from sparsejax import config, trainer
from sparsejax import configure

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import sparse_speed  # noqa: E402


def test_bounds():
    for ffn_type, g in (("gated", 1 / 3), ("plain", 1 / 2)):
        assert sparse_speed.gate_share(ffn_type) == pytest.approx(g)
        assert sparse_speed.ffn_bound(1.0, g) == pytest.approx(1.0)  # dense: no gain
        assert sparse_speed.ffn_bound(0.0, g) == pytest.approx(1 / g)  # only the mask is left
        # The kernels recompute the gate: at full density they do 1 + g of the dense work.
        assert sparse_speed.kernel_bound(1.0, g) == pytest.approx(1 / (1 + g))
    assert sparse_speed.ffn_bound(0.1, 1 / 3) == pytest.approx(1 / (1 / 3 + 0.1 * 2 / 3))
    assert sparse_speed.model_bound(2.5, 1.0) == pytest.approx(2.5)
    assert sparse_speed.model_bound(2.5, 0.0) == pytest.approx(1.0)
    assert sparse_speed.model_bound(2.0, 0.5) == pytest.approx(1 / 0.75)
    share = sparse_speed.ffn_flop_share(config.proxy_config("tiny").model, 128)
    assert 0 < share < 1


def test_missing_run_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_speed.py"),
                           "--workdir", str(tmp_path / "none")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --workdir") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_runs_on_a_recipe_trained_run(tmp_path):
    cfg = configure.load(ROOT / "configs" / "recipes" / "chunk_sparsity_tiny.py", [
        "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=160",
        "train.batch_size=8", "train.seq_len=64", "train.steps=12", "train.warmup_steps=2",
        "train.eval_every=1000", "train.checkpoint_every=12", "train.log_every=12",
        "sparsity.chunk.boundaries=0,6"])
    trainer.train(cfg, tmp_path / "run", progress=False)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_speed.py"),
                           "--workdir", str(tmp_path / "run"), "--batches", "1", "--repeats", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "block_sparse runs the pure-JAX tile path" in out
    assert "tiles 8 tokens × 32 neurons" in out  # the recipe's chunk length; 32 divides 160
    rows = [line for line in out.splitlines() if line.startswith(("| forward", "| train step"))]
    assert len(rows) == 2, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        density, speedup, bound = float(cells[1]), float(cells[4].rstrip("×")), float(cells[5].rstrip("×"))
        assert 0 < density <= 1 and speedup > 0
        assert bound == pytest.approx(sparse_speed.ffn_bound(density, 1 / 3), abs=0.01)
    losses = re.search(r"eval loss einsum ([\d.]+), block_sparse ([\d.]+)", out)
    # ReLU: skipped tiles are exactly zero, so both FFNs give the same loss.
    assert float(losses.group(1)) == pytest.approx(float(losses.group(2)), rel=1e-4)
