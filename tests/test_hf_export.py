"""sparsejax.hf_export: a run exported as a Hugging Face checkpoint reads back through
sparsejax.hf_import as the same model (logits of the run's own forward pass), the committed
exports of tests/fixtures/hf_export/ give the logits transformers computed from them (made once
by tests/fixtures/make_hf_export_fixtures.py; no torch here), the byte tokenizer's tokenizer.json
encodes as sparsejax's byte tokenizer, and what the target formats cannot compute is refused in
one line, exit 2, with nothing written."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import (checkpointing, config, configure, data, hf_export, hf_import,
                       model as model_lib, rundir, trained_run, trainer)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf_export"
# Tiny models; init_std 0.2 so logits are far from uniform (a wrong mapping shows).
MICRO = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.head_dim=8",
         "model.d_ff=64", "model.init_std=0.2", "model.max_seq_len=64", "train.batch_size=8",
         "train.seq_len=16", "train.warmup_steps=1", "train.eval_batches=1",
         "train.eval_every=1000", "train.log_every=1"]
VARIANTS = {
    "plain": ["model.activation=relu"],
    "gqa_untied": ["model.activation=silu", "model.n_kv_heads=2", "model.tie_embeddings=false",
                   "model.rope_theta=500000", "model.norm_eps=1e-5", "model.rope_type=llama3",
                   "model.rope_factor=8", "model.rope_original_max_len=8"],
    "minicpm": ["model.activation=relu", "model.n_layers=3", "model.scale_emb=12",
                "model.scale_depth=1.4", "model.dim_model_base=8"],
}


def _cfg(*overrides):
    return configure.apply_overrides(config.proxy_config("tiny"), MICRO + list(overrides))


def _tokens(cfg, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (batch, cfg.train.seq_len))


def _forward(m, params, tokens):
    logits, _ = model_lib.Model(m).apply(params, jnp.asarray(tokens))
    return np.asarray(logits)


def _imported(out, seq_len, dtype="float32"):
    ckpt = hf_import.open_checkpoint(out, seq_len=seq_len, dtype=dtype)
    return ckpt, hf_import.load_params(ckpt)


def _model_params(out, seq_len=16):
    ckpt, params = _imported(out, seq_len)
    return ckpt.model, params


def _write_run(workdir: pathlib.Path, cfg, steps=(1,)) -> dict:
    """A run directory as train.py writes one (config.json, orbax steps of {"params": ...}),
    with initialised parameters: for the tests that need a run but not training. Returns the
    parameters of the last step."""
    workdir.mkdir(parents=True)
    raw = config.to_json_dict(cfg)
    rundir.atomic_write(workdir / rundir.CONFIG, json.dumps(raw))
    ckpt = checkpointing.Checkpointer(workdir / rundir.CHECKPOINTS, keep_last=10, keep_every=1)
    for step in steps:
        params = model_lib.Model(cfg.model).init(jax.random.key(step), cfg.train.seq_len)
        ckpt.save(step, {"params": params}, {"tokens_seen": 0.0, "config": raw})
    ckpt.wait()
    ckpt.close()
    return jax.device_get(params)


def _snapshot(path: pathlib.Path) -> dict:
    """Every file and directory under ``path`` with size and modification time."""
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


# ----------------------------------------------------------------------------- byte tokenizer
TEXTS = ["", "a", "Hello, world!\n", "  leading and trailing spaces  ", "tabs\tand\r\nCRLF",
         "Größe, Ça va? naïve café", "東京タワー 😀👍🏽", "\x00\x01\x7f control", "ÿ¡¬®", "  \n\n  ",
         "mixed: αβγ — “quotes” ‘x’ …", "x" * 3000]


def test_byte_tokenizer_json_encodes_as_the_byte_tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf_export.byte_tokenizer_json())
    ours = data.ByteTokenizer()
    assert tok.get_vocab_size() == ours.vocab_size == 256
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        np.testing.assert_array_equal(np.asarray(ids, np.int32), ours.encode(text), err_msg=repr(text))
        assert tok.decode(ids) == text
    # Every byte is its own token, in order.
    assert [tok.id_to_token(i) for i in range(256)] == [hf_export._bytes_to_unicode()[b]
                                                        for b in range(256)]


# ---------------------------------------------------------------- committed transformers fixtures
@pytest.mark.parametrize("name", ["llama_relu_gqa", "llama_silu_tied", "minicpm_relu"])
def test_committed_export_matches_transformers_logits(name):
    path = FIXTURES / name
    ref = np.load(path / "reference.npz")
    ckpt, params = _imported(path, ref["input_ids"].shape[1])
    logits = _forward(ckpt.model, params, ref["input_ids"])
    # float32 on both sides; logits spread over several units, reordering errors ~1e-6.
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-4, atol=1e-4)
    assert np.abs(ref["logits"]).max() > 1.0
    # The committed tokenizer.json is what the exporter writes for the byte tokenizer.
    assert json.loads((path / "tokenizer.json").read_text()) == json.loads(
        hf_export.byte_tokenizer_json())


def test_transformers_applied_the_exported_rope_scaling():
    """Without its llama3 scaling the fixture's weights give other logits: the match above
    means transformers read the exported rope_scaling."""
    import dataclasses

    ref = np.load(FIXTURES / "llama_relu_gqa" / "reference.npz")
    ckpt, params = _imported(FIXTURES / "llama_relu_gqa", 24)
    assert ckpt.model.rope_type == "llama3" and len(ckpt.files) == 3  # and sharded
    plain = dataclasses.replace(ckpt.model, rope_type="default")
    assert np.abs(_forward(plain, params, ref["input_ids"]) - ref["logits"]).max() > 1e-2


# ------------------------------------------------------------------------ round trip (trained)
@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_import_round_trip_is_exact(tmp_path, name):
    """A tiny run trained 2 steps (checkpoints 1 and 2) exported and imported: float32 gives
    the run's own logits, bfloat16 close ones, and --step picks the step."""
    workdir = tmp_path / "run"
    trainer.train(_cfg(*VARIANTS[name], "train.steps=2", "train.checkpoint_every=1"), workdir,
                  progress=False)
    before = _snapshot(workdir)
    run = trained_run.load(workdir)
    out = tmp_path / "hf"
    hf_export.export(workdir, out, log=lambda line: None)
    assert _snapshot(workdir) == before  # read-only on the run
    ckpt, params = _imported(out, run.cfg.train.seq_len)
    m = run.cfg.model
    # Every field the format carries comes back (the rest: evaluation's own settings).
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "ffn_type",
                  "activation", "rope_theta", "rope_type", "rope_factor", "rope_original_max_len",
                  "tie_embeddings", "norm_eps", "kv_heads", "scale_emb"):
        assert getattr(ckpt.model, field) == getattr(m, field), field
    assert model_lib.residual_scale(ckpt.model) == model_lib.residual_scale(m)
    assert model_lib.logit_scale(ckpt.model) == model_lib.logit_scale(m)
    tokens = _tokens(run.cfg)
    ours = _forward(m, hf_export.read_params(run, 2), tokens)
    np.testing.assert_allclose(_forward(ckpt.model, params, tokens), ours, rtol=1e-6, atol=1e-6)
    assert ours.std() > 0.1  # not near-uniform logits
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == ("minicpm" if name == "minicpm" else "llama")
    side = json.loads((out / hf_export.SPARSEJAX_FILE).read_text())
    assert side["step"] == 2 and side["activation"] == m.activation and side["warnings"] == []

    # bfloat16 weights of step 1.
    hf_export.export(workdir, tmp_path / "bf16", step=1, dtype="bfloat16", log=lambda line: None)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="numpy") as f:
        assert {str(f.get_slice(n).get_dtype()) for n in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ckpt, params = _imported(tmp_path / "bf16", run.cfg.train.seq_len)
    ref = _forward(m, hf_export.read_params(run, 1), tokens)
    err = np.abs(_forward(ckpt.model, params, tokens) - ref)
    # bf16 keeps ~3 significant digits: small against the spread of the logits, and smaller
    # than the difference to step 2's logits (so step 1 was the step exported).
    assert err.mean() < 0.02 * ref.std() and err.max() < 0.1 * ref.std()
    assert np.abs(ours - ref).mean() > err.mean()
    assert _snapshot(workdir) == before


# ---------------------------------------------------------------- files, shards, side file
def test_sharded_export_reads_as_the_single_file(tmp_path):
    cfg = _cfg("model.tie_embeddings=false", "model.n_kv_heads=2")
    params = _write_run(tmp_path / "run", cfg)
    hf_export.export(tmp_path / "run", tmp_path / "one", log=lambda line: None)
    assert hf_export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "many"),
                           "--max-shard-size", "20KB"]) == 0
    index = json.loads((tmp_path / "many" / hf_import.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "many" / "model.safetensors").exists()
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    tensors = hf_export.hf_tensors(params, cfg.model, "float32")
    for s in shards:  # under the limit, or one tensor larger than it (the 32 KB embeddings)
        held = [tensors[t].nbytes for t, f in index["weight_map"].items() if f == s]
        assert sum(held) <= 20_000 or len(held) == 1, (s, held)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    for name, tensor in tensors.items():  # the sizes planned are the arrays written
        array = tensor.array()
        assert (array.shape, array.dtype, array.nbytes) == (tensor.shape, tensor.dtype,
                                                            tensor.nbytes), name
    tokens = _tokens(cfg)
    a = _forward(*_model_params(tmp_path / "one"), tokens)
    b = _forward(*_model_params(tmp_path / "many"), tokens)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, _forward(cfg.model, params, tokens), rtol=1e-6, atol=1e-6)
    names = {p.name for p in (tmp_path / "one").iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", hf_export.SPARSEJAX_FILE}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_layout_table_round_trips_every_tensor():
    """to_hf then to_ours is the identity on each of this project's tensors (the one table)."""
    cfg = _cfg("model.n_kv_heads=2", "model.tie_embeddings=false", "model.head_dim=16")
    params = jax.device_get(model_lib.Model(cfg.model).init(jax.random.key(0), 16))
    for name, entry in hf_import.param_mapping(cfg.model).items():
        value = params
        for key in entry.path:
            value = value[key]
        hf = entry.to_hf(np.asarray(value))
        np.testing.assert_array_equal(entry.to_ours(hf), value, err_msg=name)
        assert hf.shape == hf_import.hf_shape(entry.path, value.shape), name


def test_fatrelu_threshold_is_recorded_and_warned(tmp_path, capsys):
    cfg = _cfg("model.activation=fatrelu", "sparsity.activation_threshold.kind=linear",
               "sparsity.activation_threshold.values=0,0.02",
               "sparsity.activation_threshold.boundaries=0,4", "sparsity.l1=1e-4")
    _write_run(tmp_path / "run", cfg, steps=(1, 2))
    assert hf_export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: fatrelu threshold 0.01 ")
    assert "sparsity.activation_threshold at step 2" in err[0] and "'relu'" in err[0]
    side = json.loads((tmp_path / "hf" / hf_export.SPARSEJAX_FILE).read_text())
    assert side["activation"] == "fatrelu" and side["activation_threshold"] == pytest.approx(0.01)
    assert side["sparsity"]["l1"]["values"] == [1e-4] and side["warnings"] == err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "relu"


def test_overwrite_replaces_only_with_the_flag(tmp_path, capsys):
    _write_run(tmp_path / "run", _cfg())
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["--workdir", str(tmp_path / "run"), "--out", str(out)]
    assert hf_export.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]
    assert hf_export.main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _sentencepiece(tmp_path, **options) -> pathlib.Path:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(data.load_corpus_text()[:100_000])
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=600, minloglevel=2, **options)
    return tmp_path / "sp.model"


