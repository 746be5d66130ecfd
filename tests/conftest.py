"""Test-wide setup: 8 fake CPU devices so sharding code runs as on a real mesh."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
# One BLAS thread: scipy fits (L-BFGS-B) slow down badly when threads fight over 2 cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
