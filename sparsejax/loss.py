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


def head_logits(h_BxTxD: jax.Array, w_DxV: jax.Array, logit_scale: float = 1.0) -> jax.Array:
    """float32 logits of the output projection (accumulated in float32 whatever the dtype)."""
    logits = jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV.astype(h_BxTxD.dtype),
                        preferred_element_type=jnp.float32)
    return logits * logit_scale if logit_scale != 1.0 else logits


def _tiles(x_BxL, tile_len: int):
    """[B, L, ...] -> [L/tile_len, B, tile_len, ...] (the scan axis first)."""
    b, length = x_BxL.shape[:2]
    return x_BxL.reshape(b, length // tile_len, tile_len, *x_BxL.shape[2:]).swapaxes(0, 1)


def _untile(x_NxBxT):
    n, b, t = x_NxBxT.shape[:3]
    return x_NxBxT.swapaxes(0, 1).reshape(b, n * t, *x_NxBxT.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _tiled_loss_sum(h_BxLxD, w_DxV, targets_BxL, weights_BxL, tile_len, logit_scale):
    return _tiled_loss_fwd(h_BxLxD, w_DxV, targets_BxL, weights_BxL, tile_len, logit_scale)[0]


def _tiled_loss_fwd(h_BxLxD, w_DxV, targets_BxL, weights_BxL, tile_len, logit_scale):
    def tile(_, xs):
        h_BxTxD, targets_BxT, weights_BxT = xs
        logits_BxTxV = head_logits(h_BxTxD, w_DxV, logit_scale)
        lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
        target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
        return None, (jnp.sum((lse_BxT - target_BxT) * weights_BxT), lse_BxT)

    xs = (_tiles(h_BxLxD, tile_len), _tiles(targets_BxL, tile_len), _tiles(weights_BxL, tile_len))
    _, (sums_N, lse_NxBxT) = jax.lax.scan(tile, None, xs)
    # Only the log-sum-exp per token is kept for the backward pass, not the logits.
    return jnp.sum(sums_N), (h_BxLxD, w_DxV, targets_BxL, weights_BxL, _untile(lse_NxBxT))


def _tiled_loss_bwd(tile_len, logit_scale, residuals, g):
    h_BxLxD, w_DxV, targets_BxL, weights_BxL, lse_BxL = residuals
    dtype = h_BxLxD.dtype
    w = w_DxV.astype(dtype)

    def tile(dw_DxV, xs):
        h_BxTxD, targets_BxT, weights_BxT, lse_BxT = xs
        logits_BxTxV = head_logits(h_BxTxD, w_DxV, logit_scale)
        # d(lse - logit_target)/d logits = softmax - onehot, per token times weight · g · scale.
        probs_BxTxV = jnp.exp(logits_BxTxV - lse_BxT[..., None])
        onehot_BxTxV = jax.nn.one_hot(targets_BxT, logits_BxTxV.shape[-1], dtype=jnp.float32)
        dlogits_BxTxV = ((probs_BxTxV - onehot_BxTxV)
                         * (weights_BxT * g * logit_scale)[..., None]).astype(dtype)
        dh_BxTxD = jnp.einsum("btv,dv->btd", dlogits_BxTxV, w, preferred_element_type=jnp.float32)
        dw_DxV = dw_DxV + jnp.einsum("btd,btv->dv", h_BxTxD, dlogits_BxTxV,
                                     preferred_element_type=jnp.float32)
        return dw_DxV, dh_BxTxD.astype(dtype)

    xs = (_tiles(h_BxLxD, tile_len), _tiles(targets_BxL, tile_len), _tiles(weights_BxL, tile_len),
          _tiles(lse_BxL, tile_len))
    dw_DxV, dh_NxBxTxD = jax.lax.scan(tile, jnp.zeros(w_DxV.shape, jnp.float32), xs)
    # Targets and token weights are data: no gradient flows to them.
    return (_untile(dh_NxBxTxD), dw_DxV.astype(w_DxV.dtype), None, jnp.zeros_like(weights_BxL))


_tiled_loss_sum.defvjp(_tiled_loss_fwd, _tiled_loss_bwd)


def tiled_next_token_loss(h_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array,
                          weights_BxL: jax.Array | None = None, *, tile_len: int,
                          logit_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """:func:`next_token_loss` of ``head_logits(h, w, logit_scale)``, computed ``tile_len``
    sequence positions at a time (see module docstring); same (mean loss, token count).

    ``h``: final (normed) hidden states; ``w``: the output projection [D, V] (the tied
    embedding's transpose or an untied head); ``logit_scale``: a constant multiplier of the
    logits (e.g. MiniCPM's width scaling). A sequence that ``tile_len`` does not divide is
    padded with zero-weight positions.
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
    total = _tiled_loss_sum(h_BxLxD, w_DxV, targets_BxL.astype(jnp.int32), weights_BxL_padded,
                            int(tile_len), float(logit_scale))
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
            head.h_BxLxD, head.w_DxV, batch["targets"], batch["weights"],
            tile_len=loss_tile_len, logit_scale=head.logit_scale)
    else:
        logits, collected = model.apply(params, batch["inputs"], **apply_kwargs)
        mean_loss, tokens = next_token_loss(logits, batch["targets"], batch["weights"])
    return mean_loss, tokens, collected
