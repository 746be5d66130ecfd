"""Decode-time FFN implementations: the FFN of a cached decoding step (:class:`sparsejax.model.Decode`
``ffn``), chosen per call and never used in training.

Decoding reads every weight once per step for a handful of tokens, so its time is the bytes it
reads. ``sparse`` reads only the rows of the active neurons:

1. the gate (plain FFN: ``W_in``) is computed densely, σ applied (with the run's training-time
   top-k and activation threshold, and any evaluation threshold in ``Sparsity.thresholds``);
2. the step's active neurons — by the one rule :func:`sparsejax.sparsity.active`, united over
   the step's tokens (batch rows and draft tokens) — are the only ones whose rows are read of
   ``W_in`` (gated FFN; stored transposed [F, D] under the FFN's :data:`UP_ROWS` parameter by
   :func:`with_row_layout`, so a row is contiguous) and of ``W_out`` (already [F, D]):
   ``y = (σ(gate)[idx] ⊙ (x · W_in[idx]ᵀ)) · W_out[idx]``.

Step 2 has two implementations, ``Decode.kernel`` (:data:`DECODE_KERNELS`; :func:`resolve_kernel`
picks for ``auto``):

* ``xla`` (any backend, under jit): the active neurons are listed in index order
  (``jnp.nonzero``: a cumulative sum, no sort) into a static ``capacity`` of slots, their rows
  gathered into a buffer and multiplied. When more neurons are active than ``capacity`` the layer
  falls back to the dense FFN (``lax.cond``; only the branch taken runs) — or, with
  ``Decode.step_fallback``, the layer only flags it and the caller reruns the whole step densely
  (one branch per step instead of one per layer: the per-layer branch costs the gathered path
  about a sixth of its speed on CPU);
* ``cpu``: the C++ row reader of :mod:`sparsejax.kernels.cpu_decode` (an XLA FFI custom call,
  float32), which walks the active neurons and reads their two rows once, without a gathered copy
  and without a capacity (so it never falls back).

Either way, for activations with exact zeros (ReLU family, FATReLU, ReLU², a trained
top-k) the sparse step *is* the dense step up to float summation order. For activations without
zeros (SiLU, GELU, SwiGLU) nothing is zero, so the caller supplies a threshold
(``Sparsity.thresholds`` on |σ(gate)|, FAT-ε): the sparse step then equals the dense step with
that evaluation mask, which is an approximation of the unmasked model whose loss change
:mod:`sparsejax.decode` reports.

Each call sows ``decode_active`` (the step's union count of active neurons) and
``decode_fallback`` (1 when it ran dense or flagged an overflow) into ``stats``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import activations, ffn as ffn_lib, sparsity as sparsity_lib
from sparsejax.config import ModelConfig
from sparsejax.ffn import FfnAux, FfnWeights
from sparsejax.sparsity import Sparsity

Array = jax.Array
UP_ROWS = "w_in_FxD"  # the FFN's W_in transposed [F, D] (gated FFNs), added by with_row_layout

DecodeFfn = Callable[[Array, FfnWeights, Array, Sparsity], tuple[Array, FfnAux]]
DECODE_FFNS: dict[str, Callable[[ModelConfig, Any], DecodeFfn]] = {}


class KernelError(ValueError):
    """A decode kernel that cannot run here (the message says why)."""


def _cpu_kernel_unavailable(cfg: ModelConfig) -> str:
    """Why the CPU row reader cannot run for this model here ('' when it can)."""
    if cfg.dtype != "float32":
        return f"it reads float32 weights and model.dtype={cfg.dtype!r}"
    from sparsejax.kernels import cpu_decode  # noqa: PLC0415 - builds on first use

    try:
        cpu_decode.ensure()
    except cpu_decode.KernelUnavailable as err:
        return str(err)
    return ""


@dataclasses.dataclass(frozen=True)
class DecodeKernel:
    """A row reader of the sparse decode FFN: ``read(cfg, decode, x_NxD, weights, up_FxD, sp,
    activation_NxF, active_NxF, union_F, count) -> (y [N, D], fallback flag)``;
    ``unavailable(cfg)`` says why it cannot run for a model here ('' when it can); ``capacity``:
    it reads a static number of rows (``Decode.capacity``) and a step above it falls back to
    dense."""

    read: Callable
    unavailable: Callable[[ModelConfig], str]
    capacity: bool
    description: str


def kernel_names() -> list[str]:
    return ["auto", *DECODE_KERNELS]


def resolve_kernel(name: str, cfg: ModelConfig) -> tuple[str, str]:
    """(kernel, note): ``auto`` becomes the first of :data:`DECODE_KERNELS` that can run here
    (the note says why a preferred one cannot); a named kernel that cannot run raises
    :class:`KernelError`."""
    if name not in kernel_names():
        raise KernelError(f"decode kernel {name!r} is not known; allowed: {kernel_names()}")
    if name != "auto":
        why = DECODE_KERNELS[name].unavailable(cfg)
        if why:
            raise KernelError(f"decode kernel {name!r} cannot run here: {why}")
        return name, ""
    notes = []
    for kernel, entry in DECODE_KERNELS.items():
        why = entry.unavailable(cfg)
        if not why:
            return kernel, "; ".join(notes)
        notes.append(f"decode kernel {kernel!r} not used: {why}")
    raise KernelError("no decode kernel can run here: " + "; ".join(notes))


def register_decode_ffn(name: str):
    """Decorator: register ``factory(cfg, decode) -> ffn(x, weights, up_FxD, sparsity)`` as the
    decode-time FFN ``name`` (``Decode.ffn``; ``generate --ffn``); ``decode`` is the
    :class:`sparsejax.model.Decode` input (its static capacity, fallback mode and kernel)."""
    def deco(factory):
        DECODE_FFNS[name] = factory
        return factory
    return deco


def decode_ffn_names() -> list[str]:
    return ["dense", *sorted(DECODE_FFNS)]


def needs_row_layout(cfg: ModelConfig) -> bool:
    return cfg.ffn_type == "gated"


def apply(module: nn.Module, cfg: ModelConfig, decode, x_BxTxD: Array, weights: FfnWeights,
          sp: Sparsity) -> tuple[Array, FfnAux]:
    """Called by :class:`sparsejax.model.FeedForward` inside its scope for ``decode.ffn``."""
    up_FxD = None
    if needs_row_layout(cfg):
        up_FxD = module.param(UP_ROWS, nn.initializers.zeros, (cfg.d_ff, cfg.d_model),
                              jnp.float32).astype(weights.w_in_DxF.dtype)
    return DECODE_FFNS[decode.ffn](cfg, decode)(x_BxTxD, weights, up_FxD, sp)


def with_row_layout(params: dict, cfg: ModelConfig) -> dict:
    """``params`` (unboxed) with each layer's W_in also stored transposed [F, D] (gated FFNs;
    done once at load time so the sparse step's row gather is contiguous)."""
    if not needs_row_layout(cfg):
        return params

    def add(ffn: dict) -> dict:
        w_DxF = ffn["w_in"]["kernel"]
        return {**ffn, UP_ROWS: jnp.swapaxes(w_DxF, -1, -2).copy()}

    out = dict(params)
    for name, layer in params.items():
        if name == "layers" or name.startswith("layer_"):
            out[name] = {**layer, "ffn": add(layer["ffn"])}
    return out


