"""One registry of FFN activation functions and the properties the sparsity metrics need.

Each entry says whether the function outputs exact zeros (ReLU family: the *zero* criterion of
docs/sparsity_metrics_and_laws.md §Criteria applies), which scalar parameters it takes, and whether
a gated FFN applies it to the up projection too (dReLU). Gated variants (ReGLU, SwiGLU, GeGLU,
ReLU²-GLU) are configs: ``ffn_type="gated"`` with ``activation`` relu / silu / gelu / relu2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from sparsejax.config import Config, ConfigError, choice, term_text, terms_on

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    name: str
    fn: Callable[..., Array]  # fn(x, **params) -> array of x's shape
    exact_zeros: bool  # outputs exact zeros for a set of inputs of positive measure (ReLU family)
    params: tuple[str, ...] = ()  # scalar parameters taken from the model config
    gate_and_up: bool = False  # gated FFN applies it to the up projection as well (dReLU)
    reference: str = ""


def relu(x: Array) -> Array:
    """ReLU(x) = max(x, 0). Nair & Hinton 2010; the Sparsing Law paper's sparse baseline."""
    return jax.nn.relu(x)


def silu(x: Array) -> Array:
    """SiLU / Swish(x) = x·sigmoid(x). Hendrycks & Gimpel 2016; Ramachandran et al. 2017."""
    return jax.nn.silu(x)


def gelu(x: Array) -> Array:
    """GELU(x) = x·Φ(x) with the exact Gaussian CDF (erf form). Hendrycks & Gimpel 2016."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation: ½x(1 + tanh(√(2/π)(x + 0.044715x³))). Hendrycks & Gimpel 2016."""
    return jax.nn.gelu(x, approximate=True)


def relu2(x: Array) -> Array:
    """Squared ReLU: max(x, 0)². So et al. 2021 (Primer); Zhang et al. 2024 ("ReLU² Wins")."""
    return jnp.square(jax.nn.relu(x))


def fatrelu(x: Array, threshold: float) -> Array:
    """FATReLU: x if x ≥ t else 0. Kurtz et al. 2020; ProSparse (Song et al. 2024) uses t = 0.01."""
    return jnp.where(x >= threshold, x, jnp.zeros_like(x))


def shifted_relu(x: Array, threshold: float) -> Array:
    """Shifted ReLU: max(x − t, 0). Mirzadeh et al. 2023 ("ReLU Strikes Back", shifted ReLU)."""
    return jax.nn.relu(x - threshold)


def drelu(x: Array) -> Array:
    """dReLU: ReLU on both gate and up projections, ReLU(W_gate x) ⊙ ReLU(W_in x).

    Song et al. 2024 ("Turbo Sparse"). The element-wise function is ReLU; the registry's
    ``gate_and_up`` flag makes a gated FFN apply it to the up projection too. In a plain FFN it is
    ReLU.
    """
    return jax.nn.relu(x)


def xsilu(x: Array, alpha: float) -> Array:
    """Expanded-gating SiLU: x·((1 + 2α)·sigmoid(x) − α). Huang 2024 (arXiv 2405.20768).

    The gate's range widens from (0, 1) to (−α, 1 + α). Departure: the paper learns α per layer;
    here α is a fixed config value (``model.activation_alpha``); α = 0 recovers SiLU.
    """
    return x * ((1.0 + 2.0 * alpha) * jax.nn.sigmoid(x) - alpha)


def golu(x: Array) -> Array:
    """GoLU(x) = x·exp(−exp(−x)), the Gompertz-gated linear unit. Das et al. 2025 (arXiv 2502.03654)."""
    return x * jnp.exp(-jnp.exp(-x))


# PolyCom (Zhuo et al. 2024, arXiv 2411.03884) uses order r = 3 with a_0 = 0 and a_i = 1/r at
# initialisation. Departure: the coefficients are fixed at that initialisation, not learned.
_POLY_COEFFS = (0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0)


def polyrelu(x: Array) -> Array:
    """PolyReLU(x) = Σ_{i=0}^{3} a_i ReLU(x)^i (PolyCom, Zhuo et al. 2024)."""
    r = jax.nn.relu(x)
    return sum(a * r**i for i, a in enumerate(_POLY_COEFFS))


