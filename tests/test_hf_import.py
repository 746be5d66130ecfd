"""sparsejax.hf_import and eval.py --hf on the tiny checkpoints of tests/fixtures/hf/ (made once by
tests/fixtures/make_hf_fixtures.py with transformers; these tests need only safetensors and
tokenizers): logits against the ones transformers (or MiniCPM's reference forward) computed,
CETT-PPL-1% against the same weights evaluated as a trained run, one-line errors."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import (checkpointing, config as config_lib, data, evaluation, hf_import,
                       model as model_lib, rundir)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
sys.path.insert(0, str(ROOT))
import eval as eval_cli  # noqa: E402


def _hf_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


@pytest.mark.parametrize("name", ["llama_gqa", "llama3_rope", "mistral", "minicpm"])
def test_imported_logits_match_reference(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    ckpt = hf_import.open_checkpoint(FIXTURES / name, seq_len=ref["input_ids"].shape[1])
    params = hf_import.load_params(ckpt)
    logits, _ = model_lib.Model(ckpt.model).apply(params, jnp.asarray(ref["input_ids"]))
    # float32 on both sides; the scale of the logits is ~5-10, reordering errors ~1e-6.
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-4, atol=1e-4)
    assert np.abs(ref["logits"]).max() > 1.0  # a non-trivial reference (not near-zero numbers)


def test_config_fields_follow_config_json():
    llama = hf_import.open_checkpoint(FIXTURES / "llama_gqa", seq_len=16)
    hf = _hf_config("llama_gqa")
    m = llama.model
    assert (m.n_heads, m.kv_heads, m.n_kv_heads) == (4, 2, 2)
    assert m.head_dim == hf["head_dim"] and m.d_ff == hf["intermediate_size"]
    assert m.rope_theta == hf["rope_parameters"]["rope_theta"] == 500_000.0
    assert m.norm_eps == hf["rms_norm_eps"] and not m.tie_embeddings
    assert (m.scale_emb, m.scale_depth, m.dim_model_base) == (1.0, 0.0, 0)  # LLaMA: no scalings
    assert len(llama.files) == 2  # sharded, read through model.safetensors.index.json
    llama3 = hf_import.open_checkpoint(FIXTURES / "llama3_rope", seq_len=16).model
    assert (llama3.rope_type, llama3.rope_factor, llama3.rope_original_max_len) == ("llama3", 8.0, 32)
    assert llama3.tie_embeddings and llama3.kv_heads == 1 and llama3.head_dim == 16
    mini = hf_import.open_checkpoint(FIXTURES / "minicpm", seq_len=16).model
    assert (mini.scale_emb, mini.scale_depth, mini.dim_model_base) == (12.0, 1.4, 8)
    assert mini.tie_embeddings and mini.activation == "relu" and mini.n_kv_heads == 0
    assert model_lib.residual_scale(mini) == pytest.approx(1.4 / 3 ** 0.5)
    assert model_lib.logit_scale(mini) == 8 / 32


def test_bfloat16_import_stays_close():
    ref = np.load(FIXTURES / "llama_gqa" / "reference.npz")
    ckpt = hf_import.open_checkpoint(FIXTURES / "llama_gqa", seq_len=24, dtype="bfloat16")
    params = hf_import.load_params(ckpt)
    assert params["layer_0"]["ffn"]["w_in"]["kernel"].dtype.name == "bfloat16"
    logits, _ = model_lib.Model(ckpt.model).apply(params, jnp.asarray(ref["input_ids"]))
    # bf16 keeps ~3 significant digits; the logits spread over several units.
    err = np.abs(np.asarray(logits) - ref["logits"])
    assert np.mean(err) < 0.1 * np.std(ref["logits"])


def test_bfloat16_stored_weights_are_read(tmp_path):
    """Most released checkpoints store bfloat16, which numpy lacks: the weights of a fixture
    rounded to bf16 and stored so read back as exactly those values."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "mistral_bf16"
    shutil.copytree(FIXTURES / "mistral", path)
    stored = load_file(str(path / "model.safetensors"))
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in stored.items()},
              str(path / "model.safetensors"))
    ckpt = hf_import.open_checkpoint(path, seq_len=24)
    assert set(d for _, d in ckpt.shapes.values()) == {"BF16"}  # the safetensors header's name
    params = hf_import.load_params(ckpt)
    w = stored["model.layers.1.mlp.down_proj.weight"]
    np.testing.assert_array_equal(params["layer_1"]["ffn"]["w_out"]["kernel"],
                                  w.astype(ml_dtypes.bfloat16).astype(np.float32).T)
    ref = np.load(path / "reference.npz")
    logits, _ = model_lib.Model(ckpt.model).apply(params, jnp.asarray(ref["input_ids"]))
    err = np.abs(np.asarray(logits) - ref["logits"])
    assert np.mean(err) < 0.1 * np.std(ref["logits"])


