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
from sparsejax.schedules import Schedule

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
        "model.activation=silu", "sparsity.topk=0.25", "train.steps=7", "sparsity.topk_ste=true",
        "train.learning_rate=1e-3", "name=x"])
    assert (cfg.model.activation, cfg.sparsity.topk, cfg.train.steps, cfg.sparsity.topk_ste) == (
        "silu", Schedule("constant", (0.25,)), 7, True)
    assert cfg.train.learning_rate == 1e-3 and cfg.name == "x"
    assert base.model.activation == "relu" and base.train.steps == 300  # original untouched


@pytest.mark.parametrize("override, field", [
    ("model.activation=reluu", "model.activation"),
    ("model.ffn_type=moe", "model.ffn_type"),
    ("model.n_layers=0", "model.n_layers"),
    ("model.head_dim=31", "model.head_dim"),
    ("sparsity.topk=321", "sparsity.topk"),
    ("sparsity.topk=2.5", "sparsity.topk"),
    ("sparsity.topk=-1", "sparsity.topk"),
    ("sparsity.topk_mode=fast", "sparsity.topk_mode"),
    ("sparsity.activation_threshold=0.1", "sparsity.activation_threshold"),
    ("sparsity.topk=abc", "sparsity.topk"),
    ("sparsity.fat_eps=-0.1", "sparsity.fat_eps"),
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
    ("sparsity.topk_ste=maybe", "sparsity.topk_ste"),
    # A field's path from before the sparsity section still sets it; errors name where it is now.
    ("model.topk=321", "sparsity.topk"),
    ("recipe.l1.kind=cubic", "sparsity.l1.kind"),
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
                                    ["model.activation=fatrelu", "sparsity.activation_threshold=0.01"])
    assert cfg.sparsity.activation_threshold == Schedule("constant", (0.01,))


def test_paths_from_before_the_sparsity_section_set_the_same_fields():
    base = config.proxy_config("tiny")
    old = configure.apply_overrides(base, [
        "model.activation=fatrelu", "model.activation_threshold=0.01", "model.topk=0.25",
        "model.topk_ste=true", "train.fat_eps=0.05", "recipe.l1.kind=linear",
        "recipe.l1.values=0,1e-3", "recipe.l1.boundaries=0,10", "recipe.chunk_len=4"])
    new = configure.apply_overrides(base, [
        "model.activation=fatrelu", "sparsity.activation_threshold=0.01", "sparsity.topk=0.25",
        "sparsity.topk_ste=true", "sparsity.fat_eps=0.05", "sparsity.l1.kind=linear",
        "sparsity.l1.values=0,1e-3", "sparsity.l1.boundaries=0,10", "sparsity.chunk_len=4"])
    assert old == new
    assert set(config.MOVED_FIELDS.values()) <= {f"sparsity.{f.name}" for f in
                                                 dataclasses.fields(config.SparsityConfig)}


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


def test_the_config_package_does_not_load_configs():
    """Loading and validating is sparsejax.configure's (the config package imports no model)."""
    for name in ("load", "apply_overrides", "from_dict", "validate", "resolve_vocab_size"):
        assert not hasattr(config, name) and callable(getattr(configure, name))


# ------------------------------------------------------- configs saved before the sparsity section
SAVED = pathlib.Path(__file__).parent / "fixtures" / "config_before_sparsity_section.json"


def _saved_equivalent():
    """Today's spelling of the config in SAVED (the layout before the sparsity section:
    model.topk, model.activation_threshold, train.fat_eps and a recipe section; CHANGELOG.md)."""
    return configure.apply_overrides(config.proxy_config("tiny"), [
        "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
        "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=2",
        "model.activation=fatrelu", "sparsity.activation_threshold=0.01", "sparsity.topk=0.5",
        "sparsity.topk_ste=true", "sparsity.fat_eps=0.05", "sparsity.l1.kind=linear",
        "sparsity.l1.values=0,1e-3", "sparsity.l1.boundaries=0,4", "sparsity.chunk_len=4",
        "train.steps=2", "train.checkpoint_every=2", "train.eval_every=1000",
        "train.log_every=1", "train.eval_batches=1", "name=saved_2026_12_06"])


def test_a_config_saved_before_the_sparsity_section_reads_as_today():
    old = json.loads(SAVED.read_text())
    assert "recipe" in old and old["model"]["topk"] == 0.5  # the fixture is the old layout
    want = _saved_equivalent()
    assert configure.from_dict(old) == want
    assert config.upgrade(config.to_json_dict(want)) == config.to_json_dict(want)  # idempotent
    from sparsejax import trainer

    assert trainer.config_differences(old, config.to_dict(want)) == []
    other = configure.apply_overrides(want, ["sparsity.topk=0.25"])
    assert trainer.config_differences(old, config.to_dict(other)) == ["sparsity.topk.values"]


@pytest.mark.slow
def test_a_run_written_before_the_sparsity_section_resumes_and_evaluates(tmp_path):
    """A run whose config.json and checkpoint meta hold the layout before the sparsity section
    resumes under today's spelling of its config, and evaluates."""
    from sparsejax import evaluation, trainer

    cfg = _saved_equivalent()
    trainer.train(cfg, tmp_path, progress=False)
    old_text = SAVED.read_text()
    (tmp_path / "config.json").write_text(old_text)
    metas = [p for p in (tmp_path / "checkpoints" / "2").rglob("*")
             if p.is_file() and p.parent.name == "meta" and '"config"' in p.read_text(errors="ignore")]
    assert len(metas) == 1, sorted(map(str, (tmp_path / "checkpoints" / "2").rglob("*")))
    meta = json.loads(metas[0].read_text())
    meta["config"] = json.loads(old_text)
    metas[0].write_text(json.dumps(meta))
    from sparsejax import checkpointing, rundir

    raw, _ = checkpointing.read_run_config(rundir.RunDir(tmp_path))
    assert "recipe" in raw  # the checkpoint now holds the old layout
    summary = trainer.train(configure.apply_overrides(cfg, ["train.steps=4"]), tmp_path,
                            progress=False)
    assert summary.resumed_from == 2 and summary.final_step == 4
    results = evaluation.evaluate_run(tmp_path, evaluation.EvalOptions(metrics=("zero",)),
                                      checkpoints="2", progress=False)
    assert results["checkpoints"][0]["step"] == 2
    # top-k 0.5 of d_ff 160 is trained into the model: at most 80 of 160 neurons are active
    assert 0 < results["checkpoints"][0]["results"]["zero"]["ratio"] <= 0.5


@pytest.mark.parametrize("overrides, field", [
    (["model.topk=0.25", "sparsity.topk=0.5"], "sparsity.topk"),
    (["sparsity.topk=0.5", "model.topk=0.25"], "sparsity.topk"),
    (["recipe.l1.kind=constant", "sparsity.l1.values=1e-4"], "sparsity.l1"),
    (["model.topk=0.5", "recipe.topk.values=0.25"], "sparsity.topk"),
])
def test_an_old_and_a_new_name_for_one_field_in_one_command_are_refused(overrides, field):
    with pytest.raises(config.ConfigError) as err:
        configure.load("configs/tiny_relu.py", overrides)
    assert f"set the same field, {field}, by two names" in str(err.value)
    assert all(o.split("=")[0] in str(err.value) for o in overrides)


def test_one_name_twice_or_different_moved_fields_are_fine():
    last = configure.load("configs/tiny_relu.py", ["model.topk=0.5", "model.topk=0.25"])
    assert last.sparsity.topk.values == (0.25,)
    both = configure.load("configs/tiny_relu.py", ["recipe.l1.values=1e-4", "sparsity.chunk_len=8"])
    assert both.sparsity.l1.values == (1e-4,) and both.sparsity.chunk_len == 8
