"""A trained run as a Hugging Face checkpoint: ``python -m sparsejax.hf_export``.

    python -m sparsejax.hf_export --workdir RUN [--step N] --out DIR [--dtype float32|bfloat16]
        [--max-shard-size 5GB] [--overwrite] [--tokenizer FILE]

writes, into ``DIR``:

* ``config.json``: ``LlamaForCausalLM`` (``model_type`` llama), or MiniCPM's
  ``MiniCPMForCausalLM`` when the run uses MiniCPM's scalings (``model.scale_emb``,
  ``model.scale_depth``, ``model.dim_model_base``; Hu et al. 2024): grouped-query attention,
  ``head_dim``, RoPE θ and its ``linear`` / ``llama3`` scaling, RMSNorm ε, tied or untied
  ``lm_head``, ``hidden_act``;
* ``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json`` above ``--max-shard-size``), ``float32`` (the trained
  parameters exactly) or ``bfloat16``;
* ``generation_config.json``; the tokenizer: the run's ``tokenizer.json``, or its SentencePiece
  model as ``tokenizer.model`` plus (unigram models) a ``tokenizer.json`` that encodes as it
  does (:func:`sentencepiece_tokenizer_json`), and the byte tokenizer as a ``tokenizer.json``
  (byte-level BPE without merges: token id = UTF-8 byte) that encodes every text as it does;
  ``tokenizer_config.json`` (transformers' fast tokenizer over that tokenizer.json);
* ``sparsejax.json``: the run, the step, the activation as trained and the whole ``sparsity``
  section, including what ``config.json`` cannot say (a FATReLU threshold: named in a
  ``warning:`` line too, since a loader of ``config.json`` computes plain ReLU).

What the target formats cannot compute is refused before anything is written (one line naming
the config field and what is missing, exit 2): activations other than those of
:data:`ACTIVATION_EXPORTS` (which include ReLU²-GLU, ``relu2`` in transformers' ``ACT2FN``, and
identity, ``linear`` there; dReLU, xSiLU with α ≠ 0, GoLU, PolyCom and a shifted ReLU with a
threshold have no ``hidden_act``: :data:`MISSING`), a plain (non-gated) FFN (LLaMA's MLP is
always gated), a trained top-k, and MiniCPM with a ``head_dim`` other than d_model / n_heads.

The name and layout table is :func:`sparsejax.hf_import.param_mapping` (its ``to_hf``
conversions), so an export reads back through :mod:`sparsejax.hf_import` as the same model;
RoPE needs no permutation (see that module). The run directory is opened read-only
(:mod:`sparsejax.trained_run`); ``DIR`` is written as a temporary directory beside it and
renamed into place, so a failure leaves no half-written checkpoint, and an existing non-empty
``DIR`` is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Callable

import numpy as np

from sparsejax import config as config_lib

SPARSEJAX_FILE = "sparsejax.json"
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD = "5GB"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30}


class ExportError(ValueError):
    """The run cannot be exported as asked: one line naming the field or argument."""


# ----------------------------------------------------------------------------- activations
@dataclasses.dataclass(frozen=True)
class ActivationExport:
    """How one ``model.activation`` is written: the ``hidden_act`` (an ``hf_import.HIDDEN_ACTS``
    name) and, for activations with a threshold, whether a nonzero threshold is refused (it
    changes the values: shifted ReLU) or recorded in ``sparsejax.json`` with a warning (it only
    zeroes small activations: FATReLU, computed as ReLU by the target)."""

    hidden_act: str
    threshold: str = ""  # "" (no threshold), "record" or "refuse"
    alpha_zero: bool = False  # exportable only with model.activation_alpha == 0


# model.activation -> its export. Everything else has no hidden_act (see the module docstring).
ACTIVATION_EXPORTS = {
    "relu": ActivationExport("relu"), "silu": ActivationExport("silu"),
    "swish": ActivationExport("swish"), "gelu": ActivationExport("gelu"),
    "gelu_tanh": ActivationExport("gelu_tanh"), "relu2": ActivationExport("relu2"),
    "fatrelu": ActivationExport("relu", threshold="record"),
    "shifted_relu": ActivationExport("relu", threshold="refuse"),
    "xsilu": ActivationExport("silu", alpha_zero=True),
    "identity": ActivationExport("identity"),
}
# Why the other activations have no hidden_act (the refusal names it).
MISSING = {
    "drelu": "dReLU applies ReLU to the up projection too; LLaMA's MLP computes act(gate)·up",
    "golu": "transformers' ACT2FN has no GoLU",
    "polyrelu": "PolyCom's polynomial of ReLU is not in transformers' ACT2FN",
    "polynorm": "PolyCom's normalized polynomial is not in transformers' ACT2FN",
}


def _refuse(field: str, value: Any, why: str) -> ExportError:
    return _refuse_text(f"{field}={value!r}", why)


def _refuse_text(setting: str, why: str) -> ExportError:
    return ExportError(f"cannot export: {setting} {why}")


def activation_threshold(cfg: config_lib.Config, step: int) -> float:
    """The activation threshold the model computed with at ``step`` (0 when there is none)."""
    from sparsejax import schedules, sparsity_plan

    s = cfg.sparsity.activation_threshold
    if schedules.is_default(s):
        return 0.0
    constant = sparsity_plan.constant_value(s)  # the config's number, not its float32 rounding
    return constant if constant is not None else float(schedules.value(s, step))


def check_exportable(cfg: config_lib.Config, step: int) -> tuple[str, list[str]]:
    """(HF ``hidden_act``, warnings); ExportError for what the target formats cannot compute."""
    from sparsejax import hf_import, schedules

    m = cfg.model
    exp = ACTIVATION_EXPORTS.get(m.activation)
    if exp is None:
        why = MISSING.get(m.activation, "it is not in transformers' ACT2FN")
        raise _refuse("model.activation", m.activation, f"has no Hugging Face hidden_act ({why}; "
                      f"exportable: {', '.join(ACTIVATION_EXPORTS)})")
    if exp.alpha_zero and m.activation_alpha != 0:
        raise _refuse("model.activation_alpha", m.activation_alpha,
                      f"({m.activation}) has no Hugging Face hidden_act; only alpha=0 (SiLU) does")
    if m.ffn_type != "gated":
        raise _refuse("model.ffn_type", m.ffn_type, "has no LLaMA/MiniCPM form (their MLP is "
                      "gated: down(act(gate(x)) * up(x))); exportable: 'gated'")
    if not schedules.is_default(cfg.sparsity.topk):
        raise _refuse_text(config_lib.term_text("topk", cfg.sparsity.topk),
                           "(a trained top-k) has no LLaMA/MiniCPM form: their FFN is dense")
    if minicpm_scalings(m) and m.head_dim * m.n_heads != m.d_model:
        raise _refuse("model.head_dim", m.head_dim, f"with MiniCPM scalings: MiniCPM computes "
                      f"head_dim = d_model / n_heads = {m.d_model / m.n_heads:g}")
    warnings = []
    threshold = activation_threshold(cfg, step)
    if threshold != 0 and exp.threshold == "refuse":
        raise _refuse_text(f"sparsity.activation_threshold={threshold:g}",
                           f"({m.activation} at step {step}) has no Hugging Face hidden_act; "
                           f"only 0 (ReLU) has")
    if threshold != 0:
        warnings.append(f"warning: {m.activation} threshold {threshold:g} (sparsity."
                        f"activation_threshold at step {step}) is not expressible in config.json: "
                        f"loaders compute hidden_act={hf_import.HIDDEN_ACTS[exp.hidden_act]!r}; "
                        f"it is recorded in {SPARSEJAX_FILE}")
    return hf_import.HIDDEN_ACTS[exp.hidden_act], warnings


# --------------------------------------------------------------------------------- config
def minicpm_scalings(m: config_lib.ModelConfig) -> bool:
    return m.scale_emb != 1.0 or m.scale_depth > 0 or m.dim_model_base > 0


def _rope_scaling(m: config_lib.ModelConfig) -> dict | None:
    """``rope_scaling`` as :data:`sparsejax.hf_import.ROPE_SCALINGS` reads it (None: default)."""
    from sparsejax import hf_import

    if m.rope_type == "default":
        return None
    out = {"rope_type": m.rope_type}
    for hf_key, (field, _) in hf_import.ROPE_SCALINGS[m.rope_type].items():
        out[hf_key] = getattr(m, field)
    return out


def hf_config(cfg: config_lib.Config, *, hidden_act: str, dtype: str) -> dict:
    """``config.json`` of the run's model: every key :func:`sparsejax.hf_import.model_config`
    reads, in transformers' LlamaConfig (or MiniCPM's MiniCPMConfig) names. No
    ``bos_token_id``: the run trained on documents packed without BOS / EOS, so a reader that
    prepends the config's BOS (``eval.py --hf``) must not."""
    m = cfg.model
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim, "hidden_act": hidden_act,
        "max_position_embeddings": max(m.max_seq_len, cfg.train.seq_len),
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": _rope_scaling(m),
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "pretraining_tp": 1, "initializer_range": m.init_std,
        "use_cache": True, "torch_dtype": dtype,
    }
    if minicpm_scalings(m):
        # MiniCPM (openbmb remote code): scale_depth / sqrt(n_layers) multiplies each residual
        # branch and h / (hidden_size / dim_model_base) enters lm_head; this project's "off"
        # values (0) are the neutral sqrt(n_layers) and d_model there.
        out.update({
            "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
            "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                         "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
            "scale_emb": m.scale_emb,
            "scale_depth": m.scale_depth if m.scale_depth > 0 else math.sqrt(m.n_layers),
            "dim_model_base": m.dim_model_base if m.dim_model_base > 0 else m.d_model,
            "attention_type": "vanilla", "ffn_type": "vanilla"})
        del out["head_dim"], out["mlp_bias"]
    return out


