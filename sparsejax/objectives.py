"""Sparsity regularisers of FFN activations, as token-weighted sums so they accumulate exactly.

Each penalty of one layer returns ``(sum, count)`` over the valid tokens of a (micro-)batch: the
train step adds sums and counts over micro-batches and layers and divides once, so a
regulariser means the same with and without gradient accumulation, as the LM loss does
(``loss.next_token_loss``). The objective is ``LM loss + Σ_k λ_k(step) · R_k`` with each
``λ_k`` from a :mod:`sparsejax.schedules` schedule; every term is reported on its own.

* :func:`l1_penalty`: ProSparse's L1 on the FFN activations σ(gate) (Song et al. 2024), per
  token the sum over neurons of |σ(gate)|, so λ is per neuron-activation, as in the paper.
* :func:`chunk_penalty`: a differentiable surrogate of chunk-level activity (BlockFFN, Song et al.
  2025): for each chunk of ``L`` consecutive tokens and each neuron, a soft "active somewhere in
  the chunk" ``u = 1 − exp(−Σ_{t ∈ chunk} |a_t| / τ)``, averaged over neurons. ``u`` is 0 when the
  neuron is silent on the whole chunk and saturates once it is active anywhere in it, so the
  gradient favours the same neurons staying silent over consecutive tokens (what a block-sparse
  kernel can skip) over scattered per-token zeros. It is ``1 − Π_t (1 − p_t)``, the probability
  of a union, for per-token activity ``p_t = 1 − exp(−|a_t| / τ)``.

Shape suffixes: B batch, L sequence length, F d_ff, Q chunks per sequence, C chunk length.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _abs(x: Array) -> Array:
    """|x| with subgradient 0 at 0 (``jnp.abs`` gives 1 there), so an exact zero — a ReLU that
    is off — receives no L1 push."""
    x = x.astype(jnp.float32)
    return jnp.sign(x) * x


def token_count(weights_BxL: Array) -> Array:
    """The L1 penalty's divisor: the (weighted) number of valid tokens, as the LM loss counts."""
    return jnp.sum(weights_BxL.astype(jnp.float32))


def chunk_token_count(weights_BxL: Array, chunk_len: int) -> Array:
    """The chunk penalty's divisor: whole valid chunks × ``chunk_len`` (a function of the token
    weights alone, so the train step knows it for the whole batch before any micro-batch)."""
    b, l = weights_BxL.shape
    whole_BxQ = jnp.all(weights_BxL.reshape(b, l // chunk_len, chunk_len) > 0, axis=-1)
    return jnp.sum(whole_BxQ.astype(jnp.float32)) * chunk_len


def l1_penalty(act_BxLxF: Array, weights_BxL: Array) -> tuple[Array, Array]:
    """(Σ over valid tokens of Σ_F |a|, number of valid tokens)."""
    w_BxL = weights_BxL.astype(jnp.float32)
    per_token_BxL = jnp.sum(_abs(act_BxLxF), axis=-1)
    return jnp.sum(per_token_BxL * w_BxL), token_count(w_BxL)


def chunk_penalty(act_BxLxF: Array, weights_BxL: Array, chunk_len: int,
                  tau: float = 0.1) -> tuple[Array, Array]:
    """(Σ over whole valid chunks of mean_F u, number of those chunks × chunk_len).

    Chunks are consecutive, non-overlapping runs of ``chunk_len`` tokens of each sequence; a
    chunk counts only if all its tokens are valid, and the count is in tokens (chunks ×
    ``chunk_len``) so that dividing by it gives a per-token rate, like the other terms.
    """
    b, l, f = act_BxLxF.shape
    if chunk_len < 1 or l % chunk_len:
        raise ValueError(f"chunk_len={chunk_len} must be >= 1 and divide the sequence length {l}")
    if tau <= 0:
        raise ValueError(f"tau={tau} must be > 0")
    q = l // chunk_len
    mass_BxQxF = jnp.sum(_abs(act_BxLxF).reshape(b, q, chunk_len, f), axis=2)
    union_BxQ = jnp.mean(1.0 - jnp.exp(-mass_BxQxF / tau), axis=-1)
    whole_BxQ = jnp.all(weights_BxL.reshape(b, q, chunk_len) > 0, axis=-1).astype(jnp.float32)
    return jnp.sum(union_BxQ * whole_BxQ) * chunk_len, chunk_token_count(weights_BxL, chunk_len)


@dataclasses.dataclass(frozen=True)
class Regulariser:
    """One penalty as the FFN block and the step use it.

    ``layer_sum(act_BxLxF, weights_BxL, chunk_len, tau)``: the layer's sum, reduced in the block;
    ``count(weights_BxL, chunk_len)``: its divisor, from the token weights alone;
    ``metric``: its name in the step's metrics (its weight's is ``<name>_coef``).

    A regulariser is on when the ``sparsity`` config section's schedule of the same name is
    (``sparsejax.sparsity_plan``): adding one is an entry here and a Schedule field there.
    """

    layer_sum: Callable[[Array, Array, int, float], Array]
    count: Callable[[Array, int], Array]
    metric: str


REGULARISERS: dict[str, Regulariser] = {
    "l1": Regulariser(lambda a, w, c, tau: l1_penalty(a, w)[0], lambda w, c: token_count(w), "l1"),
    "chunk": Regulariser(lambda a, w, c, tau: chunk_penalty(a, w, c, tau)[0], chunk_token_count,
                         "chunk_loss"),
}
