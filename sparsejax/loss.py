"""Next-token cross-entropy: from logits, or tiled over the sequence from the final hidden states.

The tiled form (:func:`tiled_next_token_loss`) never holds the [B, L, V] float32 logits: it scans
over tiles of ``tile_len`` positions, computing each tile's [B, tile_len, V] logits from the
hidden states and the output projection, keeping only their log-sum-exp ([B, L]); its custom VJP
recomputes each tile's logits in the backward pass. With a 122,753-token vocabulary the full
logits and their bf16 copies are most of a paper model's step memory (README "Fit on TPU");
MaxText tiles for the same reason (``num_vocab_tiling``). Tiles run along the sequence, not the
flattened tokens, so every tile keeps the batch axis and its data-parallel sharding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def next_token_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                    weights_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(mean loss over weighted tokens, token count). ``targets`` are already shifted."""
    loss_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    if weights_BxL is None:
        weights_BxL = jnp.ones_like(loss_BxL)
    weights_BxL = weights_BxL.astype(jnp.float32)
    count = jnp.sum(weights_BxL)
    return jnp.sum(loss_BxL * weights_BxL) / jnp.maximum(count, 1.0), count


def _eq(vocab_major: bool, pattern: str) -> str:
    """An einsum equation with the projection written ``w`` as [V, D] or [D, V]."""
    return pattern.replace("w", "vd" if vocab_major else "dv")


def head_logits(h_BxTxD: jax.Array, w: jax.Array, logit_scale: float = 1.0, *,
                vocab_major: bool = False) -> jax.Array:
    """float32 logits of the output projection ``w`` ([D, V], or [V, D] if ``vocab_major``),
    accumulated in float32 whatever the dtype."""
    logits = jnp.einsum(_eq(vocab_major, "btd,w->btv"), h_BxTxD, w.astype(h_BxTxD.dtype),
                        preferred_element_type=jnp.float32)
    return logits * logit_scale if logit_scale != 1.0 else logits