# ------------------------------------------------------------------------------ tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json() -> str:
    """:class:`sparsejax.data.ByteTokenizer` as a ``tokenizers`` tokenizer.json: byte-level
    pre-tokenization of the whole text (no regex split, no prefix space) and a BPE over the 256
    byte characters without merges, so token id = UTF-8 byte; decoding is byte-level too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str(pretty=True)


# SentencePiece ModelProto.SentencePiece.Type values that text may match: NORMAL, USER_DEFINED.
_SPM_MATCHED = (1, 4)
_SPM_UNIGRAM = 1  # TrainerSpec.ModelType.UNIGRAM


def sentencepiece_tokenizer_json(tokenizer) -> str | None:
    """A SentencePiece unigram model as a ``tokenizers`` tokenizer.json (None for other model
    types), as transformers' SpmConverter builds one: the model's normalization (its precompiled
    NFKC charsmap; leading, trailing and repeated spaces removed), "▁" for spaces with one in
    front (``add_dummy_prefix``), words split at "▁", the unigram pieces with their scores, and
    byte fallback. Pieces text must not match (control, unknown, byte pieces) get a score far
    below any other, so they are chosen only where SentencePiece would too — except in a text
    that spells one out (``<s>``, ``<0x41>``) with characters outside the vocabulary.
    ``tokenizer``: the model as :func:`sparsejax.data.load_tokenizer` loads it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = tokenizer.model_proto()
    if proto.trainer_spec.model_type != _SPM_UNIGRAM:
        return None
    vocab = [(p.piece, p.score if p.type in _SPM_MATCHED else -1e9) for p in proto.pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id,
                                   byte_fallback=proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if spec.add_dummy_prefix else "never",
        split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok.to_str(pretty=True)


@dataclasses.dataclass
class TokenizerFiles:
    """The files that carry the run's tokenizer into the export, and its special tokens."""

    files: dict[str, Callable[[pathlib.Path], None]]  # name in the export -> writer
    special: dict[str, int]  # bos_token_id / eos_token_id when the tokenizer has them
    tokenizer_config: dict


def tokenizer_files(cfg: config_lib.Config, override: str | None = None) -> TokenizerFiles:
    """The run's tokenizer as export files (``override``: a SentencePiece .model or a
    tokenizer.json to use instead); ExportError if its file cannot be found."""
    from sparsejax import data

    fast = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": max(cfg.model.max_seq_len, cfg.train.seq_len)}
    if override:
        path = pathlib.Path(override)
        if path.suffix not in data.TOKENIZER_FILES or not path.is_file():
            raise ExportError(f"--tokenizer={override!r} is not a readable SentencePiece .model or "
                              f"tokenizer.json file")
        try:
            tokenizer = data.load_tokenizer(path, field="--tokenizer")
        except data.DataError as err:
            raise ExportError(str(err)) from None
        size = tokenizer.vocab_size
        if size > cfg.model.vocab_size:
            raise ExportError(f"--tokenizer={override!r} has {size} tokens, more than the model's "
                              f"model.vocab_size={cfg.model.vocab_size}")
    else:
        try:
            path = data.tokenizer_file(cfg)
        except data.DataError as err:  # the training text that finds a cached SentencePiece model
            raise ExportError(f"the run's SentencePiece model cannot be found without its training "
                              f"data ({err}); give its file with --tokenizer") from None
        if path is None:
            text = byte_tokenizer_json()
            return TokenizerFiles({"tokenizer.json": lambda p: p.write_text(text)}, {}, fast)
        field = "tokenizer_path" if cfg.data.tokenizer_path else "cache_dir"
        if not path.is_file():
            raise ExportError(f"the run's tokenizer {path} (data.{field}="
                              f"{getattr(cfg.data, field)!r}) is not there; run from the directory "
                              f"the run was trained from, or give the file with --tokenizer")
        try:
            tokenizer = data.load_tokenizer(path, field=f"data.{field}" if field == "tokenizer_path"
                                            else "the cached SentencePiece model")
        except data.DataError as err:
            raise ExportError(str(err)) from None
    special = tokenizer.special_ids()
    copy = lambda name: (lambda p: shutil.copyfile(path, p))  # noqa: E731
    if path.suffix == ".json":
        return TokenizerFiles({"tokenizer.json": copy("tokenizer.json")}, special, fast)
    # tokenizer.model for the converters that read it (llama.cpp, PowerInfer); tokenizer.json,
    # which transformers' fast tokenizer reads, for a unigram model (the kind data.tokenizer=
    # sentencepiece trains). transformers' LlamaTokenizer would read tokenizer.model as BPE.
    files = {"tokenizer.model": copy("tokenizer.model")}
    text = sentencepiece_tokenizer_json(tokenizer)
    if text is None:
        return TokenizerFiles(files, special, {})
    files["tokenizer.json"] = lambda p: p.write_text(text)
    return TokenizerFiles(files, special, fast)


# ----------------------------------------------------------------------------- safetensors
def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``100KiB`` or a byte count -> bytes; ValueError naming the flag."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ExportError(f"--max-shard-size={text!r} is not a size; use e.g. 5GB, 500MB, 100KB "
                          f"or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """One tensor to write: its HF shape and dtype now, its array (HF layout) when asked, so
    that only one shard's converted copies exist at a time beside the parameters."""

    shape: tuple[int, ...]
    dtype: Any
    array: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def hf_tensors(params: dict, m: config_lib.ModelConfig, dtype: str) -> dict[str, HfTensor]:
    """HF name -> :class:`HfTensor` in HF layout and ``dtype``, by the one table
    (``hf_import.param_mapping``), in the table's order."""
    import ml_dtypes

    from sparsejax import hf_import

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    out = {}
    for name, entry in hf_import.param_mapping(m).items():
        value = params
        for key in entry.path:
            value = value[key]
        out[name] = HfTensor(
            hf_import.hf_shape(entry.path, tuple(np.shape(value))), np_dtype,
            lambda value=value, entry=entry: np.ascontiguousarray(
                entry.to_hf(np.asarray(value, np.float32)).astype(np_dtype)))
    return out


def shard(tensors: dict[str, HfTensor], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, a new shard whenever the next would pass ``max_bytes`` (a tensor
    larger than the limit gets a shard of its own), as transformers' ``save_pretrained`` does."""
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    return shards


def write_safetensors(out: pathlib.Path, tensors: dict[str, HfTensor], max_bytes: int) -> list[str]:
    """``model.safetensors``, or shards and their index; returns the file names written."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from sparsejax import hf_import

    meta = {"format": "pt"}  # transformers reads safetensors files only with this tag
    shards = shard(tensors, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, part in zip(names, shards):
        arrays = {t: tensors[t].array() for t in part}
        try:
            save_file(arrays, str(out / name), metadata=meta)
        except SafetensorError as err:  # its I/O errors (a full disk) are not OSErrors
            raise OSError(f"{name}: {err}") from None
        del arrays
    if len(shards) == 1:
        return names
    weight_map = {t: name for name, part in zip(names, shards) for t in part}
    total = sum(t.nbytes for t in tensors.values())
    (out / hf_import.INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return names + [hf_import.INDEX_FILE]


# ---------------------------------------------------------------------------------- output
def check_out(out: pathlib.Path, overwrite: bool) -> None:
    """``--out`` may be written: absent, an empty directory, or (``--overwrite``) a directory."""
    from sparsejax import rundir

    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    try:
        rundir.check_writable_dir(out.parent, "--out's parent directory")
    except rundir.RunDirError as err:
        raise ExportError(str(err)) from None


@contextlib.contextmanager
def staged_dir(out: pathlib.Path):
    """A temporary directory beside ``out``, renamed to ``out`` when the block succeeds (an
    existing ``out`` is moved aside first and removed after); removed when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rename(old)
        _default_modes(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _default_modes(directory: pathlib.Path) -> None:
    """Files readable as the umask allows (safetensors creates its files owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------- export
@dataclasses.dataclass
class ExportPlan:
    """Everything decided before any parameter is read (so refusals come first)."""

    cfg: config_lib.Config
    step: int
    hidden_act: str
    warnings: list[str]
    tokenizer: TokenizerFiles


def plan_export(run, step: int | None, tokenizer: str | None = None) -> ExportPlan:
    """Check the run's model against the target formats, pick the step (newest by default) and
    find the tokenizer."""
    if step is None:
        step = run.steps[-1]
    elif step not in run.steps:
        raise ExportError(f"--step {step} is not a finished checkpoint of {run.workdir}; "
                          f"available: {run.steps}")
    hidden_act, warnings = check_exportable(run.cfg, step)
    return ExportPlan(run.cfg, step, hidden_act, warnings, tokenizer_files(run.cfg, tokenizer))


def read_params(run, step: int) -> dict:
    """The step's parameters on one device, ``layer_{i}`` layout, as numpy float32."""
    import jax

    from sparsejax import model as model_lib, sharding

    cfg = run.cfg
    mesh = sharding.make_mesh(dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1),
                              jax.devices()[:1])
    params, _ = run.params(step, mesh)
    params = model_lib.convert_layout(jax.device_get(params), cfg.model.n_layers, False)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None,
           dtype: str = "float32", max_shard_bytes: int | None = None, overwrite: bool = False,
           tokenizer: str | None = None, log: Callable[[str], None] = print) -> pathlib.Path:
    """Export one step of the run in ``workdir`` to ``out``; returns ``out``."""
    from sparsejax import trained_run

    if dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype!r} is not allowed; allowed values: {list(DTYPES)}")
    max_shard_bytes = max_shard_bytes or parse_size(DEFAULT_MAX_SHARD)
    out = pathlib.Path(out)
    if out.resolve().is_relative_to(pathlib.Path(workdir).resolve()):
        raise ExportError(f"--out {out} is inside --workdir {workdir}, which export only reads")
    check_out(out, overwrite)
    try:
        run = trained_run.load(workdir)
    except trained_run.RunError as err:
        raise ExportError(str(err)) from None
    plan = plan_export(run, step, tokenizer)
    for line in plan.warnings:
        log(line)
    try:
        params = read_params(run, plan.step)
    except trained_run.RunError as err:
        raise ExportError(str(err)) from None
    tensors = hf_tensors(params, plan.cfg.model, dtype)
    with staged_dir(out) as tmp:
        _json(tmp / "config.json", hf_config(plan.cfg, hidden_act=plan.hidden_act, dtype=dtype))
        # The tokenizer's own BOS / EOS ids, for generation (the run saw neither in training).
        _json(tmp / "generation_config.json",
              {"_from_model_config": True, **plan.tokenizer.special})
        write_safetensors(tmp, tensors, max_shard_bytes)
        for name, write in plan.tokenizer.files.items():
            write(tmp / name)
        if plan.tokenizer.tokenizer_config:
            _json(tmp / "tokenizer_config.json", plan.tokenizer.tokenizer_config)
        _json(tmp / SPARSEJAX_FILE, {
            "source": str(pathlib.Path(workdir).resolve()), "step": plan.step,
            "activation": plan.cfg.model.activation,
            "activation_threshold": activation_threshold(plan.cfg, plan.step),
            "hidden_act": plan.hidden_act, "warnings": plan.warnings,
            "sparsity": config_lib.to_json_dict(plan.cfg)["sparsity"],
            "config": config_lib.to_json_dict(plan.cfg)})
    return out


# ------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsejax.hf_export",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the trained run's directory (read-only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--out", required=True, help="the Hugging Face checkpoint directory to write")
    p.add_argument("--dtype", default="float32", help=f"stored weights: {' or '.join(DTYPES)} "
                   f"(default float32, the trained parameters exactly)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                   help=f"above this, model.safetensors is split into shards with an index "
                        f"(default {DEFAULT_MAX_SHARD})")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--tokenizer", default=None,
                   help="a SentencePiece .model or tokenizer.json to export instead of the run's "
                        "(when its cached SentencePiece model or training data is elsewhere)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparsejax import lifecycle

    lifecycle.quiet_console()
    try:
        out = export(args.workdir, args.out, step=args.step, dtype=args.dtype,
                     max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
                     tokenizer=args.tokenizer, log=lambda line: print(line, file=sys.stderr))
    except ExportError as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"export error: writing {args.out} failed: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"exported {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
