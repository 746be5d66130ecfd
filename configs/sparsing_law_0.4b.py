"""Sparsing Law paper model "0.4b", ReLU; switch with --set model.activation=silu.

Sizes: docs/sparsity_metrics_and_laws.md §Paper models. Defaults chosen to fit a TPU v5e:16x16 slice
(256 chips) with headroom, checked by compiling the real train step for it on CPU
(`python benchmarks/tpu_fit.py`, README "Fit on TPU"): all chips on the fsdp axis, layers
scanned, each block rematerialised, and `train.grad_accum` so that a chip holds 2 sequences
of 4,096 tokens per micro-batch (batch 512 = 1 × 2 × 256).
"""

from sparsejax.config import paper_config


def get_config():
    cfg = paper_config("0.4b", activation="relu")
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    cfg.model.scan_layers = True
    cfg.model.remat_policy = "full"
    cfg.train.grad_accum = 1
    return cfg
