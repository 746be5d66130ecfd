"""Random FFN-layer data shared by tests/test_metrics.py and tests/test_cett.py."""

import numpy as np

N_LAYERS = 3


def random_layers(seed, n_tokens, d_ff, d_model=None, zeros=0.0):
    """Per-layer (σ(gate), σ(gate)·up, w_out) with gated-FFN-like magnitudes for ``N_LAYERS``
    layers; ``zeros`` is the share of exact zeros in σ(gate) (ReLU-like); w_out is None without
    ``d_model``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_LAYERS):
        act = rng.standard_normal((n_tokens, d_ff)).astype(np.float32)
        act[rng.random((n_tokens, d_ff)) < zeros] = 0.0
        hidden = (act * rng.standard_normal((n_tokens, d_ff))).astype(np.float32)
        w = None if d_model is None else \
            (rng.standard_normal((d_ff, d_model)) / np.sqrt(d_ff)).astype(np.float32)
        out.append((act, hidden, w))
    return out
