"""The :class:`Law` record, the registry :data:`LAWS` and the input validation shared by every law.

A law module (:mod:`.ratio`, :mod:`.loss`) defines each law as one block — function, Jacobian,
initial guesses — ending in ``register(Law(...))``; adding a law is adding one such block.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

# Domain tags checked by the input validation: "positive" (> 0, powers and logs need it),
# "fraction" ([0, 1) — a sparsity S with 1/(1 − S)), "ratio" ([0, 1]), "real" (finite).
_DOMAIN_TEXT = {"positive": "> 0", "fraction": "in [0, 1)", "ratio": "in [0, 1]", "real": "finite"}


@dataclasses.dataclass(frozen=True)
class Law:
    """A named scaling law: formula, parameters, vectorised function and how to fit it."""

    name: str
    formula: str
    param_names: tuple[str, ...]
    func: Callable[..., np.ndarray]  # func(x, *params) -> predictions, shape (n,)
    jacobian: Callable[..., np.ndarray]  # jacobian(x, *params) -> shape (n, n_params)
    initial_guesses: Callable[[np.ndarray, np.ndarray], list[np.ndarray]]  # (x, y) -> p0 list
    lower: tuple[float, ...]  # bounds: LM solutions outside them are rejected
    upper: tuple[float, ...]
    x_names: tuple[str, ...]  # one name per x column, e.g. ("N", "D")
    x_domains: tuple[str, ...]  # one domain tag per x column
    y_name: str
    y_domain: str
    method: str  # "lm": Levenberg–Marquardt least squares; "huber_lbfgs": L-BFGS-B on log-space Huber
    citation: str
    # "huber_lbfgs" only: parameters optimised as logs, which keeps them positive and puts
    # parameters of very different magnitude on one scale for L-BFGS.
    log_space_params: tuple[str, ...] = ()

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def __call__(self, x, *params) -> np.ndarray:
        return self.func(as_x(self, x, allow_scalar=True), *params)

    def within_bounds(self, params: np.ndarray) -> bool:
        return bool(
            np.all(np.isfinite(params)) and np.all(params >= self.lower) and np.all(params <= self.upper)
        )



LAWS: dict[str, Law] = {}


def register(law: Law) -> Law:
    """Add ``law`` to :data:`LAWS` under its name (once)."""
    if law.name in LAWS:
        raise ValueError(f"law {law.name!r} is already registered")
    LAWS[law.name] = law
    return law


def get_law(law: str | Law) -> Law:
    """The :class:`Law` for a registry name (or the law itself); ValueError lists valid names."""
    if isinstance(law, Law):
        return law
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; valid names: {sorted(LAWS)}")
    return LAWS[law]


def linear_lstsq(columns: Sequence[np.ndarray], y: np.ndarray) -> np.ndarray | None:
    """Least-squares coefficients of ``y`` on ``columns``; None if anything is not finite.

    The initial-guess strategies use it: for a grid of a law's nonlinear parameters, the
    parameters that enter linearly are solved exactly (variable projection).
    """
    design = np.stack(columns, axis=1)
    if not np.all(np.isfinite(design)):
        return None
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef if np.all(np.isfinite(coef)) else None


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def as_x(law: Law, x, *, allow_scalar: bool = False) -> np.ndarray:
    """x as float array: (n,) for one-variable laws (or () if allowed), (n, 2) for two-variable ones."""
    n_cols = len(law.x_names)
    if n_cols == 1:
        x = np.asarray(x, dtype=float)
        if x.ndim != 1 and not (allow_scalar and x.ndim == 0):
            raise ValueError(f"{law.name}: x ({law.x_names[0]}) must be 1-D; got shape {x.shape}")
        return x
    if isinstance(x, (tuple, list)) and len(x) == n_cols:
        columns = [np.asarray(col, dtype=float) for col in x]
        if any(col.ndim != 1 for col in columns) or len({len(col) for col in columns}) != 1:
            raise ValueError(
                f"{law.name}: x columns {law.x_names} must be 1-D of equal length; "
                f"got shapes {[col.shape for col in columns]}"
            )
        return np.stack(columns, axis=1)
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[1] != n_cols:
        raise ValueError(
            f"{law.name}: x must have shape (n, {n_cols}) with columns {law.x_names} "
            f"(or be a tuple of {n_cols} arrays); got shape {x.shape}"
        )
    return x


def _check_domain(values: np.ndarray, domain: str, what: str, law: Law) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{law.name}: {what} contains NaN or Inf")
    bad = {
        "positive": values <= 0,
        "fraction": (values < 0) | (values >= 1),
        "ratio": (values < 0) | (values > 1),
        "real": np.zeros(values.shape, bool),
    }[domain]
    if np.any(bad):
        raise ValueError(
            f"{law.name}: {what} must be {_DOMAIN_TEXT[domain]}; "
            f"got {int(bad.sum())} value(s) outside, e.g. {values[bad][0]:g}"
        )


def validated_x(law: Law, x, *, allow_scalar: bool = False) -> np.ndarray:
    x = as_x(law, x, allow_scalar=allow_scalar)
    columns = x.reshape(-1, len(law.x_names))
    for col, name, domain in zip(columns.T, law.x_names, law.x_domains):
        _check_domain(col, domain, f"x column {name!r}", law)
    return x


def validated_data(law: Law, x, y) -> tuple[np.ndarray, np.ndarray]:
    x = validated_x(law, x)
    y = np.asarray(y, dtype=float)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(
            f"{law.name}: y must be 1-D with one value per x point ({len(x)}); got shape {y.shape}"
        )
    _check_domain(y, law.y_domain, f"y ({law.y_name})", law)
    if len(y) < law.n_params + 1:
        raise ValueError(
            f"{law.name}: needs at least {law.n_params + 1} points for {law.n_params} parameters; "
            f"got {len(y)}"
        )
    return x, y

