"""CPU proxy scale sweep (Sparsing Law finding 2): ReLU and SiLU at four sizes of width/depth 16.

    python -m sparsejax.sweep configs/sweeps/cpu_scale.py --out runs/cpu_scale

Sizes (d_model × layers, all width/depth 16, heads of 16, gated FFN with d_ff = 2.5·d_model):
32×2 (0.024M non-embedding parameters), 48×3 (0.080M), 64×4 (0.189M), 96×6 (0.637M): a 27× span
(the paper's 0.1B–1.2B is 12×), × ReLU, SiLU: 8 runs, one seed (the finding is read from each
run's fitted limit A0 and its bootstrap interval, not from seed-to-seed differences).

Each run: 400 steps of 16×64 tokens (0.41M tokens), constant LR after a 30-step warm-up; the
in-graph ratio (every 10 steps) carries the curve the ratio laws are fitted to; the final
checkpoint alone is kept and evaluated (CETT-PPL-1%). notebooks/sparsing_law_findings.ipynb fits
A0 per run, A0 against log parameters, and the tokens each ratio takes to settle.

Cost, measured on a quiet 2-core sandbox on 2026-11-27: 11 min in all, of which 8 min train + eval
(36–104 s per run) and 2.5 min of the sweep's fits.
"""

from sparsejax import sweep

# (d_model, n_layers): width/depth 16 each, heads of 16, gated FFN with d_ff = 2.5·d_model.
SHAPES = ((32, 2), (48, 3), (64, 4), (96, 6))
HEAD_DIM = 16
STEPS = 400
COMMON = (f"train.steps={STEPS}", "train.seq_len=64", "train.schedule=constant", "train.warmup_steps=30",
          "train.checkpoint_every=100", f"train.keep_every={STEPS}", "train.keep_last=1",
          "train.eval_every=100", "train.log_every=10")


def get_sweep() -> sweep.Sweep:
    sizes = [sweep.shape_point(f"w{d}_l{n}", d_model=d, n_layers=n, n_heads=d // HEAD_DIM, head_dim=HEAD_DIM,
                               d_ff=int(2.5 * d)) for d, n in SHAPES]
    runs = sweep.cross(sizes, sweep.activation_points(("relu", "silu")), config="configs/tiny_relu.py",
                       common=COMMON)
    return sweep.Sweep(name="cpu_scale", runs=runs, eval=sweep.EvalOptions(metrics=("cett_ppl",)),
                       plots=("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens"))
