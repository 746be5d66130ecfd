"""Width/depth sweep (Sparsing Law finding 1) under the finding protocol, sized for one GPU for about
ten minutes. Not run in this repository (no GPU here); the cost below is an estimate.

    python -m sparsejax.sweep configs/sweeps/gpu_width_depth.py --out runs/gpu_width_depth \\
        --publish notebooks/results/gpu_width_depth
    SPARSEJAX_WIDTH_DEPTH_DIR=notebooks/results/gpu_width_depth jupyter execute notebooks/sparsing_law_findings.ipynb

ReLU (gated FFN, d_ff = 2.5·d_model, heads of 16) at ≈ 0.1M non-embedding parameters: d_model × layers
32×8, 48×4, 64×2, 96×1, 112×1 (width/depth 4, 12, 32, 96, 112; 94.5k–145k parameters), two seeds:
10 runs. Byte tokens from a TFDS text dataset (lm1b by default: ``tfds build lm1b
--file_format=array_record`` first; the embedded corpus is too small for 30M tokens per run). The
protocol (:mod:`sparsejax.sweep.protocol`): 300 tokens per non-embedding parameter (28M–43M tokens),
sequences of 256, up to 256 per step, 12 log-spaced checkpoints, joint CETT-PPL-1%, plateau test.

Learning rate: µP (``protocol.GPU``: widths measured against ``protocol.MUP_BASE``) with one base LR for
every shape, ``protocol.MUP_LEARNING_RATE`` (the CPU proxies' µP learning rate); no per-shape pilot, so
shape is not confounded with learning rate.

Estimated cost on one H100: these models are overhead-bound (≈ 10 ms per step of 256 × 256 tokens
with the einsum FFN, i.e. ≈ 6M tokens/s, an estimate, not a measurement): training ≈ 5–8 s per 1M
tokens ⇒ 3–6 min for the 10 runs, evaluation of 12 checkpoints ≈ 20 s per run ⇒ ≈ 4 min, compile
and start-up ≈ 10 s per process: ≈ 10 minutes in all.
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

SETUP = protocol.GPU  # heads, data, regime, µP and its one LR (sparsejax.sweep.protocol)
SHAPES = ((32, 8), (48, 4), (64, 2), (96, 1), (112, 1))  # width/depth 4 … 112
SEEDS = (0, 1)


def get_sweep() -> sweep.Sweep:
    shapes = [SETUP.point(d, n, size="0.1M") for d, n in SHAPES]
    seeds = [sweep.Point(f"s{s}", (f"train.seed={s}",)) for s in SEEDS]
    runs = sweep.cross(shapes, sweep.activation_points(("relu",)), seeds,
                       config=SETUP.config, common=SETUP.data)
    return sweep.Sweep(name="gpu_width_depth", runs=runs, eval=protocol.EVAL,
                       plots=("ratio_vs_tokens", "limit_vs_width_depth", "loss_vs_tokens"))
