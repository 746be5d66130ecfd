"""CPU activation comparison (ReLU² Wins; Sparsing Law ReLU vs SiLU) under the finding protocol:
seven FFN variants of one ≈ 24k-parameter shape, each trained to 300 tokens per non-embedding
parameter.

    python -m sparsejax.sweep configs/sweeps/cpu_activations.py --out runs/cpu_activations

One shape, d_model 32 × 2 layers, heads of 8 (the 32×2 shape of cpu_width_depth.py): plain FFNs
``W_out σ(W_in x)`` with d_ff 120 — ReLU, ReLU², SiLU, GELU — and gated FFNs
``W_out[σ(W_gate x) ⊙ W_in x]`` with d_ff 80 (2.5·d_model; three matrices, so the same parameter
count, 23.7k) — ReGLU (relu), SwiGLU (silu) and dReLU (ReLU on gate and up projection, Turbo
Sparse). Two seeds each (``train.seed``): 14 runs. Run names are ``w32_l2_<variant>_s<seed>``; the
tidy table's activation column is the function (relu for both ReLU and ReGLU), the FFN type is in
each run's config (sweep.json).

Every run follows :mod:`sparsejax.sweep.protocol` (7.1M tokens, 869 steps of 64×128, 12
log-spaced checkpoints, CETT-PPL-1% with a joint CETT) at the LR the width/depth pilot chose for
this shape with ReLU (notebooks/results/lr_pilot_width_depth.json), the same for every variant.
notebooks/sparsing_law_findings.ipynb compares the variants at the final checkpoint and at matched
eval loss (the ratio interpolated in log tokens to where each run first reaches the worst
variant's final loss).

Cost, measured on the 2-core sandbox (AMD EPYC) on 2026-12-06: 177–194 s per run while the machine
was otherwise idle (training ≈ 110 s at ≈ 95k tokens/s, eval.py ≈ 55 s), so ≈ 42 minutes for the 14
runs plus the fits; as run for the committed results, with the test suite and a refit sharing the
CPU for the second half, 59 minutes of runs, then `--collect-only --n-boot 50 --publish` (1.6 min).
"""

from sparsejax import sweep
from sparsejax.sweep import protocol

D_MODEL, N_LAYERS, HEAD_DIM = 32, 2, 8
D_FF_GATED = 80  # 2.5·d_model, as the paper's gated FFN
D_FF_PLAIN = 120  # 1.5 × the gated width: a plain FFN (2 matrices) with the gated one's parameters
LEARNING_RATE = 3e-3  # the width/depth pilot's best for 32×2 (ReLU)
SEEDS = (0, 1)
# label: (ffn_type, activation); gated relu = ReGLU, gated silu = SwiGLU, gated drelu = dReLU
# (ReLU on the gate and the up projection).
VARIANTS = {"relu": ("plain", "relu"), "relu2": ("plain", "relu2"), "silu": ("plain", "silu"),
            "gelu": ("plain", "gelu"), "reglu": ("gated", "relu"), "swiglu": ("gated", "silu"),
            "drelu": ("gated", "drelu")}
LAWS = {"relu": "relu_ratio", "relu2": "relu_ratio", "drelu": "relu_ratio", "silu": "silu_ratio",
        "gelu": "silu_ratio"}


def get_sweep() -> sweep.Sweep:
    shape = [protocol.shape_point(D_MODEL, N_LAYERS, head_dim=HEAD_DIM, learning_rate=LEARNING_RATE)]
    variants = [sweep.Point(label, (f"model.ffn_type={ffn}", f"model.activation={act}",
                                    f"model.d_ff={D_FF_PLAIN if ffn == 'plain' else D_FF_GATED}"),
                            activation=act)
                for label, (ffn, act) in VARIANTS.items()]
    seeds = [sweep.Point(f"s{s}", (f"train.seed={s}",)) for s in SEEDS]
    runs = sweep.cross(shape, variants, seeds, config="configs/tiny_relu.py")
    return sweep.Sweep(name="cpu_activations", runs=runs, eval=protocol.EVAL, laws=LAWS,
                       plots=("ratio_vs_tokens", "loss_vs_tokens"))
