"""Typed experiment configuration: one base config, per-experiment files, CLI overrides.

A config file in ``configs/`` is a Python file with ``get_config() -> Config``. Users change any
field from the command line with ``--set section.field=value`` (MaxText style: one base plus
overrides). Every check in :func:`validate` names the offending field and the allowed values, so
a typo in a launch script fails before any compilation.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import typing
from typing import Any, Sequence

from sparsejax.schedules import Schedule


class ConfigError(ValueError):
    """A config field has a value outside its allowed set."""


@dataclasses.dataclass
class ModelConfig:
    """Decoder-only transformer shape and FFN sparsity (docs/sparsity_metrics_and_laws.md)."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 32
    d_ff: int = 320
    ffn_type: str = "gated"  # "gated": W_out[σ(W_gate x) ⊙ W_in x]; "plain": W_out σ(W_in x)
    activation: str = "relu"
    # Used only by activations that declare it (fatrelu, shifted_relu: threshold; xsilu: alpha).
    activation_threshold: float = 0.0
    activation_alpha: float = 0.0
    # Top-k FFN sparsity: 0 disables; 0 < topk < 1 is a fraction of d_ff; topk >= 1 an integer k.
    topk: float = 0.0
    topk_mode: str = "exact"  # "exact" (lax.top_k) or "approx" (lax.approx_max_k)
    topk_recall: float = 0.95  # recall target of approx_max_k
    topk_ste: bool = False  # straight-through gradient through the top-k mask (Q-Sparse)
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    # RoPE frequency scaling (sparsejax.model.ROPE_TYPES; what HF configs call rope_type):
    # "default" (none); "linear" (frequencies / rope_factor); "llama3" (Llama 3.1+: frequencies
    # with wavelengths above rope_original_max_len / rope_low_freq_factor divided by rope_factor,
    # below rope_original_max_len / rope_high_freq_factor kept, smoothly interpolated between).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    tie_embeddings: bool = True  # False: a separate output projection "unembed" [D, V] (lm_head)
    norm_eps: float = 1e-6
    # Grouped-query attention (Ainslie et al. 2023; Llama 2 70B, Llama 3, Mistral): the number of
    # key/value heads, each shared by n_heads / n_kv_heads query heads. 0 = n_heads (multi-head).
    n_kv_heads: int = 0
    # MiniCPM's µP scalings (Hu et al. 2024), off at their defaults: token embeddings × scale_emb;
    # scale_depth > 0: each residual branch × scale_depth / sqrt(n_layers); dim_model_base > 0:
    # the final hidden state × dim_model_base / d_model before the output projection.
    scale_emb: float = 1.0
    scale_depth: float = 0.0
    dim_model_base: int = 0
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    # FFN implementation (registry sparsejax.ffn.FFN_IMPLS): "reference" (einsum) or
    # "block_sparse" (sparsejax.kernels tiles of ffn_block_t tokens × ffn_block_f neurons).
    ffn_impl: str = "reference"
    ffn_block_t: int = 128
    ffn_block_f: int = 128
    # nn.scan over the blocks (parameters stacked on a leading "layers" axis): compile time
    # independent of depth. Checkpoints of the other layout are converted on read.
    scan_layers: bool = False
    # Rematerialisation of each block (sparsejax.model.REMAT_POLICIES): "none", "full",
    # "minimal", "save_dots_except_ffn_hidden", "save_qkv_proj".
    remat_policy: str = "none"

    @property
    def topk_k(self) -> int:
        """Number of neurons kept per token, or 0 when top-k is off (``sparsity.topk_count``)."""
        from sparsejax import sparsity  # lazy: config files and sweep specs load without JAX

        return sparsity.config_topk_k(self.topk, self.d_ff)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when it is 0 (multi-head attention)."""
        return self.n_kv_heads or self.n_heads


@dataclasses.dataclass
class DataConfig:
    """Where the training text comes from and how it becomes tokens (README "Data")."""

    # "embedded" (offline default corpus), "tfds" (a prepared TFDS dataset, ArrayRecord) or
    # "text" (local files: data.text_files).
    source: str = "embedded"
    # data.source="text": files, directories (their .txt / .jsonl files) or glob patterns; on the
    # command line comma-separated (data.text_files=notes/*.txt,web.jsonl). A .txt file is one
    # document, each line of a .jsonl file one (its data.text_key field).
    text_files: tuple[str, ...] = ()
    text_key: str = "text"
    tfds_name: str = "lm1b"
    tfds_data_dir: str = ""
    tfds_text_key: str = "text"
    tfds_train_split: str = "train"
    tfds_eval_split: str = "validation"  # lm1b has "test" only
    tokenizer: str = "byte"  # "byte" or "sentencepiece" (trained on the corpus and cached)
    # An existing tokenizer, replacing data.tokenizer: a SentencePiece .model or a Hugging Face
    # tokenizer.json. model.vocab_size must equal its vocabulary size, or be 0 to take it from it.
    tokenizer_path: str = ""
    sentencepiece_vocab_size: int = 4096
    cache_dir: str = ".cache/sparsejax"
    validation_fraction: float = 0.05


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 200
    batch_size: int = 16  # global batch, in sequences
    seq_len: int = 128
    grad_accum: int = 1
    # Vocabulary-tiled loss (sparsejax.loss.tiled_next_token_loss): sequence positions per tile
    # whose [batch, tile, vocab] float32 logits exist at a time, in training and evaluation;
    # 0 = off (the full [batch, length, vocab] logits).
    loss_tile_len: int = 0
    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay, as the Sparsing Law paper), "cosine", "constant"
    warmup_steps: int = 20
    decay_fraction: float = 0.1  # share of steps spent in the WSD decay phase
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Activation-ratio logging: FAT-ε for activations that are not ReLU-family
    # (docs/sparsity_metrics_and_laws.md §Criteria).
    fat_eps: float = 1e-2
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_last: int = 3
    keep_every: int = 100  # checkpoints at multiples of this are never deleted (for the law fits)
    # Further steps at which a checkpoint is written and never deleted, besides checkpoint_every:
    # e.g. the log-spaced checkpoints of the finding sweeps (sparsejax.sweep.protocol), whose
    # ratio laws need points spread evenly in log tokens. On the command line comma-separated.
    checkpoint_steps: tuple[int, ...] = ()
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look the device up in flops.PEAK_TFLOPS
    # Failure injection for tests of the NaN guard: the gradients of this step become NaN (0 = off).
    fault_nan_at_step: int = 0
    # Warm start (ProSparse's activation substitution, e.g. a SiLU run into a ReLU config): a run
    # directory or its checkpoints/ directory; a fresh run starts from the parameters of its
    # newest checkpoint, with a new optimizer state and step 0 (sparsejax.warm_start). Ignored
    # when this run resumes from its own checkpoints. "" = off.
    warm_start: str = ""


@dataclasses.dataclass
class RecipeConfig:
    """Training-time sparsity recipe (docs/recipes.md): each term follows a schedule of the step
    (sparsejax.schedules), computed in-graph, so stage changes never recompile and a resumed run
    continues exactly. A schedule left at its default (constant 0) turns its term off.

    Set from the command line as ``recipe.l1.kind=sine_stages``, ``recipe.l1.values=0,1e-4``,
    ``recipe.l1.boundaries=0,200`` (comma-separated).
    """

    # λ of the L1 penalty on σ(gate) (ProSparse): per token, summed over neurons and layers.
    l1: Schedule = dataclasses.field(default_factory=Schedule)
    # λ of the chunk-level penalty (BlockFFN-style, objectives.chunk_penalty), per token.
    chunk: Schedule = dataclasses.field(default_factory=Schedule)
    # Per-token top-k k (Q-Sparse), in the convention of model.topk: 0 = dense, a fraction in
    # (0, 1), or an integer k in [1, d_ff]. Values become neuron counts by the one fraction -> k
    # rule, and k is interpolated in counts and rounded. STE: model.topk_ste.
    topk: Schedule = dataclasses.field(default_factory=Schedule)
    # The `threshold` parameter of model.activation (fatrelu, shifted_relu) over training, e.g.
    # ProSparse's final FATReLU stage; replaces model.activation_threshold (keep that at 0).
    activation_threshold: Schedule = dataclasses.field(default_factory=Schedule)
    # Chunk length (tokens) of the chunk penalty and of the logged training chunk sparsity.
    chunk_len: int = 8
    # Temperature τ of the chunk penalty's soft "active in the chunk": u = 1 − exp(−Σ|a| / τ).
    chunk_tau: float = 0.1


@dataclasses.dataclass
class MeshConfig:
    # -1 means "all remaining devices". Product must equal the device count.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Logical axis -> mesh axis (or None = replicated). MaxText-style rules.
    rules: tuple = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("norm", None),
        ("layers", None),
    )


@dataclasses.dataclass
class Config:
    name: str = "default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    recipe: RecipeConfig = dataclasses.field(default_factory=RecipeConfig)


# --------------------------------------------------------------------------------------------
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


def paper_config(size: str, activation: str = "relu") -> Config:
    """Config of one Sparsing Law model size (docs/sparsity_metrics_and_laws.md §Paper models),
    gated FFN, sequence 4096.

    Departure from the paper: the paper trains with µP (MiniCPM-style width scaling of
    initialisation and learning rates); sparsejax uses standard parameterisation, so the paper's
    peak LR 0.01 is not directly transferable and the default here is lower.
    """
    if size not in PAPER_SIZES:
        raise ConfigError(f"paper size {size!r} unknown; allowed: {sorted(PAPER_SIZES)}")
    d_model, n_layers, d_ff, n_heads = PAPER_SIZES[size]
    return Config(
        name=f"sparsing_law_{size}_{activation}",
        model=ModelConfig(
            vocab_size=PAPER_VOCAB_SIZE, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
            head_dim=128, d_ff=d_ff, ffn_type="gated", activation=activation,
            max_seq_len=4096, dtype="bfloat16",
        ),
        data=DataConfig(source="tfds", tfds_name="c4", tokenizer="sentencepiece",
                        sentencepiece_vocab_size=PAPER_VOCAB_SIZE),
        train=TrainConfig(batch_size=512, seq_len=4096, learning_rate=3e-3, schedule="wsd",
                          steps=100_000, warmup_steps=2_000, b1=0.9, b2=0.95, weight_decay=0.1),
    )


def paper_pod_config(size: str, *, grad_accum: int, activation: str = "relu",
                     loss_tile_len: int = 0) -> Config:
    """A paper size set up for a TPU pod slice: all devices on the fsdp axis, layers scanned,
    each block rematerialised in full, and ``train.grad_accum`` (with ``train.loss_tile_len``,
    the vocabulary-tiled loss, where it is what lets a larger micro-batch fit) for the
    sequences of 4,096 tokens a device holds per micro-batch. Chosen per size by compiling the
    real train step for the slice its config file names, on CPU (``python
    benchmarks/tpu_fit.py``, README "Fit on TPU")."""
    cfg = paper_config(size, activation=activation)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    cfg.model.scan_layers = True
    cfg.model.remat_policy = "full"
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


# --------------------------------------------------------------------------------------------
def _choice(path: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; allowed values: {list(allowed)}")


def _positive(path: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value!r} must be {bound}")


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the field and its allowed values; return cfg unchanged."""
    m = cfg.model
    if cfg.data.tokenizer_path:
        _check_tokenizer_vocab(cfg)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "max_seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    _positive("model.rope_theta", m.rope_theta)
    from sparsejax import model as model_rope  # lazy: the registry lives with the model

    _choice("model.rope_type", m.rope_type, model_rope.rope_type_names())
    _positive("model.rope_factor", m.rope_factor)
    _positive("model.rope_low_freq_factor", m.rope_low_freq_factor)
    _positive("model.rope_original_max_len", m.rope_original_max_len)
    if m.rope_type == "llama3" and not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
                          f"model.rope_low_freq_factor={m.rope_low_freq_factor} for rope_type='llama3'")
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.n_kv_heads", m.n_kv_heads, allow_zero=True)
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} "
                          f"(0 = n_heads)")
    _positive("model.scale_emb", m.scale_emb)
    _positive("model.scale_depth", m.scale_depth, allow_zero=True)
    _positive("model.dim_model_base", m.dim_model_base, allow_zero=True)
    _positive("model.init_std", m.init_std)
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs)")
    _choice("model.ffn_type", m.ffn_type, ("gated", "plain"))
    from sparsejax import activations  # lazy: config files and sweep specs load without JAX

    _choice("model.activation", m.activation, activations.names())
    spec = activations.get(m.activation)
    if m.activation_threshold != 0.0 and "threshold" not in spec.params:
        users = [n for n in activations.names() if "threshold" in activations.get(n).params]
        raise ConfigError(
            f"model.activation_threshold={m.activation_threshold} is only used by {users}, "
            f"not by model.activation={m.activation!r}; set it to 0")
    if m.activation_alpha != 0.0 and "alpha" not in spec.params:
        users = [n for n in activations.names() if "alpha" in activations.get(n).params]
        raise ConfigError(
            f"model.activation_alpha={m.activation_alpha} is only used by {users}, "
            f"not by model.activation={m.activation!r}; set it to 0")
    if m.activation_threshold < 0:
        raise ConfigError(f"model.activation_threshold={m.activation_threshold} must be >= 0")
    _choice("model.topk_mode", m.topk_mode, ("exact", "approx"))
    if not 0 < m.topk_recall <= 1:
        raise ConfigError(f"model.topk_recall={m.topk_recall} must be in (0, 1]")
    if m.topk < 0 or not math.isfinite(m.topk):
        raise ConfigError(f"model.topk={m.topk} must be 0 (off), a fraction in (0, 1), "
                          f"or an integer k in [1, d_ff={m.d_ff}]")
    if m.topk >= 1 and (m.topk != int(m.topk) or m.topk > m.d_ff):
        raise ConfigError(f"model.topk={m.topk} must be an integer k in [1, d_ff={m.d_ff}] "
                          f"or a fraction in (0, 1)")
    _choice("model.dtype", m.dtype, ("float32", "bfloat16"))
    from sparsejax import ffn as ffn_lib, model as model_lib  # lazy: the registries live there

    _choice("model.ffn_impl", m.ffn_impl, ffn_lib.ffn_impl_names())
    _choice("model.remat_policy", m.remat_policy, model_lib.remat_policy_names())
    if m.ffn_impl == "block_sparse":
        _positive("model.ffn_block_t", m.ffn_block_t)
        _positive("model.ffn_block_f", m.ffn_block_f)
        if m.d_ff % m.ffn_block_f:
            raise ConfigError(f"model.ffn_block_f={m.ffn_block_f} must divide model.d_ff={m.d_ff} "
                              f"for model.ffn_impl='block_sparse'")
        if m.topk:
            raise ConfigError(f"model.topk={m.topk} must be 0 with model.ffn_impl='block_sparse' "
                              f"(a tile mask cannot express a per-token top-k); use 'reference'")

    d = cfg.data
    _choice("data.source", d.source, ("embedded", "tfds", "text"))
    _choice("data.tokenizer", d.tokenizer, ("byte", "sentencepiece"))
    if not isinstance(d.text_files, (tuple, list)) or not all(isinstance(f, str) for f in d.text_files):
        raise ConfigError(f"data.text_files={d.text_files!r} must be a list of paths or glob patterns")
    if d.source == "text" and not d.text_files:
        raise ConfigError("data.text_files is empty; data.source='text' needs .txt / .jsonl files, "
                          "directories or glob patterns (data.text_files=docs/*.txt,more.jsonl)")
    if not d.text_key:
        raise ConfigError("data.text_key='' must name the JSONL field that holds the text")
    if d.tokenizer == "byte" and not d.tokenizer_path and m.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 256 for data.tokenizer='byte'")
    if d.sentencepiece_vocab_size < 512:
        raise ConfigError(f"data.sentencepiece_vocab_size={d.sentencepiece_vocab_size} must be >= 512 "
                          f"(byte fallback reserves 256 pieces)")
    if d.tokenizer == "sentencepiece" and not d.tokenizer_path and d.sentencepiece_vocab_size > m.vocab_size:
        raise ConfigError(
            f"data.sentencepiece_vocab_size={d.sentencepiece_vocab_size} exceeds "
            f"model.vocab_size={m.vocab_size}")
    if not 0 < d.validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction={d.validation_fraction} must be in (0, 1)")

    t = cfg.train
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                 "eval_batches", "checkpoint_every", "keep_last", "keep_every"):
        _positive(f"train.{name}", getattr(t, name))
    if not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= t.steps
               for s in t.checkpoint_steps):
        raise ConfigError(f"train.checkpoint_steps={tuple(t.checkpoint_steps)!r} must be integer steps "
                          f"in [1, train.steps={t.steps}]")
    _positive("train.learning_rate", t.learning_rate)
    _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _positive("train.fat_eps", t.fat_eps, allow_zero=True)
    _positive("train.peak_tflops", t.peak_tflops, allow_zero=True)
    _positive("train.fault_nan_at_step", t.fault_nan_at_step, allow_zero=True)
    _choice("train.optimizer", t.optimizer, ("adamw",))
    _choice("train.schedule", t.schedule, ("wsd", "cosine", "constant"))
    if not 0 <= t.decay_fraction <= 1:
        raise ConfigError(f"train.decay_fraction={t.decay_fraction} must be in [0, 1]")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    for name in ("b1", "b2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be in [0, 1)")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if not 0 <= t.loss_tile_len <= t.seq_len:
        raise ConfigError(f"train.loss_tile_len={t.loss_tile_len} must be 0 (off) or in "
                          f"[1, train.seq_len={t.seq_len}]")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")

    _validate_recipe(cfg)

    for name in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, name)
        if size != -1 and size < 1:
            raise ConfigError(f"mesh.{name}={size} must be -1 (all remaining devices) or >= 1")
    if sum(getattr(cfg.mesh, n) == -1 for n in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    return cfg


def _tokenizer_file_vocab(cfg: Config) -> int:
    from sparsejax import data  # lazy: config files and sweep specs load without the tokenizers

    try:
        return data.tokenizer_file_vocab_size(cfg.data.tokenizer_path)
    except data.DataError as err:
        raise ConfigError(str(err)) from None


def _check_tokenizer_vocab(cfg: Config) -> None:
    """With an existing tokenizer the embedding has exactly its vocabulary (0 = resolve first)."""
    size, m = _tokenizer_file_vocab(cfg), cfg.model
    if m.vocab_size == 0:
        raise ConfigError(f"model.vocab_size=0 (take it from data.tokenizer_path) is resolved by "
                          f"config.load / config.apply_overrides; set it to {size}")
    if m.vocab_size != size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} disagrees with the {size}-token vocabulary of "
            f"data.tokenizer_path={cfg.data.tokenizer_path!r}; set model.vocab_size={size} (or 0 "
            f"to take it from the tokenizer)")


