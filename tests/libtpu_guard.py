"""The libtpu check shared by the tests that compile for TPU on this CPU."""

import os


def require_libtpu(what: str) -> None:
    """Fail under CI (libtpu is in requirements.txt there) and skip elsewhere when libtpu, which
    lets the TPU compiler run on this CPU, is missing."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("libtpu") is None:
        import jax

        msg = (f"libtpu is not installed; install it with pip install 'jax[tpu]=={jax.__version__}' "
               f"to {what} on CPU")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(msg)
        pytest.skip(msg)
