"""Block-sparse FFN kernels (Pallas TPU and GPU) with a pure-JAX tile path; see README.md here."""

from sparsejax.kernels import sharded
from sparsejax.kernels.block_mask import BlockMask
from sparsejax.kernels.ffn import (DENSE_FALLBACK_DENSITY, block_sparse_ffn, dense, jax_tiles,
                                   pick_impl)

__all__ = ["BlockMask", "DENSE_FALLBACK_DENSITY", "block_sparse_ffn", "dense", "jax_tiles",
           "pick_impl", "sharded"]