def resolve_vocab_size(cfg: Config) -> Config:
    """``model.vocab_size=0`` with ``data.tokenizer_path``: the tokenizer's vocabulary size."""
    if cfg.model.vocab_size != 0 or not cfg.data.tokenizer_path:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vocab_size=_tokenizer_file_vocab(cfg)))


def _validate_recipe(cfg: Config) -> None:
    """The recipe section: well-formed schedules, values in range, compatible with the model."""
    from sparsejax import activations, schedules  # lazy, as above

    r, m = cfg.recipe, cfg.model
    for name in ("l1", "chunk", "topk", "activation_threshold"):
        s = getattr(r, name)
        if not isinstance(s, Schedule):
            raise ConfigError(f"recipe.{name} must be a Schedule, got {type(s).__name__}")
        try:
            schedules.validate(s, f"recipe.{name}")
        except schedules.ScheduleError as err:
            raise ConfigError(str(err)) from None
        if any(v < 0 for v in s.values):
            raise ConfigError(f"recipe.{name}.values={tuple(s.values)!r} must all be >= 0")
    for v in r.topk.values:
        if v >= 1 and (v != int(v) or v > m.d_ff):
            raise ConfigError(f"recipe.topk.values: {v!r} is not allowed; allowed: 0 (dense), a "
                              f"fraction in (0, 1), or an integer k in [1, d_ff={m.d_ff}]")
    _positive("recipe.chunk_len", r.chunk_len)
    _positive("recipe.chunk_tau", r.chunk_tau)
    on = [n for n in ("l1", "chunk", "topk", "activation_threshold")
          if not schedules.is_default(getattr(r, n))]
    if on and m.ffn_impl != "reference":
        raise ConfigError(f"recipe.{on[0]} needs model.ffn_impl='reference' (got {m.ffn_impl!r}): "
                          f"the block-sparse kernels take no traced top-k, threshold or penalty")
    if "topk" in on and m.topk:
        raise ConfigError(f"recipe.topk and model.topk={m.topk} are both set; set model.topk=0 "
                          f"(the recipe's schedule replaces it)")
    if "activation_threshold" in on:
        users = [n for n in activations.names() if "threshold" in activations.get(n).params]
        if m.activation not in users:
            raise ConfigError(f"recipe.activation_threshold is only used by model.activation in "
                              f"{users}, not {m.activation!r} (FATReLU with threshold 0 is ReLU)")
        if m.activation_threshold:
            raise ConfigError(f"recipe.activation_threshold replaces model.activation_threshold="
                              f"{m.activation_threshold}; set that to 0")
    if "chunk" in on and cfg.train.seq_len % r.chunk_len:
        raise ConfigError(f"recipe.chunk_len={r.chunk_len} must divide train.seq_len="
                          f"{cfg.train.seq_len} for the chunk penalty")


