"""ProSparse on the tiny CPU proxy (Song et al. 2024, arXiv 2402.13516; docs/recipes.md).

Activation substitution: warm-started from a short SiLU run (train.warm_start), the FFN becomes
FATReLU (threshold 0 = ReLU). Progressive L1 on σ(gate) in two sine stages, then the FATReLU
threshold rises to 0.01 for the last stage. Steps count from the warm start: 100 SiLU steps + 200
here = 300, the baselines' length. Run from the repository root:

    python train.py --config configs/tiny_silu.py --workdir runs/recipes/silu_warm \\
        --set train.steps=100 --set train.checkpoint_every=100
    python train.py --config configs/recipes/prosparse_tiny.py --workdir runs/recipes/prosparse
"""

from sparsejax.config import proxy_config
from sparsejax.schedules import Schedule


def get_config():
    cfg = proxy_config("tiny", activation="fatrelu")
    cfg.name = "prosparse_tiny"
    cfg.train.steps = 200
    cfg.train.warmup_steps = 10  # a fresh optimizer on warm weights: a short warm-up
    cfg.train.warm_start = "runs/recipes/silu_warm"
    # λ_0 = 0 until step 20 (ReLU settles), S-curve to λ_1 by 80, to λ_2 by 140, then flat.
    cfg.sparsity.l1 = Schedule("sine_stages", (0.0, 1e-3, 3e-3), (20, 80, 140))
    # The final stage: FATReLU threshold 0.01 from step 160 (ProSparse's default).
    cfg.sparsity.activation_threshold = Schedule("piecewise", (0.0, 0.01), (0, 160))
    return cfg
