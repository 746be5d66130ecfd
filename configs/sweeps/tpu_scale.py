"""Scale sweep (Sparsing Law finding 2) under the finding protocol, sized for a TPU v5e-16 slice for a
few hours. Not run in this repository; the cost below is an estimate.

    python -m sparsejax.sweep configs/sweeps/tpu_scale.py --out gs://$BUCKET/sweeps/tpu_scale \\
        --launch tpu-vm --launch-opts "--tpu-type v5litepod-16 --zone $ZONE --run"
    python -m sparsejax.sweep configs/sweeps/tpu_scale.py --out gs://$BUCKET/sweeps/tpu_scale \\
        --collect-only --publish notebooks/results/tpu_scale

ReLU and SiLU (gated FFN, heads of 64) at width/depth 48: 192×4, 288×6, 384×8, 576×12 (1.7M, 5.5M,
13.6M, 45.8M non-embedding parameters: a 27× span), every size at 300 tokens per non-embedding
parameter (0.5B–13.7B tokens): 8 runs. C4 with a 32,000-piece SentencePiece vocabulary, sequences of
1,024, pod settings of ``configs/sparsing_law_0.1b.py``, the paper's µP and one LR (as tpu_width_depth.py).

Estimated cost: 6·(N + d_model·V)·D ≈ 2.4e16, 1.5e17, 6.3e17 and 5.3e18 FLOPs per run for the four
sizes, 1.2e19 for the sweep; at an assumed 25% MFU of a v5e-16 slice (788 TFLOP/s) ≈ 4.3 hours of
training, plus ≈ 5 minutes of evaluation per run: ≈ 5 hours.
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

SETUP = protocol.TPU  # heads, data, regime, µP and its one LR (sparsejax.sweep.protocol)
SHAPES = ((192, 4), (288, 6), (384, 8), (576, 12))  # width/depth 48


def get_sweep() -> sweep.Sweep:
    shapes = [SETUP.point(d, n) for d, n in SHAPES]
    runs = sweep.cross(shapes, sweep.activation_points(("relu", "silu")),
                       config=SETUP.config, common=SETUP.data)
    return sweep.Sweep(name="tpu_scale", runs=runs, eval=protocol.EVAL,
                       plots=("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens"))
