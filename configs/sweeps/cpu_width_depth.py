"""CPU width/depth sweep (Sparsing Law finding 1) under the finding protocol: ReLU at ≈ 25k
non-embedding parameters, each run trained to 300 tokens per non-embedding parameter.

    python -m sparsejax.sweep configs/sweeps/cpu_width_depth.py --out runs/cpu_width_depth

Four shapes of 23.7k–26.7k non-embedding parameters, heads of 8, gated FFN with d_ff = 2.5·d_model,
ReLU, byte tokens on the embedded corpus: d_model × layers 16×8, 24×4, 32×2, 48×1, i.e. width/depth
2, 6, 16, 48 (the widest spread these sizes allow: a 64-wide single layer is already 47k
parameters). The paper's bottleneck is at ≈ 114, beyond this range: what can be tested here is the
direction below it (wider → sparser at a fixed size). Two seeds each (``train.seed``): 8 runs.

Every run follows :mod:`sparsejax.sweep.protocol`: 300 tokens per parameter (7.1M–8.0M tokens,
870–980 steps of 64×128), constant LR after a 2% warm-up, 12 log-spaced checkpoints all evaluated,
CETT-PPL-1% with one CETT searched jointly on the last 5 checkpoints. The learning rate of each
shape is the best of {3e-3, 1e-2, 2e-2} by eval loss in ``benchmarks/lr_pilot.py`` (300 steps;
table in notebooks/results/lr_pilot_width_depth.json): :data:`LR`.

The embedded corpus holds ≈ 1.1M byte tokens, so each run sees it ~7 times: the eval loss is on
held-out text, and the ratio is measured on it.

Cost, measured on the 2-core sandbox (AMD EPYC) on 2026-12-06: 36.7 minutes wall for the sweep
command (training 21.2 min, eval.py 8.2 min, fits with 200 bootstrap resamples and plots 7 min; for
about 5 of them tests shared the CPU). Training throughput (median of the logged steps, one process,
two threads): 52k tokens/s at 16×8, 69k at 24×4, 96k at 32×2, 113k at 48×1; a run's wall time
(105–210 s) adds start-up, compilation, 12 checkpoint saves and the final eval. Two single-threaded
runs side by side took as long as the two one after another (measured 2026-12-05: 79 s vs 82 s for
an unbalanced pair), so the sweep runs one process at a time.
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

HEAD_DIM = 8
SHAPES = ((16, 8), (24, 4), (32, 2), (48, 1))  # width/depth 2, 6, 16, 48
# (d_model, n_layers) -> learning rate: the pilot's best (notebooks/results/lr_pilot_width_depth.json).
LR = {(16, 8): 1e-2, (24, 4): 1e-2, (32, 2): 3e-3, (48, 1): 2e-2}
SEEDS = (0, 1)


def get_sweep() -> sweep.Sweep:
    shapes = [protocol.shape_point(d, n, head_dim=HEAD_DIM, learning_rate=LR[d, n], size="25k")
              for d, n in SHAPES]
    seeds = [sweep.Point(f"s{s}", (f"train.seed={s}",)) for s in SEEDS]
    runs = sweep.cross(shapes, sweep.activation_points(("relu",)), seeds, config="configs/tiny_relu.py")
    return sweep.Sweep(name="cpu_width_depth", runs=runs, eval=protocol.EVAL,
                       plots=("ratio_vs_tokens", "limit_vs_width_depth", "loss_vs_tokens"))
