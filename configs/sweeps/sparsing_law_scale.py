"""Sparsing Law scale sweep: paper sizes 0.1B–1.2B × ReLU, SiLU, for TPU pods.

Each run uses ``configs/sparsing_law_<size>.py`` (gated FFN, d_ff = 2.5·d_model, head dim 128,
sequence 4096, WSD schedule, C4 through TFDS) with its activation switched. Checkpoints are kept
every 4,000 steps (25 per 100k-step run) so eval.py can trace the activation ratio against data;
the ratio laws are then fitted per run (ReLU: relu_ratio, SiLU: silu_ratio) and the limit A0 is
plotted against parameters (the paper: insensitive to scale).

    python -m sparsejax.sweep configs/sweeps/sparsing_law_scale.py --out /gcs/$BUCKET/sweeps/scale \
        --print-commands   # TPU-VM launch script
"""

from sparsejax import sweep

SIZES = ("0.1b", "0.2b", "0.4b", "0.8b", "1.2b")
ACTIVATIONS = ("relu", "silu")
COMMON = ("train.checkpoint_every=4000", "train.keep_every=4000", "train.keep_last=2")


def get_sweep() -> sweep.Sweep:
    runs = sweep.cross(sweep.paper_size_points(SIZES), sweep.activation_points(ACTIVATIONS), common=COMMON)
    return sweep.Sweep(name="sparsing_law_scale", runs=runs,
                       eval=sweep.EvalOptions(metrics=("zero", "fat", "cett_ppl")),
                       plots=("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens"))
