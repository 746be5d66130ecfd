"""Sparsing Law width/depth sweep at ~0.1B non-embedding parameters, for TPU pods.

Thirteen hidden sizes from 128 to 2048; each model has heads of 128 (one head at d_model 128),
d_ff = 2.5·d_model, and the depth that brings its non-embedding parameter count closest to the
0.1B paper model's (108.6M, ``sweep.depth_for_width``): 2048 hidden / 2 layers up to 128 hidden /
575 layers, as in the paper. All are within 5% of the target except 2048/2 (−11%: 3 layers would
be +33%); the paper uses 2048/2 too. The exact list of the paper's 13 widths is not given here, so
the widths here are multiples of 128 up to 1280, then 1536, 1792, 2048.

The paper's finding to reproduce: the limit activation ratio rises roughly linearly with
width/depth up to ≈114, then flattens; best loss for width/depth in 74–282. ReLU only (as the
paper's width/depth figure); add "silu" to ACTIVATIONS for both. The model unrolls its layers, so
the deepest configs compile slowly.
"""

from sparsejax import config, flops, sweep

WIDTHS = (128, 256, 384, 512, 640, 768, 896, 1024, 1152, 1280, 1536, 1792, 2048)
ACTIVATIONS = ("relu",)
COMMON = ("train.checkpoint_every=4000", "train.keep_every=4000", "train.keep_last=2")


def target_non_embedding() -> int:
    return flops.param_counts(config.paper_config("0.1b").model).non_embedding


def get_sweep() -> sweep.Sweep:
    shapes = sweep.width_depth_points(WIDTHS, target_non_embedding(), size="0.1B")
    runs = sweep.cross(shapes, sweep.activation_points(ACTIVATIONS), config="configs/sparsing_law_0.1b.py",
                       common=COMMON)
    return sweep.Sweep(name="sparsing_law_width_depth", runs=runs,
                       eval=sweep.EvalOptions(metrics=("zero", "fat", "cett_ppl")),
                       plots=("ratio_vs_tokens", "limit_vs_width_depth", "loss_vs_tokens"))
