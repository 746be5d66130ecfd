"""Block-sparse FFN kernels (Pallas TPU and GPU) with a pure-JAX reference; see README.md here."""

from sparsejax.kernels import sharded
from sparsejax.kernels.block_mask import BlockMask
from sparsejax.kernels.ffn import (DENSE_FALLBACK_DENSITY, block_sparse_ffn, dense, ffn_impl,
                                   pick_impl, reference)

__all__ = ["BlockMask", "DENSE_FALLBACK_DENSITY", "block_sparse_ffn", "dense", "ffn_impl",
           "pick_impl", "reference", "sharded"]
