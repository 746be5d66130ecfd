"""CPU proxy activation comparison (ReLU² Wins; Sparsing Law ReLU vs SiLU): seven FFN variants.

    python -m sparsejax.sweep configs/sweeps/cpu_activations.py --out runs/cpu_activations

One shape, d_model 64 × 4 layers, heads of 16 (0.189M non-embedding parameters for every variant):
plain FFNs ``W_out σ(W_in x)`` with d_ff 240 — ReLU, ReLU², SiLU, GELU — and gated FFNs
``W_out[σ(W_gate x) ⊙ W_in x]`` with d_ff 160 (2.5·d_model; three matrices, so the same parameter
count) — ReGLU (relu), SwiGLU (silu) and dReLU (ReLU on gate and up projection, Turbo Sparse).
Two seeds each (``train.seed``): 14 runs. Run names are ``w64_l4_<variant>_s<seed>``; the tidy
table's activation column is the function (relu for both ReLU and ReGLU), the FFN type is in each
run's config (sweep.json).

Each run: 300 steps of 16×64 tokens (0.31M tokens), constant LR after a 30-step warm-up; the final
checkpoint alone is kept and evaluated (FAT-0.01 and CETT-PPL-1%, the paper's metric, which applies
to every activation alike). notebooks/sparsing_law_findings.ipynb compares the CETT-PPL-1% ratio
and the final loss per variant (mean ± spread over the seeds).

Cost, measured on a quiet 2-core sandbox on 2026-11-27: 15 min in all, of which 13 min train + eval
(42–70 s per run) and 2 min of the sweep's fits.
"""

from sparsejax import sweep

D_MODEL, N_LAYERS, HEAD_DIM = 64, 4, 16
D_FF_GATED = 160  # 2.5·d_model, as the paper's gated FFN
D_FF_PLAIN = 240  # 1.5 × the gated width: a plain FFN (2 matrices) with the gated one's parameters
SEEDS = (0, 1)
STEPS = 300
# label: (ffn_type, activation); gated relu = ReGLU, gated silu = SwiGLU, gated drelu = dReLU
# (ReLU on the gate and the up projection).
VARIANTS = {"relu": ("plain", "relu"), "relu2": ("plain", "relu2"), "silu": ("plain", "silu"),
            "gelu": ("plain", "gelu"), "reglu": ("gated", "relu"), "swiglu": ("gated", "silu"),
            "drelu": ("gated", "drelu")}
COMMON = (f"train.steps={STEPS}", "train.seq_len=64", "train.schedule=constant", "train.warmup_steps=30",
          "train.checkpoint_every=100", f"train.keep_every={STEPS}", "train.keep_last=1",
          "train.eval_every=100", "train.log_every=10")
LAWS = {"relu": "relu_ratio", "relu2": "relu_ratio", "drelu": "relu_ratio", "silu": "silu_ratio",
        "gelu": "silu_ratio"}


def get_sweep() -> sweep.Sweep:
    shape = [sweep.shape_point(f"w{D_MODEL}_l{N_LAYERS}", d_model=D_MODEL, n_layers=N_LAYERS,
                               n_heads=D_MODEL // HEAD_DIM, head_dim=HEAD_DIM, d_ff=D_FF_GATED)]
    variants = [sweep.Point(label, (f"model.ffn_type={ffn}", f"model.activation={act}",
                                    f"model.d_ff={D_FF_PLAIN if ffn == 'plain' else D_FF_GATED}"),
                            activation=act)
                for label, (ffn, act) in VARIANTS.items()]
    seeds = [sweep.Point(f"s{s}", (f"train.seed={s}",)) for s in SEEDS]
    runs = sweep.cross(shape, variants, seeds, config="configs/tiny_relu.py", common=COMMON)
    return sweep.Sweep(name="cpu_activations", runs=runs, eval=sweep.EvalOptions(metrics=("fat", "cett_ppl")),
                       laws=LAWS, plots=("ratio_vs_tokens", "loss_vs_tokens"))
