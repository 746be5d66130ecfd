"""µP as MiniCPM trains it (Hu et al. 2024; Yang et al. 2022, Tensor Programs V): what changes
with width when ``model.mup`` is on, and which parameters each rule applies to.

With width multiplier m = d_model / ``model.dim_model_base``:

* forward (the model, :mod:`sparsejax.model`): token embeddings × ``scale_emb``; each residual
  branch × ``scale_depth``/√n_layers; the final hidden state × 1/m before the output projection;
* initialisation (:func:`init_stds`): every weight matrix N(0, (init_std/√m)²); the token
  embedding N(0, init_std²); norm scales 1;
* learning rate (:func:`lr_multipliers`, applied by :mod:`sparsejax.optim`): AdamW's update of
  every weight matrix × 1/m, so its learning rate (and, AdamW's decay being decoupled and scaled
  by the learning rate, its weight decay) is the base LR / m; the embedding, the untied output
  projection and the norm scales keep the base LR, as the Sparsing Law reference code's two
  parameter groups do.

Together they keep each layer's activations and their per-step updates O(1) as d_model grows,
so one base learning rate serves every width (``benchmarks/mup_coord_check.py`` measures the first,
``benchmarks/lr_pilot.py --mup-bases`` the second; docs/sparsity_metrics_and_laws.md §µP). The
forward scalings are ordinary model fields that imported MiniCPM checkpoints also use; ``model.mup`` adds the training half (initialisation and
learning rates) and requires ``dim_model_base``.

Parameter classes are decided by the leaf's name, so the same rule holds in both layer layouts
(``scan_layers`` stacks a leading [N] axis onto every leaf): ``kernel`` leaves are weight matrices
(attention projections, FFN matrices, the untied output projection ``unembed``), ``embedding`` is
the token embedding, ``scale`` the RMSNorm scales.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from sparsejax.config import ModelConfig

PyTree = Any

MATRIX, EMBEDDING, OUTPUT, VECTOR = "matrix", "embedding", "output", "vector"
UNEMBED = "unembed"  # the untied output projection's module name (sparsejax.model)


def width_multiplier(cfg: ModelConfig) -> float:
    """m = d_model / dim_model_base under µP; 1 otherwise."""
    return cfg.d_model / cfg.dim_model_base if cfg.mup else 1.0


class InitStds(NamedTuple):
    """Initial standard deviations: token embedding, weight matrices reading the residual stream
    (Q, K, V, FFN in/gate, unembed), and the residual-branch output matrices (attention out, FFN
    out)."""

    embedding: float
    matrix: float
    branch_out: float


def init_stds(cfg: ModelConfig) -> InitStds:
    """Standard parameterisation: ``init_std`` everywhere, the branch outputs scaled by
    1/√(2·n_layers) (GPT-2). µP: ``init_std/√m`` for every matrix (MiniCPM scales the residual
    branches in the forward pass instead), ``init_std`` for the embedding."""
    if cfg.mup:
        matrix = cfg.init_std / width_multiplier(cfg) ** 0.5
        return InitStds(cfg.init_std, matrix, matrix)
    return InitStds(cfg.init_std, cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5)


def _names(path) -> list[str]:
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def parameter_class(path) -> str:
    """MATRIX, OUTPUT (the untied unembed), EMBEDDING or VECTOR for a leaf's tree path (boxed or
    unboxed, either layer layout, optimizer-state trees included)."""
    names = _names(path)
    leaf = names[-1] if names else ""
    if leaf == "kernel":
        return OUTPUT if UNEMBED in names else MATRIX
    if leaf == "embedding":
        return EMBEDDING
    return VECTOR


def classes(params: PyTree) -> PyTree:
    """The :func:`parameter_class` of every leaf, as a tree of the same structure."""
    return jax.tree_util.tree_map_with_path(lambda path, _: parameter_class(path), params)


def decayed(params: PyTree) -> PyTree:
    """Weight decay mask: matrices and embeddings decay, norm scales do not (in either layout:
    a scanned norm scale is [N, D], so the rule cannot be the leaf's rank)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: parameter_class(path) != VECTOR, params)


def lr_multipliers(cfg: ModelConfig) -> dict[str, float]:
    """Learning-rate multiplier per parameter class: 1/m for weight matrices under µP, else 1."""
    m = width_multiplier(cfg)
    return {MATRIX: 1.0 / m, OUTPUT: 1.0, EMBEDDING: 1.0, VECTOR: 1.0}
