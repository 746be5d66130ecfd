"""CPU proxy sweep: ReLU and SiLU × two small proxy sizes; trains, evaluates and fits in ≈ 20 min on 2 cores.

Sizes: ``tiny`` (d_model 128, 5 layers, 0.94M non-embedding parameters, configs/tiny_relu.py) and
``mini`` (d_model 96, 4 layers, 3 heads of 32, d_ff 240: 0.42M), both with the paper's gated FFN
and d_ff = 2.5·d_model, byte tokens on the embedded corpus (1.1M bytes, so 800 steps of 16×128
tokens = 1.64M tokens see it about 1.5 times).

Cost on a 2-core CPU: 1,200 steps took 14 min on one machine and 31 min on a ~1.5× slower one
(training 78%, eval 21%); 800 steps keep the slow case near 20 min.

Schedule: **constant** LR after a 30-step warm-up, not the paper's WSD. WSD's final decay changes
the activation ratio in the last 10% of steps (the ratio moves with the learning rate, not with
data), which would bend the tail that the law's limit A0 is read from; with a constant LR the curve
reflects data alone. Warm-up steps are excluded from the fits, as the paper drops warm-up
checkpoints (docs/sparsity_metrics_and_laws.md §CETT-PPL).

Checkpoints every 100 steps are all kept (train.keep_every) for eval.py's ratio-vs-tokens curves.
"""

from sparsejax import sweep

STEPS = 800
COMMON = (f"train.steps={STEPS}", "train.schedule=constant", "train.warmup_steps=30",
          "train.checkpoint_every=100", "train.keep_every=100", "train.keep_last=1",
          "train.eval_every=100", "train.log_every=10")


def get_sweep() -> sweep.Sweep:
    sizes = [sweep.proxy_size_point("tiny"),
             sweep.shape_point("mini", d_model=96, n_layers=4, n_heads=3, head_dim=32, d_ff=240,
                               config="configs/tiny_relu.py")]
    runs = sweep.cross(sizes, sweep.activation_points(("relu", "silu")), common=COMMON)
    return sweep.Sweep(name="cpu_proxy", runs=runs,
                       eval=sweep.EvalOptions(metrics=("zero", "fat", "cett_ppl")),
                       plots=("ratio_vs_tokens", "limit_vs_params", "loss_vs_tokens"))