def unsupported(cfg: ModelConfig) -> str:
    """Why the sparse decode FFN cannot run this model ('' when it can)."""
    if activations.get(cfg.activation).gate_and_up:  # σ on both: an inactive gate is not a zero
        return (f"model.activation={cfg.activation!r} applies σ to both W_gate x and W_in x; the "
                f"sparse decode FFN needs σ(gate) alone to decide which neurons are zero")
    return ""


def exact_zeros(cfg: ModelConfig, sp: Sparsity) -> bool:
    """Whether the model's inactive neurons are exactly zero, so the sparse FFN is exact without a
    threshold: an activation of the ReLU family, or a training-time top-k (static or scheduled),
    which zeroes every neuron it does not keep whatever σ is."""
    return activations.get(cfg.activation).exact_zeros or sp.trained_topk


def active_mask(activation_NxF: Array, sp: Sparsity) -> Array:
    """Which (token, neuron) pairs are active in this step: the zero rule or the evaluation
    threshold (``sp.thresholds`` on the activation), and the training-time top-k."""
    keep = None
    if sp.topk_k:
        keep = sparsity_lib.topk_keep(jnp.abs(activation_NxF).astype(jnp.float32), sp.topk_k) > 0
    if "topk_k" in sp.coefficients:
        traced = sparsity_lib.topk_keep_traced(jnp.abs(activation_NxF).astype(jnp.float32),
                                               sp.coefficients["topk_k"]) > 0
        keep = traced if keep is None else keep & traced
    return sparsity_lib.active(activation_NxF, sp.thresholds, keep)


