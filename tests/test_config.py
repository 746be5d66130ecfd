import dataclasses
import glob
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from sparsejax import config, model
from sparsejax import configure

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(glob.glob(str(REPO / "configs" / "*.py")))


def test_config_files_exist_for_every_size():
    names = {pathlib.Path(f).stem for f in CONFIG_FILES}
    for size in config.PAPER_SIZES:
        assert f"sparsing_law_{size}" in names
    for size in config.PROXY_SIZES:
        for act in ("relu", "silu"):
            assert f"{size}_{act}" in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: pathlib.Path(p).stem)
def test_every_config_builds_and_validates(path):
    cfg = configure.load(path)
    assert configure.validate(cfg) is cfg
    # Build the model abstractly (no memory for the 2.4B one) and check parameter shapes.
    m = model.Model(cfg.model)
    shapes = jax.eval_shape(lambda k: m.init(k, 8), jax.random.key(0))
    layer = "layers" if cfg.model.scan_layers else "layer_0"  # scanned: stacked [n_layers, ...]
    kernel = shapes[layer]["ffn"]["w_out"]["kernel"]
    assert kernel.shape[-2:] == (cfg.model.d_ff, cfg.model.d_model)


def test_paper_table_values():
    cfg = config.paper_config("0.4b")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.d_ff, cfg.model.n_heads) == (1280, 24, 3200, 10)
    for size, (d, _, f, h) in config.PAPER_SIZES.items():
        assert f == int(2.5 * d) and d == 128 * h, size
    assert cfg.model.vocab_size == 122_753 and cfg.train.seq_len == 4096


def test_overrides_parse_types_and_copy():
    base = config.proxy_config("tiny")
    cfg = configure.apply_overrides(base, [
        "model.activation=silu", "model.topk=0.25", "train.steps=7", "model.topk_ste=true",
        "train.learning_rate=1e-3", "name=x"])
    assert (cfg.model.activation, cfg.model.topk, cfg.train.steps, cfg.model.topk_ste) == ("silu", 0.25, 7, True)
    assert cfg.train.learning_rate == 1e-3 and cfg.name == "x"
    assert base.model.activation == "relu" and base.train.steps == 300  # original untouched


@pytest.mark.parametrize("override, field", [
    ("model.activation=reluu", "model.activation"),
    ("model.ffn_type=moe", "model.ffn_type"),
    ("model.n_layers=0", "model.n_layers"),
    ("model.head_dim=31", "model.head_dim"),
    ("model.topk=321", "model.topk"),
    ("model.topk=2.5", "model.topk"),
    ("model.topk=-1", "model.topk"),
    ("model.topk_mode=fast", "model.topk_mode"),
    ("model.activation_threshold=0.1", "model.activation_threshold"),
    ("model.dtype=float16", "model.dtype"),
    ("model.vocab_size=0", "model.vocab_size"),
    ("model.vocab_size=100", "model.vocab_size"),
    ("train.schedule=linear", "train.schedule"),
    ("train.seq_len=4096", "train.seq_len"),
    ("train.grad_accum=3", "train.grad_accum"),
    ("train.b2=1.0", "train.b2"),
    ("data.source=hub", "data.source"),
    ("data.tokenizer=bpe", "data.tokenizer"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.checkpoint_steps=0", "train.checkpoint_steps"),
    ("train.checkpoint_steps=5,100000", "train.checkpoint_steps"),
    ("train.checkpoint_steps=5,x", "train.checkpoint_steps"),
    ("model.topk_ste=maybe", "model.topk_ste"),
    ("model.nonexistent=1", "model.nonexistent"),
    ("bogus.field=1", "bogus.field"),
])
def test_invalid_configs_name_the_field(override, field):
    with pytest.raises(config.ConfigError) as err:
        configure.apply_overrides(config.proxy_config("tiny"), [override])
    assert field in str(err.value)


def test_allowed_values_are_listed():
    with pytest.raises(config.ConfigError, match="allowed values: .*'silu'"):
        configure.apply_overrides(config.proxy_config("tiny"), ["model.activation=nope"])


def test_threshold_allowed_for_fatrelu_and_d_model_heads_free():
    cfg = configure.apply_overrides(config.proxy_config("tiny"),
                                 ["model.activation=fatrelu", "model.activation_threshold=0.01"])
    assert cfg.model.activation_threshold == 0.01


def test_load_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        configure.load(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(config.ConfigError, match="get_config"):
        configure.load(bad)
    with pytest.raises(config.ConfigError, match="override"):
        configure.apply_overrides(config.proxy_config("tiny"), ["model.activation"])
    with pytest.raises(config.ConfigError, match="paper size"):
        config.paper_config("3b")


def test_dict_round_trip_through_json():
    cfg = configure.apply_overrides(config.paper_config("0.1b"), ["model.activation=silu"])
    again = configure.from_dict(json.loads(json.dumps(config.to_dict(cfg))))
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_grouped_query_and_minicpm_fields_validated():
    for field, value, match in (("n_kv_heads", 3, "model.n_kv_heads=3 must divide model.n_heads=4"),
                                ("n_kv_heads", -1, "model.n_kv_heads=-1 must be >= 0"),
                                ("scale_emb", 0.0, "model.scale_emb=0.0 must be > 0"),
                                ("scale_depth", -1.0, "model.scale_depth=-1.0 must be >= 0"),
                                ("dim_model_base", -8, "model.dim_model_base=-8 must be >= 0"),
                                ("rope_type", "yarn", "model.rope_type='yarn' is not allowed"),
                                ("rope_factor", 0, "model.rope_factor=0.0 must be > 0")):
        with pytest.raises(config.ConfigError, match=re.escape(match)):
            configure.apply_overrides(config.Config(), [f"model.{field}={value}"])
    with pytest.raises(config.ConfigError, match="model.rope_high_freq_factor=1.0 must exceed"):
        configure.apply_overrides(config.Config(), ["model.rope_type=llama3",
                                                 "model.rope_high_freq_factor=1"])
    cfg = configure.apply_overrides(config.Config(), ["model.n_kv_heads=2"])
    assert cfg.model.kv_heads == 2 and config.ModelConfig().kv_heads == 4


def test_moved_loaders_still_answer_under_their_old_names_with_a_warning():
    """config.load & co. moved to configure (the config package imports no model); scripts
    written against the old names keep working and are told where they went."""
    with pytest.warns(DeprecationWarning, match="moved to sparsejax.configure.apply_overrides"):
        old = config.apply_overrides
    assert old is configure.apply_overrides
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        config.nope  # noqa: B018
