"""Preset configs: the Sparsing Law paper's model sizes and the CPU proxy sizes."""

from __future__ import annotations

from sparsejax.config.schema import (Config, ConfigError, DataConfig, ModelConfig,
                                     TrainConfig)


# The Sparsing Law paper's model sizes (docs/sparsity_metrics_and_laws.md §Paper models):
# d_ff = 2.5 d_model, head dim 128, vocab 122,753.
PAPER_SIZES: dict[str, tuple[int, int, int, int]] = {
    # name: (d_model, n_layers, d_ff, n_heads)
    "0.1b": (768, 16, 1920, 6),
    "0.2b": (1024, 20, 2560, 8),
    "0.4b": (1280, 24, 3200, 10),
    "0.8b": (1536, 28, 3840, 12),
    "1.2b": (1792, 32, 4480, 14),
    "2.4b": (2304, 40, 5760, 18),
}
PAPER_VOCAB_SIZE = 122_753


# The paper models' µP constants (MiniCPM's, which the Sparsing Law models share): embeddings ×
# 12, residual branches × 1.4/√n_layers, widths measured against 256, init std 0.1 (matrices
# 0.1/√(d_model/256)), one peak learning rate 0.01 for every size (matrices 0.01·256/d_model).
PAPER_MUP = dict(mup=True, scale_emb=12.0, scale_depth=1.4, dim_model_base=256, init_std=0.1)
PAPER_LEARNING_RATE = 1e-2


def paper_config(size: str, activation: str = "relu") -> Config:
    """Config of one Sparsing Law model size (docs/sparsity_metrics_and_laws.md §Paper models):
    gated FFN, sequence 4096, µP (:data:`PAPER_MUP`, :mod:`sparsejax.mup`) with the paper's peak
    learning rate 0.01 at every size, RMSNorm ε 1e-5, AdamW (0.9, 0.95), weight decay 0.1, WSD.
    """
    if size not in PAPER_SIZES:
        raise ConfigError(f"paper size {size!r} unknown; allowed: {sorted(PAPER_SIZES)}")
    d_model, n_layers, d_ff, n_heads = PAPER_SIZES[size]
    return Config(
        name=f"sparsing_law_{size}_{activation}",
        model=ModelConfig(
            vocab_size=PAPER_VOCAB_SIZE, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
            head_dim=128, d_ff=d_ff, ffn_type="gated", activation=activation,
            max_seq_len=4096, dtype="bfloat16", norm_eps=1e-5, **PAPER_MUP,
        ),
        data=DataConfig(source="tfds", tfds_name="c4", tokenizer="sentencepiece",
                        sentencepiece_vocab_size=PAPER_VOCAB_SIZE),
        train=TrainConfig(batch_size=512, seq_len=4096, learning_rate=PAPER_LEARNING_RATE,
                          schedule="wsd", steps=100_000, warmup_steps=2_000, b1=0.9, b2=0.95,
                          weight_decay=0.1),
    )


def paper_pod_config(size: str, *, grad_accum: int, activation: str = "relu",
                     loss_tile_len: int = 0) -> Config:
    """A paper size set up for a TPU pod slice: all devices on the fsdp axis, layers scanned,
    each block rematerialised in full, ``train.grad_accum`` (with ``train.loss_tile_len``,
    the vocabulary-tiled loss, where it is what lets a larger micro-batch fit) for the
    sequences of 4,096 tokens a device holds per micro-batch, and ``model.attention_impl=auto``
    (splash attention on TPU: less temp memory and fewer executed FLOPs at every size; the
    einsum attention on CPU). Chosen per size by compiling the real train step for the slice
    its config file names, on CPU (``python benchmarks/tpu_fit.py``, README "Fit on TPU")."""
    cfg = paper_config(size, activation=activation)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    cfg.model.scan_layers = True
    cfg.model.remat_policy = "full"
    cfg.model.attention_impl = "auto"
    cfg.train.grad_accum = grad_accum
    cfg.train.loss_tile_len = loss_tile_len
    return cfg


# CPU proxy sizes for laptops and CI: byte-level vocabulary, same 2.5x FFN ratio as the paper.
PROXY_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    # name: (d_model, n_layers, d_ff, n_heads, head_dim)
    "tiny": (128, 5, 320, 4, 32),  # ~1.0M parameters
    "small": (320, 8, 800, 5, 64),  # ~9.5M parameters
}


def proxy_config(size: str, activation: str = "relu") -> Config:
    """A CPU-sized model with the paper's FFN shape (gated, d_ff = 2.5 d_model), byte tokens."""
    if size not in PROXY_SIZES:
        raise ConfigError(f"proxy size {size!r} unknown; allowed: {sorted(PROXY_SIZES)}")
    d_model, n_layers, d_ff, n_heads, head_dim = PROXY_SIZES[size]
    return Config(
        name=f"{size}_{activation}",
        model=ModelConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                          head_dim=head_dim, d_ff=d_ff, ffn_type="gated", activation=activation,
                          max_seq_len=512),
        train=TrainConfig(batch_size=16, seq_len=128, steps=300, learning_rate=3e-3,
                          warmup_steps=30, log_every=10, eval_every=100, checkpoint_every=100),
    )