def _tiles(x_BxL, tile_len: int):
    """[B, L, ...] -> [L/tile_len, B, tile_len, ...] (the scan axis first)."""
    b, length = x_BxL.shape[:2]
    return x_BxL.reshape(b, length // tile_len, tile_len, *x_BxL.shape[2:]).swapaxes(0, 1)


def _untile(x_NxBxT):
    n, b, t = x_NxBxT.shape[:3]
    return x_NxBxT.swapaxes(0, 1).reshape(b, n * t, *x_NxBxT.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tiled_loss_sum(h_BxLxD, w, targets_BxL, weights_BxL, tile_len, logit_scale, vocab_major):
    return _tiled_loss_fwd(h_BxLxD, w, targets_BxL, weights_BxL, tile_len, logit_scale,
                           vocab_major)[0]


def _tiled_loss_fwd(h_BxLxD, w, targets_BxL, weights_BxL, tile_len, logit_scale, vocab_major):
    def tile(_, xs):
        h_BxTxD, targets_BxT, weights_BxT = xs
        logits_BxTxV = head_logits(h_BxTxD, w, logit_scale, vocab_major=vocab_major)
        lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
        target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
        return None, (jnp.sum((lse_BxT - target_BxT) * weights_BxT), lse_BxT)

    xs = (_tiles(h_BxLxD, tile_len), _tiles(targets_BxL, tile_len), _tiles(weights_BxL, tile_len))
    _, (sums_N, lse_NxBxT) = jax.lax.scan(tile, None, xs)
    # Only the log-sum-exp per token is kept for the backward pass, not the logits.
    return jnp.sum(sums_N), (h_BxLxD, w, targets_BxL, weights_BxL, _untile(lse_NxBxT))


def _tiled_loss_bwd(tile_len, logit_scale, vocab_major, residuals, g):
    h_BxLxD, w, targets_BxL, weights_BxL, lse_BxL = residuals
    dtype = h_BxLxD.dtype
    w_dtype = w.astype(dtype)

    def tile(dw, xs):
        h_BxTxD, targets_BxT, weights_BxT, lse_BxT = xs
        logits_BxTxV = head_logits(h_BxTxD, w, logit_scale, vocab_major=vocab_major)
        # d(lse - logit_target)/d logits = softmax - onehot, per token times weight · g · scale.
        probs_BxTxV = jnp.exp(logits_BxTxV - lse_BxT[..., None])
        onehot_BxTxV = jax.nn.one_hot(targets_BxT, logits_BxTxV.shape[-1], dtype=jnp.float32)
        dlogits_BxTxV = ((probs_BxTxV - onehot_BxTxV)
                         * (weights_BxT * g * logit_scale)[..., None]).astype(dtype)
        dh_BxTxD = jnp.einsum(_eq(vocab_major, "btv,w->btd"), dlogits_BxTxV, w_dtype,
                              preferred_element_type=jnp.float32)
        # In w's own layout: no transposed [V, D] copy of the projection or its gradient.
        dw = dw + jnp.einsum(_eq(vocab_major, "btd,btv->w"), h_BxTxD, dlogits_BxTxV,
                             preferred_element_type=jnp.float32)
        return dw, dh_BxTxD.astype(dtype)

    xs = (_tiles(h_BxLxD, tile_len), _tiles(targets_BxL, tile_len), _tiles(weights_BxL, tile_len),
          _tiles(lse_BxL, tile_len))
    dw, dh_NxBxTxD = jax.lax.scan(tile, jnp.zeros(w.shape, jnp.float32), xs)
    # Targets and token weights are data: no gradient flows to them.
    return (_untile(dh_NxBxTxD), dw.astype(w.dtype), None, jnp.zeros_like(weights_BxL))


_tiled_loss_sum.defvjp(_tiled_loss_fwd, _tiled_loss_bwd)


def tiled_next_token_loss(h_BxLxD: jax.Array, w: jax.Array, targets_BxL: jax.Array,
                          weights_BxL: jax.Array | None = None, *, tile_len: int,
                          logit_scale: float = 1.0, vocab_major: bool = False
                          ) -> tuple[jax.Array, jax.Array]:
    """:func:`next_token_loss` of ``head_logits(h, w, logit_scale, vocab_major=...)``, computed
    ``tile_len`` sequence positions at a time (see module docstring); same (mean loss, count).

    ``h``: final (normed) hidden states; ``w``: the output projection, [D, V] (an untied head)
    or, with ``vocab_major``, [V, D] (the tied embedding table, used as stored);
    ``logit_scale``: a constant (Python float) multiplier of the logits (e.g. MiniCPM's width
    scaling). A sequence that ``tile_len`` does not divide is padded with zero-weight positions.
    """
    if tile_len <= 0:
        raise ValueError(f"tile_len={tile_len} must be > 0")
    b, length = targets_BxL.shape
    if weights_BxL is None:
        weights_BxL = jnp.ones((b, length), jnp.float32)
    weights_BxL = weights_BxL.astype(jnp.float32)
    pad = -length % tile_len
    if pad:
        h_BxLxD = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
        weights_BxL_padded = jnp.pad(weights_BxL, ((0, 0), (0, pad)))
    else:
        weights_BxL_padded = weights_BxL
    total = _tiled_loss_sum(h_BxLxD, w, targets_BxL.astype(jnp.int32), weights_BxL_padded,
                            int(tile_len), float(logit_scale), bool(vocab_major))
    count = jnp.sum(weights_BxL)
    return total / jnp.maximum(count, 1.0), count


def model_loss(model, params, batch: dict, *, loss_tile_len: int = 0,
               **apply_kwargs) -> tuple[jax.Array, jax.Array, dict]:
    """(mean next-token loss, token count, collections) of one forward pass of ``model`` (a
    :class:`sparsejax.model.Model`; ``apply_kwargs`` go to its ``apply``) on ``batch``.
    ``loss_tile_len`` > 0: the tiled loss (``train.loss_tile_len``), which never holds the full
    logits; 0: :func:`next_token_loss` of the logits."""
    if loss_tile_len:
        head, collected = model.apply(params, batch["inputs"], return_hidden=True, **apply_kwargs)
        mean_loss, tokens = tiled_next_token_loss(
            head.h_BxLxD, head.w, batch["targets"], batch["weights"], tile_len=loss_tile_len,
            logit_scale=head.logit_scale, vocab_major=head.vocab_major)
    else:
        logits, collected = model.apply(params, batch["inputs"], **apply_kwargs)
        mean_loss, tokens = next_token_loss(logits, batch["targets"], batch["weights"])
    return mean_loss, tokens, collected
