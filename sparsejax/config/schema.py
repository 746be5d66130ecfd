"""The config schema: one dataclass per section, and its dict / JSON form.

A config is plain data: this module imports nothing of the model, so config files and sweep
specs load without JAX. Values are checked in two places, each by the module that owns them:
ranges and cross-field rules in :mod:`sparsejax.config.checks`, the choices a registry offers
(activations, FFN and attention implementations, remat policies, RoPE types, tokenizer files) by
that registry; :func:`sparsejax.configure.validate` runs them all.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from typing import Any

from sparsejax import schedules
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
    # Shape parameter of activations that declare it (xsilu). The threshold of fatrelu /
    # shifted_relu is a sparsity control: sparsity.activation_threshold.
    activation_alpha: float = 0.0
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
    # µP training (sparsejax.mup): weight matrices initialised with init_std / sqrt(m) and trained
    # with learning rate LR / m, m = d_model / dim_model_base (which must be > 0), so one LR serves
    # every width. The forward scalings above are separate fields (the paper presets set all).
    mup: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    # FFN implementation (registry sparsejax.ffn.FFN_IMPLS): "reference" (einsum) or
    # "block_sparse" (sparsejax.kernels tiles of ffn_block_t tokens × ffn_block_f neurons).
    ffn_impl: str = "reference"
    ffn_block_t: int = 128
    ffn_block_f: int = 128
    # Causal attention implementation (registry sparsejax.attention.ATTENTION_IMPLS): "xla"
    # (einsum), "splash" (TPU flash kernel skipping masked blocks), "gpu" (Pallas GPU flash
    # kernel), "cudnn" (cuDNN fused attention, bfloat16), or "auto" (splash on TPU, gpu on GPU,
    # else xla). Splash's query / key-value block sizes (multiples of 128, capped at the length).
    attention_impl: str = "xla"
    attention_block_q: int = 512
    attention_block_kv: int = 512
    # nn.scan over the blocks (parameters stacked on a leading "layers" axis): compile time
    # independent of depth. Checkpoints of the other layout are converted on read.
    scan_layers: bool = False
    # Rematerialisation of each block (sparsejax.model.REMAT_POLICIES): "none", "full",
    # "minimal", "save_dots_except_ffn_hidden", "save_qkv_proj", "save_qkv_attention".
    remat_policy: str = "none"

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
class SparsityConfig:
    """Every control of FFN activation sparsity in training, in one section (docs/recipes.md):
    what the forward pass keeps (top-k, the activation's threshold), the regularisers of the
    objective, and the rule the in-graph statistics count active neurons by. One
    :class:`sparsejax.sparsity_plan.SparsityPlan` reads it.

    A term is a schedule of the training step (:mod:`sparsejax.schedules`), computed in-graph so
    that stage changes never recompile and a resumed run continues exactly; a constant schedule
    is a static value (compiled in, e.g. ``lax.top_k`` at a fixed k), and the default (constant
    0) turns the term off. From the command line a number sets a constant
    (``sparsity.topk=0.25``), and a schedule is set field by field
    (``sparsity.l1.kind=sine_stages``, ``sparsity.l1.values=0,1e-4``,
    ``sparsity.l1.boundaries=0,200``; comma-separated).
    """

    # Per-token top-k (Q-Sparse, Lazy Neuron): 0 = dense, a fraction in (0, 1) of d_ff, or an
    # integer k in [1, d_ff]; fractions become counts by the one rule (sparsity.topk_count),
    # a scheduled k is interpolated in counts and rounded.
    topk: Schedule = dataclasses.field(default_factory=Schedule)
    topk_mode: str = "exact"  # a static k: "exact" (lax.top_k) or "approx" (lax.approx_max_k)
    topk_recall: float = 0.95  # recall target of approx_max_k
    topk_ste: bool = False  # straight-through gradient through the top-k mask (Q-Sparse)
    # The `threshold` parameter of model.activation (fatrelu, shifted_relu), e.g. ProSparse's
    # final FATReLU stage.
    activation_threshold: Schedule = dataclasses.field(default_factory=Schedule)
    # λ of the L1 penalty on σ(gate) (ProSparse): per token, summed over neurons and layers.
    l1: Schedule = dataclasses.field(default_factory=Schedule)
    # λ of the chunk-level penalty (BlockFFN-style, objectives.chunk_penalty), per token.
    chunk: Schedule = dataclasses.field(default_factory=Schedule)
    # Chunk length (tokens) of the chunk penalty and of the logged training chunk sparsity.
    chunk_len: int = 8
    # Temperature τ of the chunk penalty's soft "active in the chunk": u = 1 − exp(−Σ|a| / τ).
    chunk_tau: float = 0.1
    # The in-graph statistics' rule for activations without exact zeros: FAT-ε
    # (docs/sparsity_metrics_and_laws.md §Criteria); the ReLU family counts σ ≠ 0.
    fat_eps: float = 1e-2


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
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)



# --------------------------------------------------------------------------------------------
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
    """``cls`` from a dict of its fields, nested dataclasses (the sparsity section's schedules) included;
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


# Fields that live in the ``sparsity`` section under an older path: old dotted path -> new.
# Configs saved with the old paths (config.json, checkpoints' meta, sweep markers) are read
# through :func:`upgrade` (CHANGELOG.md says which versions wrote them),
# and ``--set`` accepts the old paths (``sparsejax.config.overrides``).
MOVED_FIELDS = {
    "model.topk": "sparsity.topk", "model.topk_mode": "sparsity.topk_mode",
    "model.topk_recall": "sparsity.topk_recall", "model.topk_ste": "sparsity.topk_ste",
    "model.activation_threshold": "sparsity.activation_threshold",
    "train.fat_eps": "sparsity.fat_eps",
    "recipe.l1": "sparsity.l1", "recipe.chunk": "sparsity.chunk", "recipe.topk": "sparsity.topk",
    "recipe.activation_threshold": "sparsity.activation_threshold",
    "recipe.chunk_len": "sparsity.chunk_len", "recipe.chunk_tau": "sparsity.chunk_tau",
}
# Static values that became constant schedules (0 = off, the default schedule).
_STATIC_TO_SCHEDULE = ("sparsity.topk", "sparsity.activation_threshold")


def moved_path(path: str) -> str:
    """Today's dotted path of a field given by its path before the move (or itself)."""
    for old, new in MOVED_FIELDS.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return path


def upgrade(raw: dict) -> dict:
    """A config dict written before the ``sparsity`` section existed, in today's layout (a copy;
    today's dicts come back equal). A static ``model.topk`` / ``model.activation_threshold``
    becomes a constant schedule, the ``recipe`` section's schedules move as they are."""
    raw = copy.deepcopy(raw)
    sparsity = dict(raw.get("sparsity") or {})
    moved = False
    for old, new in MOVED_FIELDS.items():
        section, name = old.split(".")
        fields = raw.get(section)
        if not isinstance(fields, dict) or name not in fields:
            continue
        value, moved, field = fields.pop(name), True, new.split(".")[1]
        if new in _STATIC_TO_SCHEDULE and not isinstance(value, dict):
            if not value:
                continue  # off; a schedule of the recipe section may still set the field
            value = {"kind": "constant", "values": [value], "boundaries": []}
        elif isinstance(value, dict) and field in sparsity \
                and schedules.is_default(_build(Schedule, value)):
            continue  # a recipe schedule left at its default does not replace a static value
        sparsity[field] = value
    if not moved:
        return raw
    raw.pop("recipe", None)
    raw["sparsity"] = sparsity
    return raw


def from_raw(raw: dict) -> Config:
    """Inverse of :func:`to_dict` (a run's ``config.json``, a checkpoint's meta; one written before
    the sparsity section through :func:`upgrade`), not validated: ``sparsejax.configure.from_dict``
    validates. Fields a section no longer has are dropped."""
    raw = upgrade(raw)
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for key, value in raw.items():
        if key not in sections:
            raise ConfigError(f"unknown config section {key!r}")
        if isinstance(value, dict):
            kwargs[key] = _build(typing.get_type_hints(Config)[key], value)
        else:
            kwargs[key] = value
    return Config(**kwargs)
