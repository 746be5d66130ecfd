"""Range and cross-field checks of a config, each error one line naming the field and what is
allowed.

Choices that a registry offers are checked by that registry, next to what it registers
(``activations.check_config``, ``ffn.check_config``, ``model.check_config``,
``data.check_config``), so this module imports none of them; ``sparsejax.configure.validate``
runs these checks and theirs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from sparsejax import schedules
from sparsejax.config.schema import Config, ConfigError, SparsityConfig
from sparsejax.schedules import Schedule

# The terms of the sparsity section: its schedule fields (a new regulariser is one more).
SPARSITY_TERMS = tuple(f.name for f in dataclasses.fields(SparsityConfig)
                       if f.default_factory is Schedule)


def terms_on(cfg: Config) -> list[str]:
    """The sparsity section's terms whose schedule is not the default (constant 0): those on."""
    return [n for n in SPARSITY_TERMS if not schedules.is_default(getattr(cfg.sparsity, n))]


def choice(path: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not allowed; allowed values: {list(allowed)}")


def positive(path: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value!r} must be {bound}")


def check(cfg: Config) -> Config:
    """Ranges and cross-field rules of every section (registry choices excluded: see the module
    docstring); raise ConfigError naming the field and its allowed values; return cfg."""
    m = cfg.model
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "max_seq_len"):
        positive(f"model.{name}", getattr(m, name))
    positive("model.rope_theta", m.rope_theta)
    positive("model.rope_factor", m.rope_factor)
    positive("model.rope_low_freq_factor", m.rope_low_freq_factor)
    positive("model.rope_original_max_len", m.rope_original_max_len)
    if m.rope_type == "llama3" and not m.rope_high_freq_factor > m.rope_low_freq_factor:
        raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
                          f"model.rope_low_freq_factor={m.rope_low_freq_factor} for rope_type='llama3'")
    positive("model.norm_eps", m.norm_eps)
    positive("model.n_kv_heads", m.n_kv_heads, allow_zero=True)
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} "
                          f"(0 = n_heads)")
    positive("model.scale_emb", m.scale_emb)
    positive("model.scale_depth", m.scale_depth, allow_zero=True)
    positive("model.dim_model_base", m.dim_model_base, allow_zero=True)
    positive("model.init_std", m.init_std)
    if m.mup and m.dim_model_base <= 0:
        raise ConfigError(f"model.mup=true needs model.dim_model_base > 0 (the width the base "
                          f"learning rate is tuned at); got {m.dim_model_base}")
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs)")
    choice("model.ffn_type", m.ffn_type, ("gated", "plain"))
    choice("model.dtype", m.dtype, ("float32", "bfloat16"))
    d = cfg.data
    choice("data.source", d.source, ("embedded", "tfds", "text"))
    choice("data.tokenizer", d.tokenizer, ("byte", "sentencepiece"))
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
        positive(f"train.{name}", getattr(t, name))
    if not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= t.steps
               for s in t.checkpoint_steps):
        raise ConfigError(f"train.checkpoint_steps={tuple(t.checkpoint_steps)!r} must be integer steps "
                          f"in [1, train.steps={t.steps}]")
    positive("train.learning_rate", t.learning_rate)
    positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    positive("train.weight_decay", t.weight_decay, allow_zero=True)
    positive("train.grad_clip", t.grad_clip, allow_zero=True)
    positive("train.peak_tflops", t.peak_tflops, allow_zero=True)
    positive("train.fault_nan_at_step", t.fault_nan_at_step, allow_zero=True)
    choice("train.optimizer", t.optimizer, ("adamw",))
    choice("train.schedule", t.schedule, ("wsd", "cosine", "constant"))
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

    _check_sparsity(cfg)

    for name in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, name)
        if size != -1 and size < 1:
            raise ConfigError(f"mesh.{name}={size} must be -1 (all remaining devices) or >= 1")
    if sum(getattr(cfg.mesh, n) == -1 for n in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    return cfg


def term_text(name: str, s: Schedule) -> str:
    """How a term reads in an error: ``sparsity.x=<number>`` when constant, else its values."""
    if s.kind == "constant":
        return f"sparsity.{name}={s.values[0]!r}"
    return f"sparsity.{name}.values={tuple(s.values)!r}"


def _check_sparsity(cfg: Config) -> None:
    """The sparsity section: well-formed schedules, values in range, compatible with the model."""
    sp, m = cfg.sparsity, cfg.model
    for name in SPARSITY_TERMS:
        s = getattr(sp, name)
        if not isinstance(s, Schedule):
            raise ConfigError(f"sparsity.{name} must be a Schedule, got {type(s).__name__}")
        try:
            schedules.validate(s, f"sparsity.{name}")
        except schedules.ScheduleError as err:
            raise ConfigError(str(err)) from None
        if any(v < 0 for v in s.values):
            raise ConfigError(f"{term_text(name, s)} must be >= 0")
    for v in sp.topk.values:
        if v >= 1 and (v != int(v) or v > m.d_ff):
            raise ConfigError(f"{term_text('topk', sp.topk)}: {v!r} is not allowed; allowed: "
                              f"0 (dense), a fraction in (0, 1), or an integer k in "
                              f"[1, d_ff={m.d_ff}]")
    choice("sparsity.topk_mode", sp.topk_mode, ("exact", "approx"))
    if not 0 < sp.topk_recall <= 1:
        raise ConfigError(f"sparsity.topk_recall={sp.topk_recall} must be in (0, 1]")
    if sp.topk_mode == "approx" and sp.topk.kind != "constant":
        raise ConfigError("sparsity.topk_mode='approx' needs a constant sparsity.topk (a scheduled "
                          "k uses the exact rank mask)")
    positive("sparsity.chunk_len", sp.chunk_len)
    positive("sparsity.chunk_tau", sp.chunk_tau)
    positive("sparsity.fat_eps", sp.fat_eps, allow_zero=True)
    if "chunk" in terms_on(cfg) and cfg.train.seq_len % sp.chunk_len:
        raise ConfigError(f"sparsity.chunk_len={sp.chunk_len} must divide train.seq_len="
                          f"{cfg.train.seq_len} for the chunk penalty")
