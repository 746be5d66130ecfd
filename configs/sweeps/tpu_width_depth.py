"""Width/depth sweep (Sparsing Law finding 1) under the finding protocol, sized for a TPU v5e-16
slice for a few hours, with width/depth straddling the paper's bottleneck (≈ 114). Not run in this
repository; the cost below is an estimate.

    python -m sparsejax.sweep configs/sweeps/tpu_width_depth.py --out gs://$BUCKET/sweeps/tpu_width_depth \\
        --launch tpu-vm --launch-opts "--tpu-type v5litepod-16 --zone $ZONE --run"
    # then, on a machine that reads the bucket:
    python -m sparsejax.sweep configs/sweeps/tpu_width_depth.py --out gs://$BUCKET/sweeps/tpu_width_depth \\
        --collect-only --publish notebooks/results/tpu_width_depth

ReLU (gated FFN, d_ff = 2.5·d_model, heads of 64) at ≈ 20M non-embedding parameters: d_model × layers
256×26, 384×12, 512×7, 640×4, 768×3, 1024×2 (width/depth 10, 32, 73, 160, 256, 512; 18.8M–24.1M),
one seed: 6 runs. C4 through TFDS (README "Pretraining on TPU VMs": ``tfds build c4``) with a
SentencePiece vocabulary of 32,000 trained on it; sequences of 1,024, up to 256 per step; the paper
model's pod settings otherwise (``configs/sparsing_law_0.1b.py``: fsdp over the slice, scanned and
rematerialised layers, bf16). The protocol (:mod:`sparsejax.sweep.protocol`): 300 tokens per
non-embedding parameter (5.7B–7.2B tokens), 12 log-spaced checkpoints, joint CETT-PPL-1%, plateau test.

Learning rate: the paper's µP (base width 256) with its one peak LR 0.01 for every shape (``protocol.TPU``).

Estimated cost: 6·(N + d_model·V)·D FLOPs per run (the logits matmul counts: d_model·V is 8M–33M
here) ≈ 1.0e18–2.5e18, 9.1e18 for the sweep; a v5e-16 slice peaks at 16 × 197 TFLOP/s (bf16), and at
an assumed 25% MFU (optimistic for 256-wide models) that is ≈ 3.2 hours of training. Evaluation (2.1M
held-out tokens, ≈ 330 forward passes per run for 12 checkpoints and the joint CETT search, on worker
0's 4 chips) ≈ 5 minutes per run: ≈ 3.5–4 hours in all. Two seeds double it.
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

SETUP = protocol.TPU  # heads, data, regime, µP and its one LR (sparsejax.sweep.protocol)
SHAPES = ((256, 26), (384, 12), (512, 7), (640, 4), (768, 3), (1024, 2))


def get_sweep() -> sweep.Sweep:
    shapes = [SETUP.point(d, n, size="20M") for d, n in SHAPES]
    runs = sweep.cross(shapes, sweep.activation_points(("relu",)),
                       config=SETUP.config, common=SETUP.data)
    return sweep.Sweep(name="tpu_width_depth", runs=runs, eval=protocol.EVAL,
                       plots=("ratio_vs_tokens", "limit_vs_width_depth", "loss_vs_tokens"))