# --------------------------------------------------------------------------------------------
def _parse_value(path: str, text: str, annotation: Any) -> Any:
    """Parse override text to the field's declared type (annotations are strings here)."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if kind in ("tuple[float, ...]", "tuple[int, ...]", "tuple[str, ...]"):
        # Comma-separated: recipe.l1.values=0,1e-4,5e-4 (empty text: the empty tuple).
        item = kind[len("tuple["):-len(", ...]")]
        return tuple(_parse_value(path, part.strip(), item) for part in text.split(",") if part.strip())
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{path}={text!r}: expected a boolean (true/false)")
    try:
        if kind == "int":
            as_float = float(text)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if kind == "float":
            return float(text)
    except ValueError:
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{path}={text!r}: expected {article} {kind}") from None
    if kind == "str":
        return text
    raise ConfigError(f"{path} has type {kind!r}, which cannot be set from the command line")


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Return a copy of cfg with ``section.field=value`` overrides applied, then validated."""
    cfg = dataclasses.replace(
        cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name))
                for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        path, text = item.split("=", 1)
        cfg = _set_path(cfg, path.strip(), path.strip().split("."), text)
    return validate(resolve_vocab_size(cfg))


def _set_path(target: Any, path: str, parts: list[str], text: str, depth: int = 0) -> Any:
    """``target`` with the field at ``parts[depth:]`` set from ``text``, rebuilt with
    ``dataclasses.replace`` along the path (nested sections such as a recipe's frozen
    Schedules are values, not mutated in place)."""
    part = parts[depth]
    names = [f.name for f in dataclasses.fields(target)]
    if part not in names:
        where = ".".join(parts[:depth]) or "config"
        raise ConfigError(f"unknown field {path!r}: {where} has fields {names}")
    current = getattr(target, part)
    if depth == len(parts) - 1:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{path!r} is a section; set one of its fields")
        field = next(f for f in dataclasses.fields(target) if f.name == part)
        value = _parse_value(path, text, field.type)
    else:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])!r} is not a section")
        value = _set_path(current, path, parts, text, depth + 1)
    return dataclasses.replace(target, **{part: value})


