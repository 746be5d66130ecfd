"""Scale sweep (Sparsing Law finding 2) under the finding protocol, sized for one GPU for about ten
minutes. Not run in this repository (no GPU here); the cost below is an estimate.

    python -m sparsejax.sweep configs/sweeps/gpu_scale.py --out runs/gpu_scale --publish notebooks/results/gpu_scale
    SPARSEJAX_SCALE_DIR=notebooks/results/gpu_scale jupyter execute notebooks/sparsing_law_findings.ipynb

ReLU and SiLU (gated FFN, heads of 16) at width/depth 8: 24×3, 32×4, 48×6, 64×8 (17.7k, 47.4k, 160k,
378k non-embedding parameters: a 21× span), every size at 300 tokens per non-embedding parameter
(5.3M–113M tokens): 8 runs. Byte tokens from TFDS lm1b (see gpu_width_depth.py), sequences of 256,
up to 256 per step, the protocol's checkpoints, metric and plateau test; µP with one base LR
as there.

Estimated cost on one H100 (≈ 6M tokens/s for these overhead-bound shapes, an estimate): training
≈ 2 × 170M tokens ≈ 1 min, evaluation ≈ 20 s per run ≈ 3 min, start-up ≈ 10 s per process: ≈ 5–10
minutes.
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

SETUP = protocol.GPU  # heads, data, regime, µP and its one LR (sparsejax.sweep.protocol)
SHAPES = ((24, 3), (32, 4), (48, 6), (64, 8))  # width/depth 8


def get_sweep() -> sweep.Sweep:
    shapes = [SETUP.point(d, n) for d, n in SHAPES]
    runs = sweep.cross(shapes, sweep.activation_points(("relu", "silu")),
                       config=SETUP.config, common=SETUP.data)
    return sweep.Sweep(name="gpu_scale", runs=runs, eval=protocol.EVAL,
                       plots=("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens"))
