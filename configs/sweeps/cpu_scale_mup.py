"""CPU scale sweep (Sparsing Law finding 2) as the paper trains: µP with one learning rate for every
size, each run trained to 1,000 tokens per non-embedding parameter.

    python -m sparsejax.sweep configs/sweeps/cpu_scale_mup.py --out runs/cpu_scale_mup \\
        --jobs 2 --publish notebooks/results/cpu_scale_mup

The sizes of ``cpu_scale.py`` (width/depth 4, heads of 4, gated FFN with d_ff = 2.5·d_model, byte
tokens on the embedded corpus): 8×2 (1.5k non-embedding parameters), 12×3 (5.1k), 16×4 (11.9k),
24×6 (40.1k), × ReLU, SiLU: 8 runs, one seed (as there: the finding is read from each run's plateau
level and its interval). µP with ``protocol.MUP_LEARNING_RATE`` for every size instead of a per-size
pilot LR, and 1,000 tokens per parameter (``protocol.LIMIT_TOKENS_PER_PARAM``; 1.5M–40M tokens)
instead of 300 — see ``cpu_width_depth_mup.py`` for why.

Cost, estimated from the 300-tokens/parameter sweep (47.7 min, 80% of it the two 24×6 runs at
≈ 21k tokens/s): ≈ 2 h one run at a time; with ``--jobs 2`` the two 24×6 runs go side by side.
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

HEAD_DIM = 4
SHAPES = ((8, 2), (12, 3), (16, 4), (24, 6))  # width/depth 4


def get_sweep() -> sweep.Sweep:
    sizes = [protocol.shape_point(d, n, head_dim=HEAD_DIM, learning_rate=protocol.MUP_LEARNING_RATE,
                                  mup_base=protocol.MUP_BASE, tokens_per_param=protocol.LIMIT_TOKENS_PER_PARAM)
             for d, n in SHAPES]
    runs = sweep.cross(sizes, sweep.activation_points(("relu", "silu")), config="configs/tiny_relu.py")
    return sweep.Sweep(name="cpu_scale_mup", runs=runs, eval=protocol.EVAL,
                       plots=("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens"))
