"""Sparsing Law paper model "2.4b", ReLU (--set model.activation=silu for SiLU), set up for a
TPU v6e:16x16 slice (sizes: docs/sparsity_metrics_and_laws.md §Paper models; the pod defaults:
sparsejax.config.paper_pod_config)."""

from sparsejax.config import paper_pod_config


def get_config():
    return paper_pod_config("2.4b", grad_accum=1)
