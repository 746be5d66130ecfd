import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from sparsejax import config, flops, model
from sparsejax.config import ModelConfig


def test_param_count_matches_initialised_model():
    for cfg in (ModelConfig(), ModelConfig(ffn_type="plain", tie_embeddings=False, n_heads=2, head_dim=48)):
        v = model.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        n = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(v["params"])))
        assert flops.param_counts(cfg).total == n


def test_hand_computed_counts_and_flops():
    cfg = ModelConfig(vocab_size=100, d_model=8, n_layers=3, n_heads=2, head_dim=4, d_ff=20)
    c = flops.param_counts(cfg)
    # per layer: attention 4·8·8 = 256, gated FFN 3·8·20 = 480, two norms 16; final norm 8.
    assert (c.attention, c.ffn, c.norms, c.embedding) == (768, 1440, 56, 800)
    assert c.non_embedding == 2264 and c.total == 3064
    # 6·(768 + 1440 + 8·100) + 12·3·L·8 at L = 10
    assert flops.train_flops_per_token(cfg, 10) == 6 * 3008 + 12 * 3 * 10 * 8


def test_paper_0p1b_is_0p1b_non_embedding():
    """The paper names models by non-embedding parameters: 0.1B within 15%."""
    counts = flops.param_counts(config.paper_config("0.1b").model)
    assert abs(counts.non_embedding / 0.1e9 - 1) < 0.15
    for size in ("0.2b", "0.4b", "0.8b", "1.2b", "2.4b"):
        n = flops.param_counts(config.paper_config(size).model).non_embedding
        assert abs(n / (float(size[:-1]) * 1e9) - 1) < 0.25, size


def test_mfu_and_peak_lookup():
    assert flops.peak_tflops_for("TPU v5 lite") == 197.0
    assert flops.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops_for("weird accelerator") == 0.0
    assert math.isnan(flops.mfu(1e6, 1e9, 1, 0.0))
    assert flops.mfu(1e3, 1e9, 2, 1.0) == pytest.approx(0.5)  # 1e12 / (2 · 1e12)
