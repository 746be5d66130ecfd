"""CPU width/depth sweep (Sparsing Law finding 1) as the paper trains: µP with one learning rate for
every shape, each run trained to 1,000 tokens per non-embedding parameter.

    python -m sparsejax.sweep configs/sweeps/cpu_width_depth_mup.py --out runs/cpu_width_depth_mup \\
        --jobs 2 --publish notebooks/results/cpu_width_depth_mup

The shapes of ``cpu_width_depth.py`` (ReLU, heads of 8, gated FFN with d_ff = 2.5·d_model, byte
tokens on the embedded corpus, 23.7k–26.7k non-embedding parameters): d_model × layers 16×8, 24×4,
32×2, 48×1, width/depth 2, 6, 16, 48; two seeds: 8 runs. What differs, and why:

- **µP** (``protocol.mup_overrides``: MiniCPM's constants, widths measured against
  ``protocol.MUP_BASE``) and **one base learning rate**, ``protocol.MUP_LEARNING_RATE``, for every
  shape. ``cpu_width_depth.py`` gave each shape its own pilot-best LR under standard
  parameterisation, and the activation ratio moves with the LR as much as with the shape
  (notebooks/results/lr_vs_ratio.json: +36% to +109% between learning rates whose losses are within
  5% of each other), so its width/depth differences are confounded with LR; µP is what lets one LR
  serve every width, as in the paper.
- **1,000 tokens per parameter** (``protocol.LIMIT_TOKENS_PER_PARAM``; 24M–27M tokens, ≈ 3,000
  steps of 64×128): at 300 no run reached its plateau.

Cost, estimated from the 300-tokens/parameter sweep's throughput (52k–113k tokens/s): ≈ 4–8 min of
training per run, ≈ 1 h for the 8 runs one at a time; ``--jobs 2`` runs two single-threaded children
side by side (speed-up measured in the README).
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

HEAD_DIM = 8
SHAPES = ((16, 8), (24, 4), (32, 2), (48, 1))  # width/depth 2, 6, 16, 48
SEEDS = (0, 1)


def get_sweep() -> sweep.Sweep:
    shapes = [protocol.shape_point(d, n, head_dim=HEAD_DIM, learning_rate=protocol.MUP_LEARNING_RATE,
                                   size="25k", mup_base=protocol.MUP_BASE,
                                   tokens_per_param=protocol.LIMIT_TOKENS_PER_PARAM)
              for d, n in SHAPES]
    seeds = [sweep.Point(f"s{s}", (f"train.seed={s}",)) for s in SEEDS]
    runs = sweep.cross(shapes, sweep.activation_points(("relu",)), seeds, config="configs/tiny_relu.py")
    return sweep.Sweep(name="cpu_width_depth_mup", runs=runs, eval=protocol.EVAL,
                       plots=("ratio_vs_tokens", "limit_vs_width_depth", "loss_vs_tokens"))
