"""Hugging Face checkpoints (LLaMA, Mistral, MiniCPM) as this project's model, without torch.

A local checkpoint directory — ``config.json``, ``*.safetensors`` (one file or shards with
``model.safetensors.index.json``) and ``tokenizer.json`` (or a SentencePiece ``tokenizer.model``)
— becomes a :class:`sparsejax.config.ModelConfig` and a parameter tree of
:class:`sparsejax.model.Transformer` (``layer_{i}`` layout), so every evaluation pass of
:mod:`sparsejax.evaluation` runs on it unchanged. Its tokenizer is loaded by the data package's
one loader (:func:`sparsejax.data.load_tokenizer` of the directory), and its evaluation text cut
into batches by the one text-batching function (:func:`sparsejax.data.sequential_batches`).

Architectures (:data:`ARCHITECTURES`, by ``config.json`` ``model_type``):

* ``llama`` (Llama 2, 3, 3.1, 3.2, TinyLlama): grouped-query attention
  (``num_key_value_heads``), ``rope_theta`` and the ``llama3`` / ``linear`` RoPE scalings,
  ``rms_norm_eps``, ``head_dim``, tied or untied ``lm_head``;
* ``mistral``: as LLaMA, for sequences within its ``sliding_window`` (where sliding-window
  attention equals full causal attention);
* ``minicpm`` (MiniCPM 1/2, the Sparsing Law paper's released models; remote code, not in
  ``transformers``): LLaMA plus ``scale_emb`` (embeddings × scale_emb), ``scale_depth``
  (residual branches × scale_depth/√n_layers) and ``dim_model_base`` (logits of
  h·dim_model_base/hidden_size), Hu et al. 2024.

RoPE: ``rope_theta`` and the ``llama3`` (Llama 3.1 / 3.2) and ``linear`` frequency scalings.
Anything else — another ``model_type``, dynamic / YaRN / LongRoPE scaling, attention or MLP
biases, MoE or MLA variants, an activation this project lacks — is an :class:`HfImportError` naming the
``config.json`` key and its value (``eval.py`` prints it on one line and exits 2).

Weight layout (:func:`param_mapping`, the one table of names and conversions, which
:mod:`sparsejax.hf_export` writes by in the other direction). HF stores ``nn.Linear`` weights as
[out, in]; this project's kernels are [in, out] with heads split out: q/k/v [D, heads, head_dim],
o [heads, head_dim, D], gate/up [D, F], down [F, D], ``lm_head`` [D, V]. RoPE needs no permutation: HF's ``rotate_half`` rotates the two
halves of each head with frequency θ^(-2j/K) on the pair (j, j + K/2) — HF's conversion scripts
already permuted Meta's interleaved pairs into that layout — and :func:`sparsejax.model.apply_rope`
rotates the same halves with the same frequencies.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from sparsejax import config as config_lib
from sparsejax import configure

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# sparsejax.activations name -> the HF ``hidden_act`` (transformers' ACT2FN name) of the same
# function: what an export writes (sparsejax.hf_export).
HIDDEN_ACTS = {"relu": "relu", "silu": "silu", "swish": "silu", "gelu": "gelu",
               "gelu_tanh": "gelu_pytorch_tanh", "relu2": "relu2", "identity": "linear"}
# HF ``hidden_act`` -> sparsejax.activations name (the same function): the names above and
# HF's aliases of them.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu2": "relu2",
               "linear": "identity"}
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


class HfImportError(ValueError):
    """The checkpoint cannot be imported: one line naming the key (or file) and its value."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One supported ``model_type``: defaults of the keys its config may omit (those of its
    ``transformers`` / remote-code config class) and the options it must have (key -> allowed
    values) to be the architecture :class:`sparsejax.model.Transformer` computes."""

    defaults: dict
    required: dict = dataclasses.field(default_factory=dict)
    minicpm_scalings: bool = False
    sliding_window: bool = False


_LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "tie_word_embeddings": False,
                   "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                   "pretraining_tp": 1, "rope_scaling": None}
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_LLAMA_DEFAULTS),
    "mistral": Architecture({**_LLAMA_DEFAULTS, "sliding_window": 4096}, sliding_window=True),
    # MiniCPMConfig (openbmb remote code; thunlp/SparsingLaw src/model/configuration_minicpm.py).
    "minicpm": Architecture(
        {**_LLAMA_DEFAULTS, "tie_word_embeddings": True, "scale_emb": 1.0, "dim_model_base": 1,
         "scale_depth": 1.0, "attention_type": "vanilla", "ffn_type": "vanilla"},
        required={"attention_type": ("vanilla",), "ffn_type": ("vanilla",)},
        minicpm_scalings=True),
}
# Keys that must hold these values whatever the architecture (else: a model this one is not).
_REQUIRED = {"attention_bias": (False,), "mlp_bias": (False,), "pretraining_tp": (1,)}
# Keys whose presence alone means a mixture of experts (Mixtral-style configs).
_MOE_KEYS = ("num_local_experts", "num_experts_per_tok", "n_routed_experts", "moe_intermediate_size")


def _unsupported(key: str, value: Any, allowed: str) -> HfImportError:
    return HfImportError(f"unsupported checkpoint: config.json {key}={json.dumps(value)} "
                         f"(supported: {allowed})")


# ------------------------------------------------------------------------------- config.json
def read_config(path: str | pathlib.Path) -> dict:
    """``config.json`` of a checkpoint directory, as a dict."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise HfImportError(f"--hf {path} is not a directory")
    cfg_path = path / CONFIG_FILE
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise HfImportError(f"{cfg_path} not found: not a Hugging Face checkpoint directory") from None
    except (OSError, json.JSONDecodeError) as err:
        raise HfImportError(f"{cfg_path} cannot be read as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise HfImportError(f"{cfg_path} holds {type(raw).__name__}, not a JSON object")
    return raw


def _rope(hf: dict, get: Callable[[str], Any]) -> dict:
    """The RoPE fields of :class:`ModelConfig`: ``rope_theta`` top-level (transformers 4) or in
    ``rope_parameters`` (transformers 5), and the scaling of ``rope_parameters`` / ``rope_scaling``
    if it is one of :data:`ROPE_SCALINGS` (Llama 3.1+'s ``llama3``, ``linear``). Dynamic NTK,
    YaRN and LongRoPE change frequencies with the length or scale attention: unsupported."""
    params = hf.get("rope_parameters")
    key, scaling = ("rope_parameters", params) if params is not None else ("rope_scaling",
                                                                          get("rope_scaling"))
    if scaling is None:
        return {"rope_theta": float(get("rope_theta"))}
    if not isinstance(scaling, dict):
        raise _unsupported(key, scaling, "null or an object")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise _unsupported(f"{key}.rope_type", kind, ", ".join(f'"{k}"' for k in ROPE_SCALINGS))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(f"{key}.partial_rotary_factor", scaling["partial_rotary_factor"], "1.0")
    theta = scaling["rope_theta"] if "rope_theta" in scaling else get("rope_theta")
    fields = {"rope_theta": float(theta), "rope_type": kind}
    for hf_key, (field, kind_of) in ROPE_SCALINGS[kind].items():
        if hf_key not in scaling:
            raise HfImportError(f"config.json {key} has rope_type={kind!r} but no {hf_key!r}")
        fields[field] = kind_of(scaling[hf_key])
    return fields


# Supported RoPE scalings: HF rope_type -> {HF key: (ModelConfig field, type)}.
ROPE_SCALINGS = {
    "default": {},
    "linear": {"factor": ("rope_factor", float)},
    "llama3": {"factor": ("rope_factor", float), "low_freq_factor": ("rope_low_freq_factor", float),
               "high_freq_factor": ("rope_high_freq_factor", float),
               "original_max_position_embeddings": ("rope_original_max_len", int)},
}


def model_config(hf: dict, *, seq_len: int, dtype: str = "float32") -> config_lib.ModelConfig:
    """The :class:`ModelConfig` of an HF ``config.json``; HfImportError for anything unsupported.

    ``seq_len``: the evaluation sequence length (checked against Mistral's sliding window and
    the checkpoint's ``max_position_embeddings``)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _unsupported("model_type", model_type, ", ".join(f'"{k}"' for k in ARCHITECTURES))
    arch = ARCHITECTURES[model_type]

    def get(key: str) -> Any:
        if key in hf:
            return hf[key]
        if key in arch.defaults:
            return arch.defaults[key]
        raise HfImportError(f"config.json has no {key!r} (needed for model_type={model_type!r})")

    for key in _MOE_KEYS:
        if hf.get(key):
            raise _unsupported(key, hf[key], "absent (mixtures of experts are not supported)")
    for key, allowed in {**_REQUIRED, **arch.required}.items():
        if get(key) not in allowed:
            raise _unsupported(key, get(key), " or ".join(json.dumps(a) for a in allowed))
    act = get("hidden_act")
    if act not in ACTIVATIONS:
        raise _unsupported("hidden_act", act, ", ".join(f'"{a}"' for a in ACTIVATIONS))
    rope = _rope(hf, get)
    if arch.sliding_window:
        window = get("sliding_window")
        if window is not None and seq_len > window:
            raise _unsupported("sliding_window", window, f">= the evaluation sequence length "
                               f"{seq_len}; lower --seq-len")
    d_model, n_heads = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = hf.get("head_dim") or d_model // n_heads
    n_kv = hf.get("num_key_value_heads") or n_heads
    max_pos = int(hf.get("max_position_embeddings") or seq_len)
    if seq_len > max_pos:
        raise HfImportError(f"--seq-len {seq_len} exceeds config.json max_position_embeddings="
                            f"{max_pos}")
    scalings = {}
    if arch.minicpm_scalings:
        scalings = dict(scale_emb=float(get("scale_emb")), scale_depth=float(get("scale_depth")),
                        dim_model_base=int(get("dim_model_base")))
    m = config_lib.ModelConfig(
        vocab_size=int(get("vocab_size")), d_model=d_model, n_layers=int(get("num_hidden_layers")),
        n_heads=n_heads, head_dim=int(head_dim), d_ff=int(get("intermediate_size")),
        ffn_type="gated", activation=ACTIVATIONS[act], max_seq_len=max(seq_len, 1),
        tie_embeddings=bool(get("tie_word_embeddings")),
        norm_eps=float(get("rms_norm_eps")), dtype=dtype,
        n_kv_heads=0 if int(n_kv) == n_heads else int(n_kv), **rope, **scalings)
    try:
        configure.validate(config_lib.Config(model=m, train=config_lib.TrainConfig(
            seq_len=seq_len, batch_size=1)))
    except config_lib.ConfigError as err:
        raise HfImportError(f"config.json gives an invalid model: {err}") from None
    return m


# ------------------------------------------------------------------------------- safetensors
def weight_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's safetensors files: the shards its index names, or every *.safetensors."""
    path = pathlib.Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise HfImportError(f"{index} is not a safetensors index ({err})") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise HfImportError(f"{index} names shards that are missing: {missing[:3]}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HfImportError(f"no *.safetensors in {path} (PyTorch .bin checkpoints are not read; "
                            f"convert them with safetensors first)")
    return files


def _open(file: pathlib.Path):
    import ml_dtypes  # noqa: F401 - registers numpy's bfloat16, which safetensors' numpy reader needs
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="numpy")
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise HfImportError(f"{file} is not a readable safetensors file ({err})") from None


def tensor_shapes(files: list[pathlib.Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype name) of every tensor, from the headers alone (nothing loaded)."""
    shapes = {}
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shapes[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return shapes


def _iter_tensors(files: list[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ---------------------------------------------------------------------------------- mapping
class TensorMap(NamedTuple):
    """One HF tensor: its path in this project's params and the two layout conversions."""

    path: tuple[str, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]  # HF array -> this project's array
    to_hf: Callable[[np.ndarray], np.ndarray]  # this project's array -> HF array (the inverse)


def param_mapping(m: config_lib.ModelConfig) -> dict[str, TensorMap]:
    """HF tensor name -> :class:`TensorMap`: the one name and layout table, read by the importer
    and written by :mod:`sparsejax.hf_export`. HF ``nn.Linear`` weights are [out, in]."""
    d, h, g, k = m.d_model, m.n_heads, m.kv_heads, m.head_dim

    def same(path):
        return TensorMap(path, lambda w: w, lambda w: w)

    def linear(path):  # [out, in] <-> [in, out]
        return TensorMap(path, lambda w: w.T, lambda w: w.T)

    def heads_in(path, n):  # [n·K, D] (out, in) <-> [D, n, K]
        return TensorMap(path, lambda w: w.T.reshape(d, n, k), lambda w: w.reshape(d, n * k).T)

    def heads_out(path):  # [D, H·K] (out, in) <-> [H, K, D]
        return TensorMap(path, lambda w: w.T.reshape(h, k, d), lambda w: w.reshape(h * k, d).T)

    table = {"model.embed_tokens.weight": same(("embed", "embedding")),
             "model.norm.weight": same(("final_norm", "scale"))}
    if not m.tie_embeddings:
        table["lm_head.weight"] = linear(("unembed", "kernel"))
    for i in range(m.n_layers):
        hf, ours = f"model.layers.{i}.", f"layer_{i}"
        table.update({
            hf + "input_layernorm.weight": same((ours, "attn_norm", "scale")),
            hf + "post_attention_layernorm.weight": same((ours, "ffn_norm", "scale")),
            hf + "self_attn.q_proj.weight": heads_in((ours, "attn", "query", "kernel"), h),
            hf + "self_attn.k_proj.weight": heads_in((ours, "attn", "key", "kernel"), g),
            hf + "self_attn.v_proj.weight": heads_in((ours, "attn", "value", "kernel"), g),
            hf + "self_attn.o_proj.weight": heads_out((ours, "attn", "out", "kernel")),
            hf + "mlp.gate_proj.weight": linear((ours, "ffn", "w_gate", "kernel")),
            hf + "mlp.up_proj.weight": linear((ours, "ffn", "w_in", "kernel")),
            hf + "mlp.down_proj.weight": linear((ours, "ffn", "w_out", "kernel")),
        })
    return table


def _expected_shapes(m: config_lib.ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """This project's parameter shapes by path (from the model itself, nothing allocated)."""
    import jax

    from sparsejax import model as model_lib

    abstract = jax.eval_shape(lambda key: model_lib.Model(m).init(key, 8), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {tuple(p.key for p in path): tuple(a.shape) for path, a in flat}


def check_tensors(m: config_lib.ModelConfig, shapes: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Every tensor the model needs is there with the right shape, and nothing unknown is."""
    table, want = param_mapping(m), _expected_shapes(m)
    for name, (path, *_) in table.items():
        if name not in shapes:
            if name == "lm_head.weight":
                raise HfImportError("the checkpoint has no lm_head.weight but config.json "
                                    "tie_word_embeddings=false")
            raise HfImportError(f"tensor {name} is missing from the checkpoint")
        expected = hf_shape(path, want[path])
        if tuple(shapes[name][0]) != expected:
            raise HfImportError(f"tensor {name} has shape {list(shapes[name][0])}, which does not "
                                f"fit config.json (expected {list(expected)})")
    extra = [n for n in shapes if n not in table and not n.endswith(IGNORED_TENSORS)
             and not (n == "lm_head.weight" and m.tie_embeddings)]
    if extra:
        raise HfImportError(f"tensor {extra[0]} is not part of the supported architecture "
                            f"({len(extra)} such tensors; e.g. biases or extra modules)")


def hf_shape(path: tuple[str, ...], ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF [out, in] shape of one of this project's parameters (error messages, the exporter)."""
    if path[-1] == "kernel" and path[-2] in ("query", "key", "value"):
        return (ours[1] * ours[2], ours[0])
    if path[-1] == "kernel" and path[-2] == "out":
        return (ours[2], ours[0] * ours[1])
    if path[-1] == "kernel":
        return (ours[1], ours[0])
    return ours


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------ import
@dataclasses.dataclass
class HfCheckpoint:
    """A checkpoint directory read: its config, model config and weight files (not yet loaded)."""

    path: pathlib.Path
    hf_config: dict
    model: config_lib.ModelConfig
    files: list[pathlib.Path]
    shapes: dict

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(s)) for n, (s, _) in self.shapes.items()
                   if not n.endswith(IGNORED_TENSORS))


def open_checkpoint(path: str | pathlib.Path, *, seq_len: int, dtype: str = "float32") -> HfCheckpoint:
    """Read and check config and tensor headers; loads no weights."""
    path = pathlib.Path(path)
    hf = read_config(path)
    m = model_config(hf, seq_len=seq_len, dtype=dtype)
    files = weight_files(path)
    shapes = tensor_shapes(files)
    check_tensors(m, shapes)
    return HfCheckpoint(path, hf, m, files, shapes)


def load_params(ckpt: HfCheckpoint, *, progress: bool = False) -> dict:
    """The parameter tree (``layer_{i}`` layout) as numpy arrays of the compute dtype (float32,
    or bfloat16 under ``model.dtype='bfloat16'`` to halve host memory), one tensor at a time."""
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if ckpt.model.dtype == "bfloat16" else np.float32
    table = param_mapping(ckpt.model)
    params: dict = {}
    tensors = _iter_tensors(ckpt.files)
    if progress:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, total=len(ckpt.shapes), desc="loading", unit="tensor",
                       dynamic_ncols=True)
    for name, array in tensors:
        if name not in table:  # ignored buffers, a tied checkpoint's duplicate lm_head
            continue
        entry = table[name]
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            raise HfImportError(f"{ckpt.path}: tensor {name} holds non-finite values (NaN or "
                                f"infinity); the checkpoint is damaged or diverged")
        _set(params, entry.path, np.ascontiguousarray(entry.to_ours(array).astype(dtype)))
    return params


# ------------------------------------------------------------------------------ memory check
def memory_need_bytes(ckpt: HfCheckpoint, *, batch_size: int, seq_len: int, eval_tokens: int,
                      max_cache_gib: float) -> int:
    """Host bytes an evaluation needs, estimated before loading: parameters in the compute dtype
    (plus the float32 copy of the largest tensor while converting), per batch the float32 logits
    (×2: logits and log-softmax) and the collected FFN activations (×3 per layer: σ(gate),
    σ(gate)·up, the stacked copy), and the CETT cache of σ(gate)·up (capped: it spills to disk
    above ``max_cache_gib``)."""
    m = ckpt.model
    itemsize = 2 if m.dtype == "bfloat16" else 4
    largest = max(int(np.prod(s)) for s, _ in ckpt.shapes.values())
    tokens = batch_size * seq_len
    cache = min(eval_tokens * m.d_ff * m.n_layers * 4, int(max_cache_gib * 2**30))
    return (ckpt.n_params * itemsize + largest * 8 + 2 * tokens * m.vocab_size * 4
            + 3 * tokens * m.d_ff * m.n_layers * 4 + cache)


def check_memory(need: int, available: int) -> None:
    if need > available:
        gib = 2**30
        raise HfImportError(f"evaluating this checkpoint needs about {need / gib:.2f} GiB but "
                            f"{available / gib:.2f} GiB of host memory is free; use --dtype "
                            f"bfloat16, lower --batch-size or --seq-len")


# --------------------------------------------------------------------------- the run façade
@dataclasses.dataclass
class HfRun:
    """An imported checkpoint in the shape :func:`sparsejax.evaluation.evaluate` reads a trained
    run: one "checkpoint" (step 0, nothing counted as warm-up), parameters on the mesh."""

    ckpt: HfCheckpoint
    cfg: config_lib.Config
    params_np: dict | None  # the host copy from load_params, dropped once placed on the mesh
    steps: tuple = (0,)
    warmup_steps: int = -1  # a released model has no warm-up checkpoints to leave out
    _placed: tuple | None = None  # (mesh, params on it)

    @property
    def workdir(self) -> pathlib.Path:
        return self.ckpt.path

    def params(self, step: int, mesh) -> tuple[Any, dict]:
        """The parameters on ``mesh`` (placed once; the numpy copy is then released, so a large
        model is not held twice in host memory)."""
        import jax

        from sparsejax import model as model_lib, sharding

        del step
        if self._placed is None or self._placed[0] is not mesh:
            if self.params_np is None:
                raise ValueError("HfRun parameters were placed on another mesh and released")
            specs = model_lib.Model(self.cfg.model).param_specs(self.cfg.train.seq_len)
            shardings = sharding.ShardingPlan(mesh, self.cfg.mesh).shardings(specs)
            placed = jax.tree.map(lambda a, s: jax.device_put(a, s), self.params_np, shardings)
            self._placed, self.params_np = (mesh, placed), None
        return self._placed[1], {"tokens_seen": float("nan"), "hf_checkpoint": str(self.ckpt.path)}


def run_config(m: config_lib.ModelConfig, name: str, *, batch_size: int, seq_len: int,
               eval_batches: int) -> config_lib.Config:
    """The evaluation's config around an imported model (batch shape; no training)."""
    return config_lib.Config(name=name, model=m, train=config_lib.TrainConfig(
        batch_size=batch_size, seq_len=seq_len, eval_batches=eval_batches, warmup_steps=0))


def n_params_human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

