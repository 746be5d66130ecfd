"""A run knows what it was trained on, with real files and processes: text files edited, added
or removed, and a tokenizer file replaced at the same path, are refused on resume (one line
naming what changed, exit 2, nothing written); ``--force`` names what it overrides and the step
from which the new settings apply; ``DIR`` and ``DIR/`` holding the same files are one run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from sparsejax import writers

pytestmark = pytest.mark.slow  # real training processes

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.head_dim=16",
         "model.d_ff=64", "train.batch_size=4", "train.seq_len=16", "train.warmup_steps=2",
         "train.eval_batches=1", "train.eval_every=1000", "train.checkpoint_every=2",
         "train.log_every=1"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _train(workdir, *overrides, extra=(), timeout=240):
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny_relu.py"),
            "--workdir", str(workdir), "--no-progress", *extra]
    for o in MICRO + list(overrides):
        args += ["--set", o]
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _snapshot(root):
    """Every file under ``root`` with its size and modification time (what "nothing written"
    compares), the debug log (library logging of the refused attempt) and the lock aside."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and "train_debug" not in p.name and p.name != ".lock"}


def _refused(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, f"exit {proc.returncode}\n{proc.stderr}"
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def _write_docs(directory, n, salt=""):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"doc{i:02d}.txt").write_text(
            f"document {i}{salt}: " + "the quick brown fox jumps over the lazy dog. " * 20)


def test_changed_text_files_are_refused_on_resume_and_force_names_them(tmp_path):
    docs, run = tmp_path / "docs", tmp_path / "run"
    _write_docs(docs, 8)
    common = ["data.source=text", f"data.text_files={docs}"]
    _ok(_train(run, *common, "train.steps=2"))
    # The same files named as DIR/ are the same run.
    _ok(_train(run, "data.source=text", f"data.text_files={docs}/", "train.steps=4"))
    before = _snapshot(run)
    (docs / "doc03.txt").write_text("edited " * 100)
    (docs / "doc09.txt").write_text("a new document " * 50)
    line = _refused(_train(run, *common, "train.steps=6"), "other data",
                    f"1 file(s) added: {docs / 'doc09.txt'}", f"1 file(s) changed: {docs / 'doc03.txt'}",
                    "--force")
    assert "doc05" not in line
    assert _snapshot(run) == before
    (docs / "doc09.txt").unlink()
    for i in range(1, 8):
        (docs / f"doc{i:02d}.txt").unlink()  # most of them removed
    (docs / "doc01.txt").write_text("another " * 80)
    _refused(_train(run, *common, "train.steps=6"), "6 file(s) removed", "and 3 more", "1 file(s) changed")
    assert _snapshot(run) == before
    # --force resumes and says exactly what it overrode, and from which step.
    forced = _ok(_train(run, *common, "train.steps=6", extra=["--force"]))
    assert "--force: resuming" in forced.stdout and "file(s) removed" in forced.stdout, forced.stdout
    assert "the new settings apply from step 5" in forced.stdout, forced.stdout
    meta = json.loads((run / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["forced"][0]["applies_from_step"] == 5
    assert any("removed" in o for o in meta["forced"][0]["overridden"])
    assert sorted(meta["data_identity"]["files"]) == [str((docs / "doc00.txt").resolve()),
                                                       str((docs / "doc01.txt").resolve())]
    steps = [r["step"] for r in writers.read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))


def test_a_replaced_tokenizer_file_is_refused_on_resume(tmp_path):
    import sentencepiece as spm

    docs, run = tmp_path / "docs", tmp_path / "run"
    _write_docs(docs, 6)
    texts = {"a": ["alpha beta gamma delta epsilon " * 5 + str(i) for i in range(200)],
             "b": ["zeta eta theta iota kappa lambda " * 5 + str(i) for i in range(200)]}
    for name, sentences in texts.items():
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences),
                                       model_prefix=str(tmp_path / name), vocab_size=300,
                                       model_type="unigram", byte_fallback=True,
                                       hard_vocab_limit=False, minloglevel=2)
    tok = tmp_path / "tok.model"
    tok.write_bytes((tmp_path / "a.model").read_bytes())
    common = ["data.source=text", f"data.text_files={docs}", f"data.tokenizer_path={tok}",
              "model.vocab_size=0"]
    _ok(_train(run, *common, "train.steps=2"))
    before = _snapshot(run)
    tok.write_bytes((tmp_path / "b.model").read_bytes())  # same path, same vocabulary size
    _refused(_train(run, *common, "train.steps=4"), f"tokenizer {tok}", "sha256")
    assert _snapshot(run) == before
    tok.write_bytes((tmp_path / "a.model").read_bytes())  # put back: the run resumes
    resumed = _ok(_train(run, *common, "train.steps=4"))
    assert "resumed from" in resumed.stdout and "--force" not in resumed.stdout


