"""CPU proxy width/depth sweep (Sparsing Law finding 1): ReLU at a fixed ~0.4M non-embedding parameters.

    python -m sparsejax.sweep configs/sweeps/cpu_width_depth.py --out runs/cpu_width_depth

Five shapes of ≈ 0.4M non-embedding parameters (``sweep.width_depth_points``: the depth that brings
each width closest to 400k; all within 6.2%): d_model 48/64/96/128/192 with 15/8/4/2/1 layers, i.e.
width/depth 3.2, 8, 24, 64, 192 (the paper's bottleneck is ≈ 114). Heads of 16, gated FFN with
d_ff = 2.5·d_model, ReLU (the paper's width/depth figure is ReLU), byte tokens on the embedded
corpus; two seeds each (``train.seed``): 10 runs.

Each run: 300 steps of 16×64 tokens (0.31M tokens), constant LR after a 30-step warm-up (as
cpu_proxy.py, so the ratio reflects data, not the LR schedule). Only the final checkpoint is kept
and evaluated (zero and CETT-PPL-1%); the ratio-vs-tokens curve is the in-graph ratio logged every
10 steps. notebooks/sparsing_law_findings.ipynb fits a line of the ratio on width/depth.

Cost, measured on a 2-core sandbox on 2026-11-27: at most 24 min in all, of which 17 min train + eval
(54–166 s per run, the 15-layer shape slowest; other test runs shared the cores for ~10 of those
minutes) and 7 min of the sweep's fits (200 bootstrap resamples).
"""

from sparsejax import sweep

TARGET_NON_EMBEDDING = 400_000
WIDTHS = (48, 64, 96, 128, 192)  # depths 15, 8, 4, 2, 1: width/depth 3.2, 8, 24, 64, 192
HEAD_DIM = 16
SEEDS = (0, 1)
STEPS = 300
COMMON = (f"train.steps={STEPS}", "train.seq_len=64", "train.schedule=constant", "train.warmup_steps=30",
          "train.checkpoint_every=100", f"train.keep_every={STEPS}", "train.keep_last=1",
          "train.eval_every=100", "train.log_every=10")


def get_sweep() -> sweep.Sweep:
    shapes = sweep.width_depth_points(WIDTHS, TARGET_NON_EMBEDDING, head_dim=HEAD_DIM, size="0.4M")
    seeds = [sweep.Point(f"s{s}", (f"train.seed={s}",)) for s in SEEDS]
    runs = sweep.cross(shapes, sweep.activation_points(("relu",)), seeds, config="configs/tiny_relu.py",
                       common=COMMON)
    return sweep.Sweep(name="cpu_width_depth", runs=runs,
                       eval=sweep.EvalOptions(metrics=("zero", "cett_ppl")),
                       plots=("ratio_vs_tokens", "limit_vs_width_depth", "loss_vs_tokens"))
