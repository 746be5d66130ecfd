"""Load and validate a config: the one place where the config schema meets the registries.

:func:`validate` runs the config's own range and cross-field checks
(:func:`sparsejax.config.check`) and each registry's check of the choices it offers, in the
module that defines them: ``data`` (an existing tokenizer's vocabulary), ``activations``
(``model.activation`` and the parameters it takes), ``model`` (RoPE types, remat policies) and
``ffn`` (FFN implementations and what each supports) and ``attention`` (attention
implementations and the shapes their kernels need). Every error is one line naming the field
and its allowed values, raised before anything is compiled or written.

:func:`load`, :func:`apply_overrides` and :func:`from_dict` are what scripts use; they always
return a validated config.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

from sparsejax import activations, attention, data, ffn, model
from sparsejax.config import Config, ConfigError, check, from_raw, read_file, with_overrides

# Each registry's check, run in this order after the tokenizer (whose vocabulary decides
# model.vocab_size) and the config's own checks.
REGISTRY_CHECKS = (activations.check_config, model.check_config, ffn.check_config,
                   attention.check_config)


def validate(cfg: Config) -> Config:
    """Raise ConfigError naming the field and its allowed values; return cfg unchanged."""
    data.check_config(cfg)
    check(cfg)
    for registry_check in REGISTRY_CHECKS:
        registry_check(cfg)
    return cfg


def resolve_vocab_size(cfg: Config) -> Config:
    """``model.vocab_size=0`` with ``data.tokenizer_path``: the tokenizer's vocabulary size."""
    if cfg.model.vocab_size != 0 or not cfg.data.tokenizer_path:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vocab_size=data.tokenizer_vocab_for_config(cfg)))


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of cfg with ``section.field=value`` overrides applied, then validated."""
    return validate(resolve_vocab_size(with_overrides(cfg, overrides)))


def load(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> Config:
    """Load ``get_config()`` from a config file, apply overrides and validate."""
    return apply_overrides(read_file(path), overrides)


def from_dict(raw: dict) -> Config:
    """A validated config from its dict form (a run's ``config.json``, a checkpoint's meta)."""
    return validate(from_raw(raw))


__all__ = ["ConfigError", "REGISTRY_CHECKS", "apply_overrides", "from_dict", "load",
           "resolve_vocab_size", "validate"]