def _poison(step_dir, leaf=("params", "layer_0", "ffn", "w_in", "kernel")):
    """Rewrite a checkpoint step's state with one NaN in ``leaf`` (real orbax files)."""
    import shutil

    import numpy as np
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(step_dir / "state")
    node = tree
    for key in leaf[:-1]:
        node = node[key]
    value = np.array(node[leaf[-1]])
    value.flat[0] = np.nan
    node[leaf[-1]] = value
    shutil.rmtree(step_dir / "state")
    ocp.PyTreeCheckpointer().save(step_dir / "state", tree)
    return "/".join(leaf[1:])  # named within the parameters


def test_non_finite_weights_are_refused_by_eval_and_warm_start(tmp_path):
    run = tmp_path / "run"
    _ok(_train(run, "train.steps=2"))
    bad = _poison(run / "checkpoints" / "2")
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--workdir", str(run),
                           "--metrics", "zero", "--no-progress"], env=_env(), capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    _refused(proc, "eval error: checkpoint step 2", f"parameter {bad} holds non-finite values")
    warm = _train(tmp_path / "warm", f"train.warm_start={run}", "train.steps=2")
    _refused(warm, "config error: train.warm_start=", f"parameter {bad} holds non-finite values")
    assert _snapshot(tmp_path) == before and not (tmp_path / "warm").exists()


def test_eval_hf_refuses_a_checkpoint_with_nan_weights(tmp_path):
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "nan_model"
    shutil.copytree(REPO / "tests" / "fixtures" / "hf" / "mistral", path)
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name].flat[5] = np.nan
    save_file(tensors, str(path / "model.safetensors"))
    out = tmp_path / "out" / "results.json"
    for metrics in ("zero", "zero,fat,topk,cett,cett_ppl"):
        proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--hf", str(path), "--seq-len",
                               "16", "--metrics", metrics, "--out", str(out), "--no-progress"],
                              env=_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
        _refused(proc, f"tensor {name} holds non-finite values")
    assert not out.exists()


def _eval_zero(run, out):
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--workdir", str(run), "--metrics",
                           "zero,topk", "--topk", "0.5", "--out", str(out), "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    _ok(proc)
    return {c["step"]: c for c in json.loads(out.read_text())["checkpoints"]}


def test_each_checkpoint_is_evaluated_with_the_settings_it_was_trained_with(tmp_path):
    import shutil

    run = tmp_path / "run"
    _ok(_train(run, "train.steps=4"))
    shutil.copytree(run, tmp_path / "before")
    before = _eval_zero(tmp_path / "before", tmp_path / "before.json")
    forced = _ok(_train(run, "train.steps=6", "sparsity.topk=0.25", extra=["--force"]))
    named = "sparsity.topk.values=(0.25,)"  # the field as config differences name it, new value
    assert named in forced.stdout and "apply from step 5" in forced.stdout, forced.stdout
    meta = json.loads((run / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["forced"] == [{"applies_from_step": 5, "overridden": [named]}]
    after = _eval_zero(run, tmp_path / "after.json")
    for step in (2, 4):  # dense checkpoints stay dense: the same numbers as before the restart
        assert after[step]["results"] == before[step]["results"]
        assert after[step]["dense_loss"] == before[step]["dense_loss"]
        assert after[step]["results"]["zero"]["ratio"] > 0.3
    # The forced step runs with its trained top-k: at most a quarter of the neurons active.
    assert after[6]["results"]["zero"]["ratio"] <= 0.25 + 1e-6


def test_a_run_whose_text_files_are_gone_is_one_line_for_train_and_eval(tmp_path):
    import shutil

    docs, run = tmp_path / "docs", tmp_path / "run"
    _write_docs(docs, 6)
    common = ["data.source=text", f"data.text_files={docs}"]
    _ok(_train(run, *common, "train.steps=2"))
    shutil.rmtree(docs)
    before = _snapshot(tmp_path)
    _refused(_train(run, *common, "train.steps=4"), "config error: data.text_files:",
             "does not exist")
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--workdir", str(run),
                           "--metrics", "zero", "--no-progress"], env=_env(), capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    _refused(proc, "eval error: the run's validation data cannot be read: data.text_files:",
             "does not exist")
    assert _snapshot(tmp_path) == before
