"""Random-token batches and a few real train steps, shared by the step and model-core tests."""

import jax
import numpy as np

from sparsejax import optim, sharding, step


def random_batches(cfg, n, seed=0):
    """``n`` host batches of uniform random byte tokens at the config's batch and sequence shape."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, 256, size=(cfg.train.batch_size, cfg.train.seq_len + 1)).astype(np.int32)
        out.append({"inputs": x[:, :-1], "targets": x[:, 1:],
                    "weights": np.ones((cfg.train.batch_size, cfg.train.seq_len), np.float32)})
    return out


def train_steps(cfg, devices, n_steps=3):
    """(losses [n], per-layer activation ratios [n, N], final state) of ``n_steps`` real steps."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    fns = step.make_step_functions(cfg, mesh, optim.make_optimizer(cfg))
    state = fns.init(jax.random.key(0))
    losses, ratios = [], []
    for batch in random_batches(cfg, n_steps):
        state, m = fns.train(state, fns.plan.global_batch(batch))
        losses.append(float(m["loss"]))
        ratios.append(np.asarray(m["activation_ratio_layers"]))
    return np.array(losses), np.array(ratios), state
