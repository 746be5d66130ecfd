"""Autoregressive generation with a fixed-size key/value cache, dense or with a sparse FFN.

A :class:`Decoder` holds one model's parameters and sparsity input and runs two jitted passes of
:class:`sparsejax.model.Transformer` with a :class:`sparsejax.model.Decode` input: the *prefill*
of the (left-padded) prompts, writing their keys and values into cache slots ``0 … P-1``, and a
*step* of one token per row (or k draft tokens: :meth:`Decoder.step_fn`) at slot ``index``.
Rows of different lengths are left-padded: row b's tokens start at slot ``start_B[b]``, its RoPE
positions count from 0 there, and attention never reads the slots before it, so every row
decodes exactly as it would alone.

The step's FFN is the model's (``ffn="dense"``) or a decode-time one from
:data:`sparsejax.decode_ffn.DECODE_FFNS` (``"sparse"``: exact for activations with exact zeros),
with the row reader ``kernel`` (:func:`sparsejax.decode_ffn.resolve_kernel`; ``auto``: the C++
CPU reader where it runs, else XLA's gather, for which a step in which any layer activates more
neurons than its ``capacity`` is rerun dense).
:func:`calibrate` measures the capacity — the largest number of neurons any token activates per layer — on validation text;
:func:`loss_change` is the cost of a threshold on activations without zeros.

Shape suffixes: B batch, P prompt length, T tokens of one call, S cache slots, V vocabulary,
N layers, F d_ff.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import decode_ffn, loss as loss_lib, model as model_lib, sparsity as sparsity_lib
from sparsejax.config import ModelConfig
from sparsejax.sparsity import Sparsity

Array = jax.Array
PyTree = Any


class DecodeError(ValueError):
    """Bad generation input (prompt too long, empty prompt, bad sampling settings)."""


def left_pad(prompts: Sequence[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P], start [B]): prompts right-aligned in P = the longest prompt's length."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DecodeError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    start = np.zeros(len(prompts), np.int32)
    for b, p in enumerate(prompts):
        start[b] = length - len(p)
        tokens[b, start[b]:] = np.asarray(p, np.int32)
    return tokens, start


def sample_logits(logits_BxV: Array, key: Array, temperature, top_p) -> Array:
    """Next tokens [B]: nucleus sampling (Holtzman et al. 2020) at ``temperature``; the smallest
    set of tokens whose probability reaches ``top_p`` is kept (top_p = 1: all)."""
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass strictly above each token
    kept = jnp.sum(before_BxV < top_p, axis=-1, keepdims=True)  # >= 1
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(2, 3))
def choose(logits_BxV: Array, key: Array, temperature: float, top_p: float) -> Array:
    """The next tokens [B]: greedy at temperature 0, else :func:`sample_logits`."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return sample_logits(logits_BxV, key, temperature, top_p)


