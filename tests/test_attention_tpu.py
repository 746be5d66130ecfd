"""The train step with ``model.attention_impl=splash`` through the TPU compiler on this CPU.

As tests/test_tpu_fit.py: ``jax.experimental.topologies`` describes a v5e:2x2 slice from libtpu
and the real train step is compiled for it (Mosaic included), nothing executed. Needs libtpu:
skipped locally without it, a failure under ``CI=true``.
"""

import os
import pathlib
import sys

import pytest
from libtpu_guard import require_libtpu

from sparsejax import attention, config, configure

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import tpu_fit  # noqa: E402

pytestmark = pytest.mark.slow  # compiles for TPU with libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# The tiny proxy at L = 256 with 128-blocks (4 score blocks, 3 computed), on the v5e:2x2 mesh.
SMALL = ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "model.scan_layers=true",
         "model.dtype=bfloat16", "train.batch_size=8", "train.seq_len=256",
         "model.max_seq_len=256", "model.n_kv_heads=2", "model.attention_block_q=128",
         "model.attention_block_kv=128"]


@pytest.fixture(scope="module")
def libtpu():
    require_libtpu("compile train steps for TPU")


@pytest.mark.parametrize("impl, remat", [("splash", "full"), ("auto", "save_qkv_attention")])
def test_splash_train_step_compiles_for_v5e_2x2(libtpu, impl, remat):
    cfg = configure.apply_overrides(config.proxy_config("tiny"), SMALL + [
        f"model.attention_impl={impl}", f"model.remat_policy={remat}"])
    step = tpu_fit.compile_step(cfg, "v5e:2x2", per_chip_batch=2)
    text = step.compiled.as_text()
    # "auto" resolves by the mesh's platform (TPU), not this CPU host's backend. Forward and
    # both backward kernels are Mosaic custom calls, so nothing fell back to interpret mode.
    assert text.count("tpu_custom_call") >= 3, text[:2000]
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert kernel in text, kernel
    assert step.compiled.memory_analysis().temp_size_in_bytes > 0

    row = tpu_fit.fit_row(step, "v5e:2x2")
    assert row.attention == "splash" and row.seq_len == 256 and row.fits
    tokens_per_chip = 8 * 256 / 4
    want = attention.train_flops_per_token(cfg.model, 256, "splash") * tokens_per_chip
    assert row.attention_flops_per_chip == pytest.approx(want)
    assert "| splash | 256 |" in tpu_fit.markdown(row)

