"""sparsejax: train sparse-activation transformers in JAX and measure their activation sparsity."""

__version__ = "0.1.0"
