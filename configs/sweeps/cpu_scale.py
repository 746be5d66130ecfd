"""CPU scale sweep (Sparsing Law finding 2) under the finding protocol: ReLU and SiLU at four sizes
of width/depth 4, every size trained to the same 300 tokens per non-embedding parameter.

    python -m sparsejax.sweep configs/sweeps/cpu_scale.py --out runs/cpu_scale

Sizes (d_model × layers, width/depth 4, heads of 4, gated FFN with d_ff = 2.5·d_model): 8×2 (1.5k
non-embedding parameters), 12×3 (5.1k), 16×4 (11.9k), 24×6 (40.1k): a 26× span (the paper's
0.1B–1.2B is 12×), × ReLU, SiLU: 8 runs, one seed (the finding is read from each run's plateau level
and its interval, not from seed-to-seed differences). Because every size gets the same tokens per
parameter, size is not confounded with training budget: the largest run trains on 12M tokens, the
smallest on 0.45M (batches of 8–64 sequences of 128, so that every run has ≥ 400 steps).

Every run follows :mod:`sparsejax.sweep.protocol` (12 log-spaced checkpoints, joint CETT-PPL-1%,
constant LR after a 2% warm-up); the learning rate of each size is the best of {3e-3, 1e-2, 2e-2} by
eval loss in ``benchmarks/lr_pilot.py`` with ReLU (notebooks/results/lr_pilot_scale.json): :data:`LR`,
used for SiLU too.

Cost, measured on the 2-core sandbox (AMD EPYC) on 2026-12-06: 47.7 minutes wall for the sweep
command (training 30.4 min, eval.py 13.1 min, fits and plots 4 min), of which the last ~25 minutes
shared the CPU with the test suite (the 24×6 ReLU run took 850 s to train against 699 s for the
24×6 SiLU run alone), so ≈ 40 minutes on an idle machine. Training throughput (median of the
logged steps): 396k tokens/s at 8×2, 116k at 12×3, 91k at 16×4, 21k at 24×6 (six thin layers:
overhead-bound), which makes the largest size 80% of the training time.
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

HEAD_DIM = 4
SHAPES = ((8, 2), (12, 3), (16, 4), (24, 6))  # width/depth 4
# (d_model, n_layers) -> learning rate: the pilot's best (notebooks/results/lr_pilot_scale.json).
LR = {(8, 2): 2e-2, (12, 3): 2e-2, (16, 4): 1e-2, (24, 6): 1e-2}


def get_sweep() -> sweep.Sweep:
    sizes = [protocol.shape_point(d, n, head_dim=HEAD_DIM, learning_rate=LR[d, n]) for d, n in SHAPES]
    runs = sweep.cross(sizes, sweep.activation_points(("relu", "silu")), config="configs/tiny_relu.py")
    return sweep.Sweep(name="cpu_scale", runs=runs, eval=protocol.EVAL,
                       plots=("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens"))
