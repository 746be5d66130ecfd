"""Real data end to end, with real files and processes: a TFDS ArrayRecord dataset built on disk by
the documented command (``python -m sparsejax.tfds_build``), a folder of the user's own text files,
and an existing SentencePiece model, each trained with ``train.py`` as a user runs it.

Checked: SIGKILL mid-epoch and resume give losses bit-identical to an uninterrupted run (the grain
iterator's state is in the checkpoint); two processes (``python -m sparsejax.launch local``) read
disjoint shares of the records and resume from their own iterator states; every bad input on the
new fields is one line, exit 2, nothing written. The packing of tokens is checked against the
source documents in tests/test_data.py.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sparsejax import data, tfds_build, writers
from run_wait import wait_for

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.head_dim=32",
         "model.d_ff=160", "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=5",
         "train.eval_batches=1", "train.eval_every=1000"]


def _env(devices=1):
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _args(workdir, overrides):
    args = ["--config", str(REPO / "configs/tiny_relu.py"), "--workdir", str(workdir), "--no-progress"]
    for o in MICRO + list(overrides):
        args += ["--set", o]
    return args


def _train(workdir, *overrides, timeout=240):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *_args(workdir, overrides)],
                          env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _losses(workdir):
    rows = [r for r in writers.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """On disk: the TFDS dataset the README command builds, the same documents as a folder of
    .txt files and one .jsonl file, and a SentencePiece model saved by its trainer."""
    root = tmp_path_factory.mktemp("real_data")
    built = subprocess.run([sys.executable, "-m", "sparsejax.tfds_build", "--data-dir",
                            str(root / "tfds")], env=_env(), capture_output=True, text=True,
                           timeout=120, cwd=REPO)
    assert built.returncode == 0, built.stderr
    docs = tfds_build.embedded_documents(0.05)["train"]
    text_dir = root / "text"
    text_dir.mkdir()
    for i, doc in enumerate(docs[:200]):
        (text_dir / f"speech{i:03d}.txt").write_text(doc, encoding="utf-8")
    with open(text_dir / "rest.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[200:]:
            f.write(json.dumps({"speech": doc}) + "\n")
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(d for d in docs[:2000]),
                                   model_prefix=str(root / "spm"), vocab_size=700,
                                   model_type="unigram", byte_fallback=True, minloglevel=2)
    return {"root": root, "docs": docs, "spm": root / "spm.model", "tfds": root / "tfds",
            "text": text_dir}


def _source(corpus, name):
    """Overrides that train on the TFDS dataset, or on the text files with the saved tokenizer
    (model.vocab_size=0: the embedding takes the tokenizer's vocabulary)."""
    if name == "tfds":
        return ["data.source=tfds", f"data.tfds_name={tfds_build.DEFAULT_NAME}",
                f"data.tfds_data_dir={corpus['tfds']}", "data.tfds_eval_split=validation"]
    return ["data.source=text", f"data.text_files={corpus['text']}", "data.text_key=speech",
            f"data.tokenizer_path={corpus['spm']}", "model.vocab_size=0"]


@pytest.mark.parametrize("source", ["tfds", "text"])
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(corpus, tmp_path, source):
    common = _source(corpus, source) + ["train.steps=120", "train.log_every=1",
                                        "train.checkpoint_every=20"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _ok(_train(ref, *common))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *_args(killed, common)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        wait_for(lambda: (killed / "checkpoints" / "20").is_dir(), proc, 180, "checkpoint 20")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reached = _losses(killed)[0][-1]
    assert reached < 120
    resumed = _ok(_train(killed, *common))
    assert re.search(r"resumed from .* at step \d+0$", resumed.stdout, re.M), resumed.stdout
    steps_ref, loss_ref = _losses(ref)
    steps_res, loss_res = _losses(killed)
    assert steps_res == steps_ref == list(range(1, 121))
    assert loss_res == loss_ref  # bitwise: float32 values round-trip exactly through JSON
    # Mid-epoch: 120 steps of 8 x 33 tokens are a small part of the training documents.
    assert 120 * 8 * 33 < sum(len(d) for d in corpus["docs"]) / 10
    if source == "text":
        # The existing tokenizer is used end to end: the embedding has its vocabulary.
        size = data.SentencePieceModel(corpus["spm"]).vocab_size
        assert json.loads((ref / "config.json").read_text())["model"]["vocab_size"] == size == 700
        tree = ocp.PyTreeCheckpointer().restore(ref / "checkpoints" / "120" / "state")
        shapes = [np.shape(x) for x in __import__("jax").tree.leaves(tree["params"])]
        assert (size, 64) in shapes, shapes


def _launch(workdir, overrides, timeout=300):
    return subprocess.run([sys.executable, "-m", "sparsejax.launch", "local", "--processes", "2",
                           "--devices-per-process", "1", "--", *_args(workdir, overrides)],
                          cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          capture_output=True, text=True, timeout=timeout)


def _shards(workdir):
    """(process, first record, step, count) each process logged that it reads."""
    found = []
    for log in ("train_debug.log", "train_debug.1.log"):
        text = (workdir / log).read_text()
        found += [tuple(map(int, m)) for m in re.findall(
            r"process (\d) of 2 loads rows \(grain shard: records (\d+)::(\d+) of (\d+)\)", text)[-1:]]
    return found


@pytest.mark.parametrize("source", ["tfds", "text"])
def test_two_processes_read_disjoint_records_and_resume_their_own(corpus, tmp_path, source):
    # The learning rate of a step must not depend on train.steps (4, then 8): a constant schedule
    # and a warm-up shorter than either (warm-up is capped at train.steps).
    common = _source(corpus, source) + ["train.log_every=1", "train.checkpoint_every=4",
                                        "train.schedule=constant", "train.warmup_steps=2"]
    whole = tmp_path / "whole"
    _ok(_launch(whole, common + ["train.steps=8"]))
    shards = _shards(whole)
    assert sorted(p for p, *_ in shards) == [0, 1]
    # Record i is read by process i % 2: disjoint shares that together are every record.
    n = shards[0][3]
    owned = [set(range(first, n, step)) for _, first, step, _ in sorted(shards)]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(range(n))
    if source == "text":
        return
    # Stop after step 4, start again to step 8: each process must continue from its own iterator
    # state (they differ: each packed different documents), or the losses after step 4 change.
    split = tmp_path / "split"
    _ok(_launch(split, common + ["train.steps=4"]))
    second = _ok(_launch(split, common + ["train.steps=8"]))
    assert len(re.findall(r"resumed from .* at step 4$", second.stdout, re.M)) == 2, second.stdout
    meta = json.loads((split / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert len(meta["data_processes"]) == 2 and meta["data_processes"][0] != meta["data_processes"][1]
    assert _losses(split) == _losses(whole)
    # One process cannot continue two processes' shares: refused, one line, exit 2.
    alone = _train(split, *common, "train.steps=12")
    lines = alone.stderr.strip().splitlines()
    assert alone.returncode == 2 and len(lines) == 1, alone.stderr
    assert "data iterators are those of 2 processes" in lines[0] and "not 1" in lines[0], lines[0]
    assert _losses(split)[0] == list(range(1, 9))


@pytest.mark.parametrize("case", ["empty_glob", "not_utf8", "jsonl_key", "tfds_split", "tfds_key",
                                  "tokenizer_missing", "vocab_disagrees"])
def test_bad_data_inputs_are_one_line_exit_2_and_write_nothing(corpus, tmp_path, case):
    bad = tmp_path / "bad"
    bad.mkdir()
    text = _source(corpus, "text")
    if case == "empty_glob":
        overrides, needles = ["data.source=text", f"data.text_files={bad}/*.txt"], ["matches no file"]
    elif case == "not_utf8":
        (bad / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
        overrides = text[:1] + [f"data.text_files={corpus['text']},{bad / 'latin1.txt'}"] + text[2:]
        needles = [f"{bad / 'latin1.txt'} is not UTF-8 text"]
    elif case == "jsonl_key":
        overrides, needles = text[:2] + ["data.text_key=body"] + text[3:], [
            "data.text_key='body' is not in", "rest.jsonl line 1; it has ['speech']"]
    elif case == "tfds_split":
        overrides = _source(corpus, "tfds")[:-1] + ["data.tfds_eval_split=test"]
        needles = ["data.tfds_eval_split='test'", "its splits: ['train', 'validation']"]
    elif case == "tfds_key":
        overrides = _source(corpus, "tfds") + ["data.tfds_text_key=content"]
        needles = ["data.tfds_text_key='content'", "its features: ['text']"]
    elif case == "tokenizer_missing":
        overrides, needles = [f"data.tokenizer_path={bad / 'none.model'}"], [
            "data.tokenizer_path=", "does not exist"]
    else:
        overrides = [f"data.tokenizer_path={corpus['spm']}", "model.vocab_size=1024"]
        needles = ["model.vocab_size=1024 disagrees with the 700-token vocabulary",
                   f"data.tokenizer_path='{corpus['spm']}'"]
    workdir = tmp_path / "run"
    before = sorted(tmp_path.rglob("*"))
    proc = _train(workdir, *overrides)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("config error: ") and all(n in lines[0] for n in needles), lines[0]
    assert sorted(tmp_path.rglob("*")) == before and "Traceback" not in proc.stdout
