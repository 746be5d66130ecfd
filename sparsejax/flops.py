"""Analytic parameter counts, training FLOPs per token and MFU (MaxText / PaLM style).

Parameter count: the Sparsing Law paper names its models by the *non-embedding* count (e.g. the
"0.1B" model has 0.109B non-embedding and 0.203B total parameters with its 122,753-token
vocabulary); :func:`param_counts` returns both.

FLOPs per training token (PaLM, Chowdhery et al. 2022, App. B):
``6·(N_nonembed + d_model·V) + 12·n_layers·L·(n_heads·head_dim)``; the first term is the
forward+backward matmuls (the unembedding matmul counts even when tied to the embedding table),
the second attention's QKᵀ and AV products over a context of L tokens (no causal discount, as in
PaLM). Norms, RoPE and softmax are not counted.
"""

from __future__ import annotations

import dataclasses

from sparsejax.config import ModelConfig

# Dense bf16 peak TFLOP/s per device (vendor datasheets), used when train.peak_tflops is 0.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "cpu": 0.0,  # unknown: MFU is reported as NaN unless --set train.peak_tflops=... is given
}


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token embedding (plus the unembedding when untied)
    attention: int  # all layers
    ffn: int  # all layers
    norms: int

    @property
    def non_embedding(self) -> int:
        return self.attention + self.ffn + self.norms

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
    # Q and O over n_heads, K and V over the key/value heads (fewer under grouped-query attention).
    attn_per_layer = 2 * cfg.d_model * (cfg.n_heads + cfg.kv_heads) * cfg.head_dim
    ffn_mats = 3 if cfg.ffn_type == "gated" else 2
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return ParamCounts(
        embedding=embedding,
        attention=cfg.n_layers * attn_per_layer,
        ffn=cfg.n_layers * ffn_mats * cfg.d_model * cfg.d_ff,
        norms=(2 * cfg.n_layers + 1) * cfg.d_model,
    )


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per token (see module docstring)."""
    counts = param_counts(cfg)
    matmul_params = counts.attention + counts.ffn + cfg.d_model * cfg.vocab_size
    attention = 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 6.0 * matmul_params + attention


def peak_tflops_for(device_kind: str) -> float:
    """Peak TFLOP/s for a ``jax.Device.device_kind`` (longest matching prefix), 0 if unknown."""
    matches = [k for k in PEAK_TFLOPS if device_kind.lower().startswith(k.lower())]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else 0.0


def mfu(tokens_per_second: float, flops_per_token: float, n_devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation; NaN when the peak is unknown (0)."""
    if peak_tflops <= 0:
        return float("nan")
    return tokens_per_second * flops_per_token / (n_devices * peak_tflops * 1e12)
