"""Sparsing Law paper model "0.4b", ReLU; switch with --set model.activation=silu.

Sizes: docs/sparsity_metrics_and_laws.md §Paper models.
"""

from sparsejax.config import paper_config


def get_config():
    return paper_config("0.4b", activation="relu")