# Whitespace at the ends and repeated, NFKC-normalized forms, characters outside the training
# text (byte fallback), and the corpus itself.
SPM_TEXTS = TEXTS[:-1] + [" leading", "trailing   ", "a  b   c", "\n\n\n", "ﬁ ligature ①②",
                          "ＡＢＣ full width", "First Citizen:\nBefore we proceed"] + [
    data.load_corpus_text()[i:i + 300] for i in range(200_000, 260_000, 6007)]


def test_sentencepiece_tokenizer_is_copied_and_converted(tmp_path):
    """A SentencePiece unigram model (the kind data.tokenizer=sentencepiece trains: byte
    fallback, full character coverage) is copied, and its tokenizer.json encodes every text as
    SentencePiece does."""
    from tokenizers import Tokenizer

    model = _sentencepiece(tmp_path, model_type="unigram", byte_fallback=True,
                           character_coverage=1.0)
    cfg = _cfg(f"data.tokenizer_path={model}", "model.vocab_size=600")
    _write_run(tmp_path / "run", cfg)
    hf_export.export(tmp_path / "run", tmp_path / "hf", log=lambda line: None)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == model.read_bytes()
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    # Not in config.json: the run trained without BOS, so eval.py --hf must not prepend one.
    assert "bos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    sp = data.SentencePieceModel(model)
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        np.testing.assert_array_equal(np.asarray(ids, np.int32), sp.encode(text), err_msg=repr(text))
        assert tok.decode(ids) == sp.decode(ids), repr(text)
    # The importer reads the same tokenizer.json.
    np.testing.assert_array_equal(data.load_tokenizer(tmp_path / "hf").encode(SPM_TEXTS[5]),
                                  sp.encode(SPM_TEXTS[5]))