@dataclasses.dataclass
class Generation:
    """Generated tokens per row and the time taken (decode excludes the prefill; both exclude
    compilation, ``compile_s``)."""

    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    decode_steps: int
    compile_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows) per second of decode steps."""
        return (self.decode_steps * len(self.tokens)) / max(self.decode_s, 1e-9)


class Decoder:
    """One model's cached passes. ``sparsity``: the trained model's input (the run's training-time
    top-k and threshold; evaluation thresholds for the thresholded sparse mode)."""

    def __init__(self, cfg: ModelConfig, params: PyTree, sparsity: Optional[Sparsity] = None):
        self.cfg = cfg
        self.sparsity = Sparsity() if sparsity is None else sparsity
        self.params = decode_ffn.with_row_layout(model_lib.Model.unbox(params), cfg)
        self.module = model_lib.Transformer(cfg)

    # ------------------------------------------------------------------------------ passes
    def _apply(self, params, cache, tokens_BxT, index, start_B, sp, *, cache_len: int,
               ffn: str, capacity, step_fallback: bool = False, kernel: str = "xla"):
        length = tokens_BxT.shape[1]
        positions_BxT = jnp.maximum(index + jnp.arange(length)[None, :] - start_B[:, None], 0)
        decode = model_lib.Decode(index=jnp.asarray(index, jnp.int32), start_B=start_B,
                                  cache_len=cache_len, ffn="" if ffn == "dense" else ffn,
                                  capacity=capacity, step_fallback=step_fallback, kernel=kernel)
        variables = {"params": params}
        if cache is not None:
            variables["cache"] = cache
        logits, state = self.module.apply(variables, tokens_BxT, positions_BxT, sparsity=sp,
                                          decode=decode, mutable=["cache", "stats"])
        return logits, state["cache"], state.get("stats", {})

    def init_cache(self, batch: int, cache_len: int) -> PyTree:
        """Zeros in the cache's layout (per layer, or stacked under ``scan_layers``)."""
        shapes = jax.eval_shape(
            lambda p: self._apply(p, None, jnp.zeros((batch, 1), jnp.int32), 0,
                                  jnp.zeros((batch,), jnp.int32), self.sparsity,
                                  cache_len=cache_len, ffn="dense", capacity=0)[1], self.params)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    @functools.cached_property
    def _prefill(self):
        @functools.partial(jax.jit, static_argnames=("cache_len",), donate_argnums=(1,))
        def prefill(params, cache, tokens_BxP, start_B, sp, *, cache_len):
            logits, cache, _ = self._apply(params, cache, tokens_BxP, 0, start_B, sp,
                                           cache_len=cache_len, ffn="dense", capacity=0)
            return logits[:, -1], cache
        return prefill

    def kernel(self, name: str = "auto") -> str:
        """The row reader ``name`` resolves to for this model here (``auto``: see
        :func:`sparsejax.decode_ffn.resolve_kernel`)."""
        return decode_ffn.resolve_kernel(name, self.cfg)[0]

    def step_fn(self, ffn: str = "dense", capacity: int | tuple = 0, temperature: float = 0.0,
                top_p: float = 1.0, kernel: str = "auto"):
        """The jitted step ``(params, cache, tokens_BxT, index, start_B, sp, key) -> (next
        token [B], logits [B, T, V], cache, per-layer stats)``; T = 1 when generating, k when
        verifying k draft tokens at once. ``kernel``: the sparse FFN's row reader."""
        kernel = self.kernel(kernel) if ffn != "dense" else "xla"
        cache_key = (ffn, capacity, temperature, top_p, kernel)
        steps = self.__dict__.setdefault("_steps", {})
        if cache_key not in steps:
            @functools.partial(jax.jit, static_argnames=("cache_len",), donate_argnums=(1,))
            def step(params, cache, tokens_BxT, index, start_B, sp, key, *, cache_len):
                run = functools.partial(self._apply, params, tokens_BxT=tokens_BxT, index=index,
                                        start_B=start_B, sp=sp, cache_len=cache_len)
                logits, cache, stats = run(cache=cache, ffn=ffn, capacity=capacity,
                                           step_fallback=ffn != "dense", kernel=kernel)
                if ffn != "dense" and decode_ffn.DECODE_KERNELS[kernel].capacity:
                    # A layer above its capacity: the whole step again, dense. It may start from
                    # the sparse pass's cache: the only slots that differ are this step's own,
                    # which every layer writes before it reads them.
                    logits, cache = jax.lax.cond(
                        overflowed(stats),
                        lambda c: run(cache=c, ffn="dense", capacity=0)[:2],
                        lambda c: (logits, c), cache)
                return choose(logits[:, -1], key, temperature, top_p), logits, cache, stats
            steps[cache_key] = step
        return steps[cache_key]

    # -------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[np.ndarray], max_new_tokens: int, *,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 ffn: str = "dense", capacity: int | tuple = 0, kernel: str = "auto",
                 stop_id: Optional[int] = None,
                 on_tokens: Optional[Callable[[np.ndarray], None]] = None) -> Generation:
        """Prefill, then one jitted step per token. ``on_tokens`` gets each step's tokens [B] as
        they come (streaming). Greedy at temperature 0. Sampling keys are ``fold_in(key(seed),
        i)`` for the i-th token, so a seed reproduces its text. Stops early when every row has
        produced ``stop_id``."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise DecodeError(f"--temperature={temperature} must be >= 0 and --top-p={top_p} in "
                              f"(0, 1]")
        tokens_BxP, start_B = left_pad(prompts)
        batch, length = tokens_BxP.shape
        cache_len = length + max_new_tokens
        if max_new_tokens < 1:
            raise DecodeError(f"--max-new-tokens={max_new_tokens} must be >= 1")
        if cache_len > self.cfg.max_seq_len:
            raise DecodeError(f"the longest prompt ({length} tokens) + --max-new-tokens "
                              f"{max_new_tokens} exceeds the model's context "
                              f"model.max_seq_len={self.cfg.max_seq_len}")
        key = jax.random.key(seed)
        start = jnp.asarray(start_B)
        cache = self.init_cache(batch, cache_len)
        t0 = time.perf_counter()  # compiled ahead, so the timings below are the passes alone
        compiled = self.__dict__.setdefault("_compiled", {})
        shape_key = (batch, length, cache_len, ffn, capacity, temperature, top_p, kernel)
        if shape_key not in compiled:
            compiled[shape_key] = (
                self._prefill.lower(self.params, cache, jnp.asarray(tokens_BxP), start,
                                    self.sparsity, cache_len=cache_len).compile(),
                self.step_fn(ffn, capacity, temperature, top_p, kernel).lower(
                    self.params, cache, jnp.zeros((batch, 1), jnp.int32), jnp.int32(length),
                    start, self.sparsity, key, cache_len=cache_len).compile())
        prefill, step = compiled[shape_key]
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        last_BxV, cache = prefill(self.params, cache, jnp.asarray(tokens_BxP), start,
                                  self.sparsity)
        token_B = choose(last_BxV, jax.random.fold_in(key, 0), temperature, top_p)
        out = [np.asarray(token_B)]
        prefill_s = time.perf_counter() - t0
        if on_tokens:
            on_tokens(out[-1])
        done = out[-1] == stop_id if stop_id is not None else np.zeros(batch, bool)
        t1 = time.perf_counter()
        for i in range(1, max_new_tokens):
            if done.all():
                break
            token_B, _, cache, _ = step(self.params, cache, token_B[:, None],
                                        jnp.int32(length + i - 1), start, self.sparsity,
                                        jax.random.fold_in(key, i))
            out.append(np.asarray(token_B))  # waits for the step: the time is the step's
            if on_tokens:
                on_tokens(out[-1])
            if stop_id is not None:
                done = done | (out[-1] == stop_id)
        decode_s = time.perf_counter() - t1
        rows = np.stack(out, axis=1)
        return Generation([list(map(int, r)) for r in rows], prefill_s, decode_s, len(out) - 1,
                          compile_s)


    def teacher_forced(self, prompts: Sequence[np.ndarray], continuation_BxN: np.ndarray, *,
                       ffn: str = "dense", capacity: int | tuple = 0, tokens_per_step: int = 1,
                       kernel: str = "auto") -> tuple[np.ndarray, list[dict]]:
        """Prefill, then feed ``continuation_BxN`` ``tokens_per_step`` at a time (k draft tokens
        verified at once): (logits [B, N, V] of every fed token, each step's stats as numpy)."""
        tokens_BxP, start_B = left_pad(prompts)
        batch, length = tokens_BxP.shape
        n = continuation_BxN.shape[1]
        if n % tokens_per_step:
            raise DecodeError(f"{n} continuation tokens are not a multiple of {tokens_per_step}")
        cache_len = length + n
        start = jnp.asarray(start_B)
        _, cache = self._prefill(self.params, self.init_cache(batch, cache_len),
                                 jnp.asarray(tokens_BxP), start, self.sparsity, cache_len=cache_len)
        step = self.step_fn(ffn, capacity, kernel=kernel)
        logits, stats = [], []
        for i in range(0, n, tokens_per_step):
            _, lg, cache, st = step(self.params, cache,
                                    jnp.asarray(continuation_BxN[:, i:i + tokens_per_step]),
                                    jnp.int32(length + i), start, self.sparsity,
                                    jax.random.key(0), cache_len=cache_len)
            logits.append(np.asarray(lg))
            stats.append(jax.tree.map(np.asarray, st))
        return np.concatenate(logits, axis=1), stats


def overflowed(stats: dict) -> Array:
    """Whether any layer of a sparse step flagged more active neurons than its capacity."""
    flags = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(stats)
             if any(getattr(k, "key", None) == "decode_fallback" for k in path)]
    return jnp.any(jnp.stack([jnp.any(f > 0) for f in flags])) if flags else jnp.bool_(False)