def polynorm(x: Array) -> Array:
    """PolyNorm(x) = Σ_{i=0}^{3} a_i x^i / RMS(x^i) over the feature axis (PolyCom, Zhuo et al. 2024).

    The norm is the RMS over the last axis (as an RMSNorm without scale), with ε = 1e-6.
    """
    out = jnp.full_like(x, _POLY_COEFFS[0])
    for i, a in enumerate(_POLY_COEFFS[1:], start=1):
        p = x**i
        out = out + a * p * jax.lax.rsqrt(jnp.mean(jnp.square(p), axis=-1, keepdims=True) + 1e-6)
    return out


def identity(x: Array) -> Array:
    """Identity: a linear FFN (bilinear when gated). Useful as a no-activation control."""
    return x


_REGISTRY: dict[str, ActivationSpec] = {
    spec.name: spec
    for spec in (
        ActivationSpec("relu", relu, exact_zeros=True, reference="Nair & Hinton 2010"),
        ActivationSpec("silu", silu, exact_zeros=False, reference="Ramachandran et al. 2017"),
        ActivationSpec("swish", silu, exact_zeros=False, reference="alias of silu"),
        ActivationSpec("gelu", gelu, exact_zeros=False, reference="Hendrycks & Gimpel 2016"),
        ActivationSpec("gelu_tanh", gelu_tanh, exact_zeros=False, reference="Hendrycks & Gimpel 2016"),
        ActivationSpec("relu2", relu2, exact_zeros=True, reference="So et al. 2021; Zhang et al. 2024"),
        ActivationSpec("fatrelu", fatrelu, exact_zeros=True, params=("threshold",),
                       reference="Kurtz et al. 2020; Song et al. 2024 (ProSparse)"),
        ActivationSpec("shifted_relu", shifted_relu, exact_zeros=True, params=("threshold",),
                       reference="Mirzadeh et al. 2023"),
        ActivationSpec("drelu", drelu, exact_zeros=True, gate_and_up=True,
                       reference="Song et al. 2024 (Turbo Sparse)"),
        ActivationSpec("xsilu", xsilu, exact_zeros=False, params=("alpha",),
                       reference="Huang 2024, arXiv 2405.20768"),
        ActivationSpec("golu", golu, exact_zeros=False, reference="Das et al. 2025, arXiv 2502.03654"),
        ActivationSpec("polyrelu", polyrelu, exact_zeros=True,  # a_0 = 0: zero for x ≤ 0
                       reference="Zhuo et al. 2024, arXiv 2411.03884"),
        ActivationSpec("polynorm", polynorm, exact_zeros=False,
                       reference="Zhuo et al. 2024, arXiv 2411.03884"),
        ActivationSpec("identity", identity, exact_zeros=False),
    )
}


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> ActivationSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid names: {list(names())}") from None


def make(name: str, *, threshold: float = 0.0, alpha: float = 0.0) -> Callable[[Array], Array]:
    """Return x -> σ(x) with the spec's declared parameters bound from the given values.

    A parameter may be a traced scalar (a scheduled threshold of the sparsity plan, changing every step
    without recompiling); only Python numbers are checked here."""
    spec = get(name)
    given = {"threshold": threshold, "alpha": alpha}
    if not all(math.isfinite(v) for v in given.values() if isinstance(v, (int, float))):
        raise ValueError(f"activation parameters must be finite, got {given}")
    return functools.partial(spec.fn, **{p: given[p] for p in spec.params})


def _users(param: str) -> list[str]:
    return [n for n in names() if param in get(n).params]


def check_config(cfg: Config) -> None:
    """``model.activation`` is registered, and the activation parameters set (``model.activation_alpha``,
    ``sparsity.activation_threshold``) are ones it declares; ConfigError naming the field."""
    m = cfg.model
    choice("model.activation", m.activation, names())
    spec = get(m.activation)
    if m.activation_alpha != 0.0 and "alpha" not in spec.params:
        raise ConfigError(
            f"model.activation_alpha={m.activation_alpha} is only used by {_users('alpha')}, "
            f"not by model.activation={m.activation!r}; set it to 0")
    if "activation_threshold" in terms_on(cfg) and "threshold" not in spec.params:
        raise ConfigError(f"{term_text('activation_threshold', cfg.sparsity.activation_threshold)} "
                          f"is only used by model.activation in {_users('threshold')}, not "
                          f"{m.activation!r} (FATReLU with threshold 0 is ReLU); set it to 0")