def _where(err: BaseException, path: pathlib.Path) -> str:
    """'TypeError: message (line N)' with the line in ``path`` where it was raised."""
    import traceback

    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__)
             if pathlib.Path(f.filename).resolve() == path.resolve()]
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}" + (f" (line {lines[-1]})" if lines else "")


def call_file_function(path: str | pathlib.Path, function: str, expected: type, error: type[Exception],
                       what: str):
    """Run ``function()`` of the Python file ``path`` (a config or sweep file) and check its type."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise error(f"{what} file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"sparsejax_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise error(f"{what} file {str(path)!r} line {err.lineno}: SyntaxError: {err.msg}") from None
    except Exception as err:
        raise error(f"{what} file {str(path)!r} failed to load: {_where(err, path)}") from None
    if not hasattr(module, function):
        raise error(f"{what} file {str(path)!r} defines no {function}()")
    try:
        value = getattr(module, function)()
    except error:
        raise
    except Exception as err:
        raise error(f"{what} file {str(path)!r}: {function}() raised {_where(err, path)}") from None
    if not isinstance(value, expected):
        raise error(f"{path}: {function}() returned {type(value).__name__}, expected {expected.__name__}")
    return value


def load(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> Config:
    """Load ``get_config()`` from a config file, apply overrides and validate."""
    return apply_overrides(call_file_function(path, "get_config", Config, ConfigError, "config"), overrides)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_json_dict(cfg: Config) -> dict:
    """``to_dict`` as it reads back from JSON (tuples become lists): the form that config.json
    and sweep markers hold, so a config compares equal to one read from disk."""
    return json.loads(json.dumps(to_dict(cfg)))


def _lists_to_tuples(value: Any) -> Any:
    """JSON turns the tuples of mesh rules into lists; turn them back so configs compare equal."""
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def _build(cls: type, raw: dict) -> Any:
    """``cls`` from a dict of its fields, nested dataclasses (a recipe's schedules) included;
    fields the class no longer has are dropped."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value, kind = raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            kwargs[f.name] = _build(kind, value)
        else:
            kwargs[f.name] = _lists_to_tuples(value)
    return cls(**kwargs)


def from_dict(raw: dict) -> Config:
    """Inverse of to_dict (used to compare a run directory's config with a new one)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for key, value in raw.items():
        if key not in sections:
            raise ConfigError(f"unknown config section {key!r}")
        if isinstance(value, dict):
            kwargs[key] = _build(typing.get_type_hints(Config)[key], value)
        else:
            kwargs[key] = value
    return validate(Config(**kwargs))