def step_stats(stats: dict, n_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """(active union count per layer [N], fallback flag per layer [N]) of one sparse step's
    ``stats`` collection."""
    return (np.asarray(model_lib.layer_stat({"stats": stats}, n_layers, "decode_active")),
            np.asarray(model_lib.layer_stat({"stats": stats}, n_layers, "decode_fallback")))


# --------------------------------------------------------------------------- calibration
def token_active_counts(model: model_lib.Model, params: PyTree, tokens_BxL: Array,
                        sp: Sparsity) -> np.ndarray:
    """Active neurons of every token in every layer [N, B·L], by :func:`decode_ffn.active_mask`
    (the rule the sparse step uses) on a full forward pass's σ(gate)."""
    _, state = model.apply(params, tokens_BxL, sparsity=sp, collect=("intermediates",))
    acts, _ = model.ffn_intermediates(state)
    counts = []
    for layer, a_BxLxF in enumerate(acts):
        a_NxF = a_BxLxF.reshape(-1, a_BxLxF.shape[-1])
        counts.append(jnp.sum(decode_ffn.active_mask(a_NxF, sp.layer(layer)), axis=-1))
    return jnp.stack(counts)


def calibrate(model: model_lib.Model, params: PyTree, batches: Sequence[dict], sp: Sparsity,
              quantile: float = 1.0) -> np.ndarray:
    """Per-layer capacity [N]: the ``quantile`` (1 = the largest) of tokens' active counts over
    the batches' inputs. A step whose tokens activate more falls back to dense."""
    fn = jax.jit(lambda p, t, s: token_active_counts(model, p, t, s))
    counts = np.concatenate([np.asarray(jax.device_get(fn(params, jnp.asarray(b["inputs"]), sp)))
                             for b in batches], axis=1)
    return np.ceil(np.quantile(counts, quantile, axis=1)).astype(np.int64)


def fat_thresholds(cfg: ModelConfig, eps: float) -> Array:
    """Per-neuron FAT-ε thresholds [N, F] on |σ(gate)| (``sparsity.fat_threshold``)."""
    return jnp.full((cfg.n_layers, cfg.d_ff), sparsity_lib.fat_threshold(eps), jnp.float32)


def loss_change(model: model_lib.Model, params: PyTree, batches: Sequence[dict], sp: Sparsity,
                thresholds_NxF: Array) -> tuple[float, float]:
    """(dense loss, thresholded loss) of next-token prediction over ``batches``: what the
    thresholded sparse decode costs in quality."""
    masked = sp.replace(thresholds=thresholds_NxF, mask_target="activation")

    @jax.jit
    def both(p, batch):
        out = []
        for s in (sp, masked):
            logits, _ = model.apply(p, batch["inputs"], sparsity=s)
            out.append(loss_lib.next_token_loss(logits, batch["targets"], batch.get("weights"))[0])
        return out

    losses = np.array([[float(v) for v in both(params, {k: jnp.asarray(v) for k, v in b.items()})]
                       for b in batches])
    return float(losses[:, 0].mean()), float(losses[:, 1].mean())


def cache_bytes(cfg: ModelConfig, batch: int, cache_len: int) -> int:
    itemsize = 2 if cfg.dtype == "bfloat16" else 4
    return 2 * cfg.n_layers * batch * cache_len * cfg.kv_heads * cfg.head_dim * itemsize


def capacity_for(per_token, tokens: int, d_ff: int):
    """A step's capacity for ``tokens`` tokens (batch rows × draft tokens, whose active sets it
    unites): per-token capacity × tokens, at most d_ff; an int, or a tuple per layer."""
    if isinstance(per_token, (int, np.integer)):
        return int(min(d_ff, max(1, int(per_token)) * max(1, tokens)))
    return tuple(capacity_for(int(c), tokens, d_ff) for c in per_token)

