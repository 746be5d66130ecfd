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

from sparsejax.config.checks import (SPARSITY_TERMS, check, choice, positive, term_text,
                                     terms_on)
from sparsejax.config.overrides import call_file_function, read_file, with_overrides
from sparsejax.config.presets import (PAPER_LEARNING_RATE, PAPER_MUP, PAPER_SIZES,
                                      PAPER_VOCAB_SIZE, PROXY_SIZES, paper_config,
                                      paper_pod_config, proxy_config)
from sparsejax.config.schema import (MOVED_FIELDS, Config, ConfigError, DataConfig, MeshConfig,
                                     ModelConfig, SparsityConfig, TrainConfig, from_raw, moved_path,
                                     to_dict, to_json_dict, upgrade)

__all__ = [
    "Config", "ConfigError", "DataConfig", "MOVED_FIELDS", "MeshConfig", "ModelConfig",
    "PAPER_LEARNING_RATE", "PAPER_MUP", "PAPER_SIZES", "PAPER_VOCAB_SIZE", "PROXY_SIZES", "SPARSITY_TERMS", "SparsityConfig",
    "TrainConfig", "call_file_function", "check", "choice", "from_raw", "moved_path",
    "paper_config", "paper_pod_config", "positive", "proxy_config", "read_file", "term_text",
    "terms_on",
    "to_dict", "to_json_dict", "upgrade", "with_overrides",
]