def test_sentencepiece_bpe_model_is_copied_without_a_tokenizer_json(tmp_path):
    model = _sentencepiece(tmp_path, model_type="bpe")
    cfg = _cfg(f"data.tokenizer_path={model}", "model.vocab_size=600")
    _write_run(tmp_path / "run", cfg)
    hf_export.export(tmp_path / "run", tmp_path / "hf", log=lambda line: None)
    names = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "tokenizer.model" in names and not names & {"tokenizer.json", "tokenizer_config.json"}


# ---------------------------------------------------------------------------------- refusals
REFUSED = [
    (["model.activation=drelu"], "model.activation='drelu' has no Hugging Face hidden_act"),
    (["model.activation=polyrelu"], "model.activation='polyrelu'"),
    (["model.activation=polynorm"], "model.activation='polynorm'"),
    (["model.activation=xsilu", "model.activation_alpha=0.5"], "model.activation_alpha=0.5"),
    (["model.activation=shifted_relu", "sparsity.activation_threshold=0.1"],
     "sparsity.activation_threshold=0.1 (shifted_relu at step 1)"),
    (["model.ffn_type=plain"], "model.ffn_type='plain' has no LLaMA/MiniCPM form"),
    (["sparsity.topk=0.25"], "sparsity.topk=0.25 (a trained top-k)"),
    (["model.scale_emb=4", "model.head_dim=16"], "model.head_dim=16 with MiniCPM scalings"),
]


