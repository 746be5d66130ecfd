"""Sparsing Law paper model "0.8b", ReLU; switch with --set model.activation=silu.

Sizes: docs/sparsity_metrics_and_laws.md §Paper models. Defaults chosen to fit a TPU v4:4x4x4
slice (64 chips = 128 TensorCore devices) with headroom, checked by compiling the real train step
for it on CPU (`python benchmarks/tpu_fit.py`, README "Fit on TPU"): all devices on the fsdp
axis, layers scanned, each block rematerialised, and `train.grad_accum` so that a device holds 2
sequences of 4,096 tokens per micro-batch (batch 512 = 2 × 2 × 128).
"""

from sparsejax.config import paper_config


def get_config():
    cfg = paper_config("0.8b", activation="relu")
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
    cfg.model.scan_layers = True
    cfg.model.remat_policy = "full"
    cfg.train.grad_accum = 2
    return cfg
