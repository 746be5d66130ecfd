"""Sparsing Law paper model "0.8b", ReLU (--set model.activation=silu for SiLU), set up for a
TPU v4:4x4x4 slice (sizes: docs/sparsity_metrics_and_laws.md §Paper models; the pod defaults:
sparsejax.config.paper_pod_config). 4 sequences per TensorCore in one micro-batch: fits with
the vocabulary-tiled loss (9.35 GiB temp of 16 GiB; README "Fit on TPU"), where the full logits
needed 2 sequences × 2 accumulation steps."""

from sparsejax.config import paper_pod_config


def get_config():
    return paper_pod_config("0.8b", grad_accum=1, loss_tile_len=128)
