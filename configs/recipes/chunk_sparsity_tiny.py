"""Chunk-level sparsity loss on the tiny CPU proxy (BlockFFN-style, Song et al. 2025;
docs/recipes.md): ReGLU, the chunk penalty (chunks of 8 tokens) ramps up linearly from step 30
to step 100 and stays on, pushing the same neurons to stay silent across consecutive tokens.

    python train.py --config configs/recipes/chunk_sparsity_tiny.py --workdir runs/recipes/chunk
"""

from sparsejax.config import proxy_config
from sparsejax.schedules import Schedule


def get_config():
    cfg = proxy_config("tiny", activation="relu")
    cfg.name = "chunk_sparsity_tiny"
    cfg.sparsity.chunk = Schedule("linear", (0.0, 0.3), (30, 100))
    cfg.sparsity.chunk_len = 8
    return cfg