def _mutated(tmp_path, name: str, **changes) -> pathlib.Path:
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    cfg = _hf_config(name)
    for key, value in changes.items():
        if value is None and key in cfg:
            del cfg[key]
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("name,changes,expected", [
    ("llama_gqa", {"model_type": "gpt2"}, 'model_type="gpt2"'),
    ("llama_gqa", {"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5}},
     'rope_parameters.rope_type="yarn"'),
    ("minicpm", {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     'rope_scaling.rope_type="dynamic"'),
    ("llama_gqa", {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5,
                                       "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor=0.5"),
    ("llama_gqa", {"attention_bias": True}, "attention_bias=true"),
    ("llama_gqa", {"mlp_bias": True}, "mlp_bias=true"),
    ("mistral", {"num_local_experts": 8}, "num_local_experts=8"),
    ("minicpm", {"attention_type": "mla"}, 'attention_type="mla"'),
    ("minicpm", {"ffn_type": "moe"}, 'ffn_type="moe"'),
    ("llama_gqa", {"hidden_act": "fatrelu"}, 'hidden_act="fatrelu"'),
    ("mistral", {"sliding_window": 8}, "sliding_window=8"),
])
def test_unsupported_option_names_key_and_value(tmp_path, capsys, name, changes, expected):
    path = _mutated(tmp_path, name, **changes)
    out = tmp_path / "out" / "results.json"
    assert eval_cli.main(["--hf", str(path), "--seq-len", "16", "--batch-size", "8",
                          "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"eval error: unsupported checkpoint: config.json {expected} (supported: ")
    assert not out.parent.exists()


def test_bad_checkpoints_fail_in_one_line(tmp_path, capsys):
    cases = []
    no_lm_head = _mutated(tmp_path, "minicpm", tie_word_embeddings=False)  # tied weights only
    cases.append((no_lm_head, "lm_head.weight"))
    wrong_heads = _mutated(tmp_path, "llama_gqa", num_key_value_heads=4)
    cases.append((wrong_heads, "self_attn.k_proj.weight has shape [16, 32]"))
    no_weights = tmp_path / "empty"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(_hf_config("llama_gqa")))
    cases.append((no_weights, "no *.safetensors"))
    cases.append((tmp_path / "missing", "is not a directory"))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(FIXTURES / "mistral", no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    cases.append((no_tokenizer, "no tokenizer.json or tokenizer.model in"))
    for path, expected in cases:
        assert eval_cli.main(["--hf", str(path), "--seq-len", "16", "--batch-size", "8",
                              "--out", str(tmp_path / "o" / "r.json"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


def test_a_text_shorter_than_one_batch_is_one_line(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("First Citizen:\n")
    out = tmp_path / "o" / "r.json"
    assert eval_cli.main(["--hf", str(FIXTURES / "llama_gqa"), "--seq-len", "16", "--batch-size",
                          "8", "--text", str(short), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    n = len(data.load_tokenizer(FIXTURES / "llama_gqa").encode(short.read_text()))
    # BOS-prefixed rows: 8 rows of 16 text tokens make one batch.
    assert err == (f"eval error: the text has {n} tokens, fewer than one batch (8 x 16); give a "
                   f"longer --text or lower --batch-size / --seq-len")
    assert not out.parent.exists()


def test_memory_check_refuses_before_loading():
    ckpt = hf_import.open_checkpoint(FIXTURES / "llama_gqa", seq_len=16)
    need = hf_import.memory_need_bytes(ckpt, batch_size=8, seq_len=16, eval_tokens=256,
                                       max_cache_gib=2.0)
    # At least the float32 parameters, the logits of a batch and the CETT cache.
    m = ckpt.model
    assert need >= ckpt.n_params * 4 + 8 * 16 * m.vocab_size * 4 + 256 * m.d_ff * m.n_layers * 4
    hf_import.check_memory(need, need)
    with pytest.raises(hf_import.HfImportError, match="GiB of host memory is free"):
        hf_import.check_memory(need, need - 1)


def test_tokenizer_reads_tokenizer_json():
    tok = data.load_tokenizer(FIXTURES / "llama_gqa", field="--hf")  # the checkpoint directory
    assert tok.model_path == FIXTURES / "llama_gqa" / "tokenizer.json"
    ids = tok.encode("First Citizen:\nBefore we proceed")
    ref = np.load(FIXTURES / "llama_gqa" / "reference.npz")["input_ids"]
    # The fixture's input row 0 is [BOS] + the encoding of the same text's start.
    np.testing.assert_array_equal(ids, ref[0, 1:1 + len(ids)])


# ----------------------------------------------------------------------- evaluation, end to end
OPTIONS = evaluation.EvalOptions(metrics=("zero", "fat", "topk", "cett", "cett_ppl"), ppl_p=1.0)


def _hf_run(name: str, batch_size=8, seq_len=32, n_batches=2):
    ckpt = hf_import.open_checkpoint(FIXTURES / name, seq_len=seq_len)
    text = (ROOT / "README.md").read_text()
    tokens = data.encode_prefix(data.load_tokenizer(FIXTURES / name), text, 10_000)
    batches = data.sequential_batches(tokens, batch_size, seq_len, n_batches, bos_id=1,
                                      overlap=False)
    cfg = hf_import.run_config(ckpt.model, f"hf_{name}", batch_size=batch_size, seq_len=seq_len,
                               eval_batches=n_batches)
    return hf_import.HfRun(ckpt, cfg, hf_import.load_params(ckpt)), batches


def _as_trained_run(run: hf_import.HfRun, workdir: pathlib.Path, step: int = 1) -> None:
    """The imported weights written as train.py writes a run: config.json and an orbax
    checkpoint of {"params": ...} at ``step`` (after warm-up)."""
    workdir.mkdir()
    raw = config_lib.to_json_dict(run.cfg)
    rundir.atomic_write(workdir / rundir.CONFIG, json.dumps(raw))
    ckpt = checkpointing.Checkpointer(workdir / rundir.CHECKPOINTS, keep_last=1, keep_every=1)
    params = jax.tree.map(jnp.asarray, run.params_np)
    ckpt.save(step, {"params": params}, {"tokens_seen": 1234.0, "config": raw})
    ckpt.wait()
    ckpt.close()


@pytest.mark.parametrize("name", ["minicpm", "llama_gqa"])
def test_cett_ppl_equals_trained_run_evaluation(tmp_path, name):
    run, batches = _hf_run(name)
    _as_trained_run(run, tmp_path / "run")  # before evaluate() places and releases params_np
    imported = evaluation.evaluate(run, OPTIONS, progress=False, batches=batches)
    assert run.params_np is None  # one copy of the weights in memory during the evaluation
    trained = evaluation.evaluate_run(tmp_path / "run", OPTIONS, progress=False, batches=batches)
    a, b = imported["checkpoints"][0], trained["checkpoints"][0]
    assert a["dense_loss"] == b["dense_loss"]
    assert imported["cett_ppl"]["cett"] == trained["cett_ppl"]["cett"]
    assert imported["cett_ppl"]["evaluations"] == trained["cett_ppl"]["evaluations"]
    for metric in OPTIONS.metrics:
        assert a["results"][metric]["ratio_layers"] == b["results"][metric]["ratio_layers"], metric
        assert a["results"][metric]["loss"] == b["results"][metric]["loss"], metric
    # The search's result satisfies its definition: the bracket around c straddles the target.
    target = 1 + OPTIONS.ppl_p / 100
    below = [c for c, r in imported["cett_ppl"]["evaluations"] if r < target]
    above = [c for c, r in imported["cett_ppl"]["evaluations"] if r >= target]
    c = imported["cett_ppl"]["cett"]
    assert max(below, default=0.0) <= c <= min(above, default=1.0)
    assert b["step"] == 1 and a["step"] == 0 and np.isnan(a["tokens_seen"])


def test_eval_cli_writes_standard_results(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text())
    out = tmp_path / "eval" / "results.json"
    assert eval_cli.main(["--hf", str(FIXTURES / "minicpm"), "--text", str(text), "--seq-len", "32",
                          "--batch-size", "8", "--eval-batches", "2", "--metrics",
                          "zero,fat,topk,cett,cett_ppl", "--out", str(out), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert results["hf"]["model_type"] == "minicpm" and results["eval_tokens"] == 2 * 8 * 32
    assert results["metrics"] == ["zero", "fat", "topk", "cett", "cett_ppl"]
    entry = results["checkpoints"][0]
    # ReLU: the zero criterion counts exact zeros, so its ratio is in (0, 1); top-k keeps k.
    assert 0 < entry["results"]["zero"]["ratio"] < 1
    assert entry["results"]["topk"]["ratio"] == pytest.approx(entry["results"]["topk"]["k"] / 80)
    assert len(entry["results"]["cett_ppl"]["ratio_layers"]) == 3
    rows = (out.with_suffix(".csv")).read_text().splitlines()
    assert rows[0] == ",".join(("step", "tokens_seen", "metric", "layer", "quantity", "value"))
    assert any(",cett_ppl,mean,ratio," in r for r in rows)
    assert "CETT-PPL-1%" in capsys.readouterr().out


@pytest.mark.slow
def test_unsupported_checkpoint_real_process_exit_2(tmp_path):
    path = _mutated(tmp_path, "llama_gqa", attention_bias=True)
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--hf", str(path),
                           "--out", str(tmp_path / "o" / "results.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("eval error: unsupported checkpoint: config.json "
                                   "attention_bias=true (supported: false)")
    assert not (tmp_path / "o").exists()



def test_llama3_rope_scaling_is_what_makes_the_logits_match():
    """Without its llama3 frequency scaling the same weights give other logits: the fixture's
    match above depends on the scaling, not only on the weights."""
    ref = np.load(FIXTURES / "llama3_rope" / "reference.npz")
    ckpt = hf_import.open_checkpoint(FIXTURES / "llama3_rope", seq_len=24)
    params = hf_import.load_params(ckpt)
    plain = dataclasses.replace(ckpt.model, rope_type="default")
    logits, _ = model_lib.Model(plain).apply(params, jnp.asarray(ref["input_ids"]))
    assert np.abs(np.asarray(logits) - ref["logits"]).max() > 1e-2


@pytest.mark.parametrize("args, expected", [
    (["--hf", "HF", "--checkpoints", "last"], "--checkpoints does not apply to --hf (only to --workdir)"),
    (["--hf", "HF", "--joint-last", "3"], "--joint-last does not apply to --hf"),
    (["--workdir", "RUN", "--text", "t.txt"], "--text does not apply to --workdir (only to --hf)"),
    (["--workdir", "RUN", "--seq-len", "16", "--dtype", "float32"],
     "--seq-len, --dtype do not apply to --workdir"),
    (["--hf", "HF", "--seq-len", "16", "--batch-size", "8", "--topk", "100000"],
     "--topk=100000 is more neurons than this model has (d_ff="),
])
def test_options_that_would_be_ignored_or_out_of_range_are_one_line(tmp_path, capsys, args, expected):
    (tmp_path / "run").mkdir()
    out = tmp_path / "o" / "r.json"
    args = [str(FIXTURES / "mistral") if a == "HF" else str(tmp_path / "run") if a == "RUN" else a
            for a in args]
    assert eval_cli.main([*args, "--metrics", "zero,topk", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval error: ") and expected in err[0], err
    assert not out.parent.exists()
