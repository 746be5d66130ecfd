"""Typed experiment configuration: one base config, per-experiment files, CLI overrides.

A config file in ``configs/`` is a Python file with ``get_config() -> Config``. Users change any
field from the command line with ``--set section.field=value`` (MaxText style: one base plus
overrides). This package is the schema and its parsing only, importable without JAX:

* :mod:`~sparsejax.config.schema`: the sections and their dict / JSON form;
* :mod:`~sparsejax.config.presets`: the paper's sizes and the CPU proxy sizes;
* :mod:`~sparsejax.config.checks`: ranges and cross-field rules;
* :mod:`~sparsejax.config.overrides`: config files and ``--set`` parsing.

Loading and validating a config — these checks plus every registry's own (activations, FFN
implementations, remat policies, RoPE types, tokenizer files) — is :mod:`sparsejax.configure`
(``configure.load``, ``configure.apply_overrides``, ``configure.from_dict``), so no module here
imports the model.
"""

from sparsejax.config.checks import check, choice, positive, recipe_terms_on
from sparsejax.config.overrides import call_file_function, read_file, with_overrides
from sparsejax.config.presets import (PAPER_SIZES, PAPER_VOCAB_SIZE, PROXY_SIZES, paper_config,
                                      paper_pod_config, proxy_config)
from sparsejax.config.schema import (Config, ConfigError, DataConfig, MeshConfig, ModelConfig,
                                     RecipeConfig, TrainConfig, from_raw, to_dict, to_json_dict)

__all__ = [
    "Config", "ConfigError", "DataConfig", "MeshConfig", "ModelConfig", "PAPER_SIZES",
    "PAPER_VOCAB_SIZE", "PROXY_SIZES", "RecipeConfig", "TrainConfig", "call_file_function",
    "check", "choice", "from_raw", "paper_config", "paper_pod_config", "positive",
    "proxy_config", "read_file", "recipe_terms_on", "to_dict", "to_json_dict", "with_overrides",
]
