"""The real train step through the TPU compiler on CPU (benchmarks/tpu_fit.py), for a small slice.

Needs libtpu (``pip install 'jax[tpu]==<jax version>'``): skipped locally without it, a failure
under ``CI=true`` so a CI image without libtpu cannot pass silently.
"""

import pathlib
import sys

import pytest
from libtpu_guard import require_libtpu

from sparsejax import config, flops
from sparsejax import configure

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import tpu_fit  # noqa: E402

pytestmark = pytest.mark.slow  # compiles paper configs for TPU with libtpu


@pytest.fixture(scope="module")
def libtpu():
    require_libtpu("compile train steps for TPU")


def test_small_train_step_compiles_for_v5e_2x2_and_fits(libtpu):
    cfg = configure.apply_overrides(config.proxy_config("tiny"), [
        "mesh.data=1", "mesh.fsdp=-1", "model.scan_layers=true", "model.remat_policy=full",
        "model.dtype=bfloat16", "train.batch_size=16", "train.seq_len=128"])
    row = tpu_fit.compile_fit(cfg, "v5e:2x2", per_chip_batch=2)
    assert row.mesh == "1x4x1" and row.grad_accum == 2 and row.per_chip_batch == 2
    assert row.fits and 0 < row.argument_bytes and row.hbm_bytes == 16 * 2**30
    assert row.temp_bytes > 0 and row.xla_flops > 0
    # Full remat recomputes the forward pass: 3/4 of executed FLOPs are model FLOPs.
    assert row.mfu_at_peak == pytest.approx(0.75)
    tokens_per_chip = 16 * 128 / 4
    want = flops.train_flops_per_token(cfg.model, 128) * tokens_per_chip * 4 / 3
    assert row.flops_per_chip == pytest.approx(want)
    assert row.step_s_at_peak == pytest.approx(want / 197e12)
    assert "| v5e:2x2 |" in tpu_fit.markdown(row)


def test_topology_batch_mismatch_is_a_config_error(libtpu):
    cfg = configure.apply_overrides(config.proxy_config("tiny"), ["train.batch_size=6"])
    with pytest.raises(config.ConfigError, match="train.batch_size=6 is not a multiple of 2"):
        tpu_fit.compile_fit(cfg, "v5e:2x2", per_chip_batch=2)


@pytest.mark.slow
def test_tiled_loss_rows_and_fit_rows_names_the_largest(libtpu, capsys):
    """A train step with the tiled loss compiles for TPU and says so in its row; fit_rows prints
    a row per per-device batch and returns the largest that fits. (The memory it saves at the
    paper's shapes is in the README's fit table; at this size XLA's TPU fusions already avoid
    materialising the plain loss's logits, so the two temps are not compared here.)"""
    cfg = configure.apply_overrides(config.proxy_config("tiny"), [
        "mesh.data=1", "mesh.fsdp=-1", "model.scan_layers=true", "model.remat_policy=full",
        "model.dtype=bfloat16", "train.batch_size=32", "train.seq_len=128",
        "train.loss_tile_len=16"])
    tiled = tpu_fit.compile_fit(cfg, "v5e:2x2", per_chip_batch=2)
    assert tiled.loss_tile_len == 16 and tiled.fits and tiled.temp_bytes > 0
    assert "| 16 |" in tpu_fit.markdown(tiled)
    capsys.readouterr()
    assert tpu_fit.fit_rows(cfg, "v5e:2x2", [2, 8]) == 8
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[6].strip() for r in rows] == ["2 × 4", "8 × 1"]