@register_decode_ffn("sparse")
def sparse_ffn(cfg: ModelConfig, decode) -> DecodeFfn:
    """Dense gate, then only the active neurons' rows read by the row reader ``decode.kernel``
    (:data:`DECODE_KERNELS`)."""
    if decode.kernel not in DECODE_KERNELS:
        raise KernelError(f"decode kernel {decode.kernel!r} is not known here (resolve 'auto' "
                          f"first with resolve_kernel); allowed: {list(DECODE_KERNELS)}")
    reader = DECODE_KERNELS[decode.kernel]
    if reader.capacity and not 0 < decode.capacity <= cfg.d_ff:
        raise ValueError(f"capacity={decode.capacity} must be in [1, d_ff={cfg.d_ff}]")
    if why := unsupported(cfg):
        raise ValueError(why)

    def ffn(x_BxTxD, w: FfnWeights, up_FxD, sp: Sparsity):
        if sp.mask_target != "activation" or sp.eval_masks:
            raise ValueError("the sparse decode FFN reads thresholds on the activation only")
        act_fn = ffn_lib._activation_fn(cfg, sp)
        shape = x_BxTxD.shape
        x_NxD = x_BxTxD.reshape(-1, shape[-1]).astype(w.w_in_DxF.dtype)
        src_DxF = w.w_in_DxF if w.w_gate_DxF is None else w.w_gate_DxF
        activation_NxF = act_fn(x_NxD @ src_DxF)
        active_NxF = active_mask(activation_NxF, sp)
        union_F = jnp.any(active_NxF, axis=0)
        count = jnp.sum(union_F.astype(jnp.int32))
        y_NxD, fallback = reader.read(cfg, decode, x_NxD, w, up_FxD, sp, activation_NxF,
                                      active_NxF, union_F, count)
        stats = {"decode_active": count.astype(jnp.float32),
                 "decode_fallback": fallback.astype(jnp.float32)}
        activation = activation_NxF.reshape(*shape[:-1], -1)
        y_BxTxD = y_NxD.astype(x_BxTxD.dtype).reshape(shape)
        return y_BxTxD, FfnAux(activation, activation, stats=stats)

    return ffn


def _read_cpu(cfg, decode, x_NxD, w: FfnWeights, up_FxD, sp: Sparsity, activation_NxF,
              active_NxF, union_F, count):
    """The ``cpu`` reader: the C++ custom call reads exactly the active rows (never falls back)."""
    from sparsejax.kernels import cpu_decode  # noqa: PLC0415 - built on first use

    coef_NxF = jnp.where(active_NxF, activation_NxF, jnp.zeros_like(activation_NxF))
    return cpu_decode.rows_ffn(x_NxD, coef_NxF, up_FxD, w.w_out_FxD), jnp.bool_(False)


def _read_gathered(cfg, decode, x_NxD, w: FfnWeights, up_FxD, sp: Sparsity, activation_NxF,
                   active_NxF, union_F, count):
    """The ``xla`` reader: ``decode.capacity`` rows gathered; above it the layer runs dense, or
    (``decode.step_fallback``) flags the step for the caller's dense rerun."""
    capacity = decode.capacity

    def gathered(_):
        # The active neurons' indices in order (a cumulative sum, no sort); the slots past
        # ``count`` repeat the last neuron (so the list stays sorted) and are masked out, so
        # nothing is counted twice. Every index is in range by construction, which lets the
        # gathers skip their bounds handling (a pass over the gathered rows otherwise).
        idx_K = jnp.nonzero(union_F, size=capacity, fill_value=cfg.d_ff - 1)[0]
        valid_K = jnp.arange(capacity) < count
        rows = lambda a: a.at[idx_K].get(mode="promise_in_bounds",  # noqa: E731
                                         indices_are_sorted=True)
        cols = lambda a: rows(a.T).T  # noqa: E731
        # Under the zero rule alone an inactive neuron's σ is already 0: only the padding
        # slots need masking. A threshold or top-k leaves nonzero σ on inactive neurons.
        zero_rule = sp.thresholds is None and not sp.trained_topk
        keep_NxK = valid_K[None, :] if zero_rule else cols(active_NxF) & valid_K[None, :]
        h_NxK = cols(activation_NxF)
        if up_FxD is not None:
            h_NxK = h_NxK * (x_NxD @ rows(up_FxD).T)
        h_NxK = jnp.where(keep_NxK, h_NxK, jnp.zeros_like(h_NxK))
        return h_NxK @ rows(w.w_out_FxD)

    def full(_):
        return ffn_lib.reference_ffn(cfg)(x_NxD[None], w, sp)[0][0].astype(x_NxD.dtype)

    fallback = count > capacity
    if decode.step_fallback:
        return gathered(None), fallback
    return jax.lax.cond(fallback, full, gathered, None), fallback


# Decode.kernel -> its row reader, in preference order for ``auto``.
DECODE_KERNELS: dict[str, DecodeKernel] = {
    "cpu": DecodeKernel(_read_cpu, _cpu_kernel_unavailable, capacity=False,
                        description="C++ XLA FFI custom call, exactly the active rows"),
    "xla": DecodeKernel(_read_gathered, lambda cfg: "", capacity=True,
                        description="XLA gather into a static capacity, dense rerun above it"),
}
