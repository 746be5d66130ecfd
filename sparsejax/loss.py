"""Next-token cross-entropy."""

from __future__ import annotations

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
