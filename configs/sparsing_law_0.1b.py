"""Sparsing Law paper model "0.1b" (SPEC §4), ReLU; switch with --set model.activation=silu."""

from sparsejax.config import paper_config


def get_config():
    return paper_config("0.1b", activation="relu")
