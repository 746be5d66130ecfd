import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sparsejax import activations


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf)
_POLY = (0.0, 1 / 3, 1 / 3, 1 / 3)


def _np_polynorm(x):
    out = np.full_like(x, _POLY[0])
    for i, a in enumerate(_POLY[1:], start=1):
        p = x**i
        out = out + a * p / np.sqrt(np.mean(p**2, axis=-1, keepdims=True) + 1e-6)
    return out


# Independent numpy formulas, written from the papers, not from the library.
NUMPY_REFERENCE = {
    "relu": lambda x: np.maximum(x, 0),
    "silu": lambda x: x * _np_sigmoid(x),
    "swish": lambda x: x * _np_sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "relu2": lambda x: np.maximum(x, 0) ** 2,
    "fatrelu": lambda x, t=0.3: np.where(x >= t, x, 0.0),
    "shifted_relu": lambda x, t=0.3: np.maximum(x - t, 0),
    "drelu": lambda x: np.maximum(x, 0),
    "xsilu": lambda x, a=0.5: x * ((1 + 2 * a) * _np_sigmoid(x) - a),
    "golu": lambda x: x * np.exp(-np.exp(-x)),
    "polyrelu": lambda x: sum(a * np.maximum(x, 0) ** i for i, a in enumerate(_POLY)),
    "polynorm": _np_polynorm,
    "identity": lambda x: x,
}
PARAMS = {"fatrelu": {"threshold": 0.3}, "shifted_relu": {"threshold": 0.3}, "xsilu": {"alpha": 0.5}}


def test_registry_covers_reference_table():
    assert set(activations.names()) == set(NUMPY_REFERENCE)


@pytest.mark.parametrize("name", sorted(NUMPY_REFERENCE))
def test_values_match_numpy(name):
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32) * 2
    fn = activations.make(name, **PARAMS.get(name, {}))
    got = np.asarray(fn(jnp.asarray(x)))
    want = NUMPY_REFERENCE[name](x.astype(np.float64))
    assert got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(NUMPY_REFERENCE))
def test_gradients_match_finite_differences(name):
    # Points away from the kinks at 0 and at the 0.3 threshold, where FD is well defined.
    x = jnp.array([[-1.7, -0.6, 0.45, 0.9, 1.6, 2.3]], dtype=jnp.float32)
    fn = activations.make(name, **PARAMS.get(name, {}))
    check_grads(fn, (x,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-3)


def test_relu_gradient_values():
    x = jnp.array([-1.0, 0.5, 2.0])
    np.testing.assert_allclose(jax.grad(lambda v: activations.relu2(v).sum())(x), [0.0, 1.0, 4.0])
    np.testing.assert_allclose(
        jax.grad(lambda v: activations.fatrelu(v, 0.7).sum())(x), [0.0, 0.0, 1.0])


def test_exact_zero_property_matches_behaviour():
    x = jnp.linspace(-3, 3, 101)
    for name in activations.names():
        spec = activations.get(name)
        out = activations.make(name, threshold=0.3, alpha=0.5)(x[None])
        has_zero_region = int(jnp.sum(out == 0)) > 10
        assert has_zero_region == spec.exact_zeros, name


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names.*relu"):
        activations.get("reluu")


def test_non_finite_parameter_rejected():
    with pytest.raises(ValueError, match="finite"):
        activations.make("fatrelu", threshold=float("nan"))


def test_parameters_bound_only_when_declared():
    # silu ignores threshold; fatrelu uses it.
    x = jnp.array([0.1, 0.5])
    np.testing.assert_allclose(activations.make("silu", threshold=0.3)(x), activations.silu(x))
    np.testing.assert_allclose(activations.make("fatrelu", threshold=0.3)(x), [0.0, 0.5])