@pytest.mark.parametrize("overrides,expected", REFUSED, ids=[r[0][0] for r in REFUSED])
def test_unsupported_model_is_one_line_exit_2_nothing_written(tmp_path, capsys, overrides, expected):
    _write_run(tmp_path / "run", _cfg(*overrides))
    before = _snapshot(tmp_path)
    assert hf_export.main(["--workdir", str(tmp_path / "run"), "--out",
                           str(tmp_path / "out" / "hf")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("export error: cannot export: ") and expected in captured.err
    assert _snapshot(tmp_path) == before  # no --out, no temp dir, the run untouched


BAD_ARGS = [
    (["--step", "7"], "--step 7 is not a finished checkpoint"),
    (["--dtype", "float16"], "--dtype='float16' is not allowed"),
    (["--max-shard-size", "big"], "--max-shard-size='big' is not a size"),
]


@pytest.mark.parametrize("extra,expected", BAD_ARGS, ids=[a[0][0] for a in BAD_ARGS])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, extra, expected):
    _write_run(tmp_path / "run", _cfg())
    before = _snapshot(tmp_path)
    assert hf_export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                           *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert _snapshot(tmp_path) == before


def test_out_inside_the_run_and_missing_run_are_refused(tmp_path, capsys):
    _write_run(tmp_path / "run", _cfg())
    before = _snapshot(tmp_path)
    assert hf_export.main(["--workdir", str(tmp_path / "run"), "--out",
                           str(tmp_path / "run" / "hf")]) == 2
    assert "inside --workdir" in capsys.readouterr().err
    assert hf_export.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def _export_process(args, file_limit_kib: int = 0):
    """``python -m sparsejax.hf_export ARGS`` in its own process, optionally under a file-size
    limit (``ulimit -f``: the first larger write fails with EFBIG, as a full disk with ENOSPC)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "sparsejax.hf_export", *args]
    if file_limit_kib:
        cmd = ["bash", "-c", f'ulimit -f {file_limit_kib} && exec "$@"', "bash", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)


@pytest.mark.slow
def test_refusal_in_a_real_process(tmp_path):
    _write_run(tmp_path / "run", _cfg("model.activation=drelu"))
    before = _snapshot(tmp_path)
    proc = _export_process(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "model.activation='drelu'" in proc.stderr
    assert proc.stdout == "" and _snapshot(tmp_path) == before


@pytest.mark.slow
def test_write_failure_leaves_nothing_half_written(tmp_path):
    """A real write failure (the file-size limit, as a full disk) while writing the weights:
    exit 1 with one line, no --out and no temporary directory left; a retry succeeds."""
    _write_run(tmp_path / "run", _cfg())
    args = ["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]
    proc = _export_process(args, file_limit_kib=30)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "export error: writing" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    proc = _export_process(args)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_trained_sentencepiece_model_is_found_and_copied(tmp_path, capsys):
    """data.tokenizer=sentencepiece: the model the run's Dataset trained (cached by content hash
    in data.cache_dir) is the one exported; a deleted cache is one line naming data.cache_dir."""
    docs = tmp_path / "docs"
    docs.mkdir()
    text = data.load_corpus_text()
    for i in range(20):
        (docs / f"{i}.txt").write_text(text[i * 5000:(i + 1) * 5000])
    cfg = _cfg("data.source=text", f"data.text_files={docs}", "data.tokenizer=sentencepiece",
               "data.sentencepiece_vocab_size=512", f"data.cache_dir={tmp_path / 'cache'}",
               "model.vocab_size=512")
    trained_model = data.Dataset(cfg).tokenizer.model_path
    assert data.tokenizer_file(cfg) == trained_model
    _write_run(tmp_path / "run", cfg)
    assert hf_export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == trained_model.read_bytes()
    trained_model.unlink()
    assert hf_export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.cache_dir=" in err and not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("activation", sorted(hf_export.ACTIVATION_EXPORTS))
def test_hidden_act_reads_back_as_the_same_function(activation):
    """Each exportable activation's hidden_act is read by the importer as the same function
    (fatrelu and shifted_relu at threshold 0, xsilu at alpha 0: ReLU and SiLU)."""
    from sparsejax import activations

    hidden_act, warnings = hf_export.check_exportable(_cfg(f"model.activation={activation}"), 1)
    assert warnings == []
    back = activations.make(hf_import.ACTIVATIONS[hidden_act])
    x = jnp.linspace(-4, 4, 101)
    np.testing.assert_array_equal(back(x), activations.make(activation)(x))


def test_tokenizer_flag_when_the_training_data_is_elsewhere(tmp_path, capsys):
    """A SentencePiece model trained on TFDS data is found through that data; without it, one
    line pointing to --tokenizer, which then supplies the file (checked against the model)."""
    model = _sentencepiece(tmp_path, model_type="unigram", byte_fallback=True)
    cfg = _cfg("data.source=tfds", "data.tfds_name=no_such_dataset",
               f"data.tfds_data_dir={tmp_path / 'tfds'}", "data.tokenizer=sentencepiece",
               "data.sentencepiece_vocab_size=600", "model.vocab_size=600")
    _write_run(tmp_path / "run", cfg)
    args = ["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]
    assert hf_export.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer" in err and "no_such_dataset" in err
    assert not (tmp_path / "hf").exists()
    assert hf_export.main(args + ["--tokenizer", str(tmp_path / "corpus.txt")]) == 2
    assert "--tokenizer=" in capsys.readouterr().err
    assert hf_export.main(args + ["--tokenizer", str(model)]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == model.read_bytes()
    # A tokenizer with more tokens than the model's vocabulary is refused.
    _write_run(tmp_path / "run512", _cfg("model.vocab_size=512"))
    assert hf_export.main(["--workdir", str(tmp_path / "run512"), "--out", str(tmp_path / "hf512"),
                           "--tokenizer", str(model)]) == 2
    assert "600 tokens, more than the model's model.vocab_size=512" in capsys.readouterr().err
    assert not (tmp_path / "hf512").exists()
