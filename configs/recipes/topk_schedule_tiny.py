"""Top-k training with a k schedule on the tiny CPU proxy (Q-Sparse, Wang et al. 2024, arXiv
2407.10969; docs/recipes.md): SwiGLU, dense until step 30, k falls linearly to 32 of 320 neurons
(10%) by step 200 and stays there; straight-through gradients through the mask.

    python train.py --config configs/recipes/topk_schedule_tiny.py --workdir runs/recipes/topk
"""

from sparsejax.config import proxy_config
from sparsejax.schedules import Schedule


def get_config():
    cfg = proxy_config("tiny", activation="silu")
    cfg.name = "topk_schedule_tiny"
    cfg.sparsity.topk_ste = True
    # 0 = dense (k = d_ff); linear in neuron counts between the boundaries.
    cfg.sparsity.topk = Schedule("linear", (0.0, 32.0), (30, 200))
    return cfg
