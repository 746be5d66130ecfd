import json
import re

import numpy as np
import pytest

import text_files

from sparsejax import config, data
from sparsejax import configure


def _cfg(*overrides):
    return configure.apply_overrides(config.proxy_config("tiny"), list(overrides))


def test_embedded_corpus_is_real_text_with_fixed_split():
    text = data.load_corpus_text()
    assert len(text) > 1_000_000 and "First Citizen:" in text[:100]
    train, valid = data.split_text(text, 0.05)
    assert train + valid == text and train.endswith("\n")
    assert abs(len(valid) / len(text) - 0.05) < 0.001
    assert data.split_text(text, 0.05) == (train, valid)


def test_random_windows_deterministic_resumable_and_shifted():
    tokens = np.arange(10_000, dtype=np.int32)
    a = data.RandomWindows(tokens, global_batch=8, seq_len=16, seed=3)
    batches = [next(a) for _ in range(5)]
    b = data.RandomWindows(tokens, global_batch=8, seq_len=16, seed=3)
    b.set_state(json.loads(json.dumps({"step": 3})))
    np.testing.assert_array_equal(next(b)["inputs"], batches[3]["inputs"])
    first = batches[0]
    assert first["inputs"].shape == (8, 16) and first["weights"].shape == (8, 16)
    np.testing.assert_array_equal(first["targets"][:, :-1], first["inputs"][:, 1:])
    np.testing.assert_array_equal(first["targets"][:, -1], first["inputs"][:, -1] + 1)
    assert not np.array_equal(batches[0]["inputs"], batches[1]["inputs"])


def test_random_windows_hosts_partition_the_global_batch():
    tokens = np.arange(5_000, dtype=np.int32)
    whole = next(data.RandomWindows(tokens, 8, 16, seed=1))["inputs"]
    parts = [next(data.RandomWindows(tokens, 8, 16, seed=1, process_index=i, process_count=2))["inputs"]
             for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(data.DataError, match="divisible"):
        data.RandomWindows(tokens, 7, 16, seed=1, process_count=2)
    with pytest.raises(data.DataError, match="fewer than"):
        data.RandomWindows(tokens[:10], 8, 16, seed=1)


def test_sequential_validation_batches_do_not_overlap():
    tokens = np.arange(1_000, dtype=np.int32)
    batches = data.sequential_batches(tokens, batch=2, seq_len=10, n_batches=3)
    flat = np.concatenate([b["inputs"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(flat, np.arange(60))
    with pytest.raises(data.DataError, match="validation split"):
        data.sequential_batches(tokens[:15], batch=2, seq_len=10, n_batches=1)


def test_sequential_batches_disjoint_rows_with_bos():
    """The layout of an imported checkpoint's evaluation text (eval.py --hf): disjoint rows,
    each [BOS] + seq_len tokens when the model has a BOS token, else seq_len + 1 tokens."""
    tokens = np.arange(10, 60, dtype=np.int32)
    batches = data.sequential_batches(tokens, 2, 4, 3, bos_id=1, overlap=False)
    assert len(batches) == 3
    first = batches[0]
    np.testing.assert_array_equal(first["inputs"], [[1, 10, 11, 12], [1, 14, 15, 16]])
    np.testing.assert_array_equal(first["targets"], [[10, 11, 12, 13], [14, 15, 16, 17]])
    no_bos = data.sequential_batches(tokens, 2, 4, 1, overlap=False)
    np.testing.assert_array_equal(no_bos[0]["inputs"][1], [15, 16, 17, 18])
    np.testing.assert_array_equal(no_bos[0]["targets"][1], [16, 17, 18, 19])
    with pytest.raises(data.DataError, match=r"^the text has 5 tokens, fewer than one batch \(2 x 4\)$"):
        data.sequential_batches(tokens[:5], 2, 4, 1, bos_id=1, overlap=False, what="the text")


def _windows(tokens, starts, width, bos_id):
    """Rows cut one at a time from the token list (the reference for sequential_batches)."""
    rows = [([bos_id] if bos_id is not None else []) + list(tokens[s:s + width]) for s in starts]
    return np.asarray(rows, np.int32)


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("bos_id", [None, 7])
def test_sequential_batches_match_rows_cut_one_by_one(overlap, bos_id):
    rng = np.random.default_rng(0)
    for n_tokens, batch, seq_len, n_batches in [(200, 3, 5, 4), (61, 2, 6, 9), (13, 1, 12, 2)]:
        tokens = rng.integers(0, 500, n_tokens).astype(np.int32)
        width = seq_len + (bos_id is None)
        stride = width - 1 if overlap else width
        starts = [r * stride for r in range(n_tokens) if r * stride + width <= n_tokens]
        have = min(len(starts) // batch, n_batches)
        batches = data.sequential_batches(tokens, batch, seq_len, n_batches, bos_id=bos_id,
                                          overlap=overlap)
        assert len(batches) == have
        for b, got in enumerate(batches):
            rows = _windows(tokens, starts[b * batch:(b + 1) * batch], width, bos_id)
            np.testing.assert_array_equal(got["inputs"], rows[:, :-1])
            np.testing.assert_array_equal(got["targets"], rows[:, 1:])
            np.testing.assert_array_equal(got["weights"], np.ones((batch, seq_len), np.float32))


def _records(n=40):
    rng = np.random.default_rng(0)
    return [{"text": " ".join(f"w{j}" for j in range(rng.integers(3, 30)))} for _ in range(n)]


def test_grain_packing_state_round_trip_and_host_sharding():
    tok = data.ByteTokenizer()
    it = data.GrainPacked(_records(), "text", tok, global_batch=4, seq_len=32, seed=0)
    first = next(it)
    assert first["inputs"].shape == (4, 32)
    np.testing.assert_array_equal(first["targets"][:, :-1], first["inputs"][:, 1:])
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)["inputs"] for _ in range(3)]
    again = data.GrainPacked(_records(), "text", tok, global_batch=4, seq_len=32, seed=0)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["inputs"], w)
    # Every token of the packed stream comes from the documents, in order within a document.
    text = tok.decode(first["inputs"][0])
    assert all(piece.startswith("w") or piece == "" for piece in text.replace("w", " w").split())
    host0 = data.GrainPacked(_records(), "text", tok, 4, 32, seed=0, process_index=0, process_count=2)
    assert next(host0)["inputs"].shape == (2, 32)


def test_dataset_for_embedded_config():
    ds = data.Dataset(_cfg("train.batch_size=4", "train.seq_len=32", "train.eval_batches=2"))
    batch = next(ds.train)
    assert batch["inputs"].shape == (4, 32) and len(ds.validation) == 2
    assert ds.tokenizer.vocab_size == 256 and ds.train_tokens_available > 1_000_000


def test_missing_tfds_dataset_gives_actionable_error(tmp_path):
    cfg = _cfg("data.source=tfds", "data.tfds_name=lm1b", f"data.tfds_data_dir={tmp_path}")
    with pytest.raises(data.DataError, match="tfds build lm1b"):
        data.Dataset(cfg)


# ------------------------------------------------------------------------- data.source=text
def _stream(it, batches):
    """The packed token stream of ``batches`` batches: every row is seq_len + 1 consecutive
    tokens (inputs, then the last target), rows in order."""
    rows = []
    for _ in range(batches):
        b = next(it)
        rows += [np.concatenate([i, t[-1:]]) for i, t in zip(b["inputs"], b["targets"])]
    return np.concatenate(rows)


def test_packed_rows_are_whole_documents_back_to_back():
    docs = [f"<{i}>" + "ab" * (i % 17 + 1) + "\n" for i in range(30)]
    tok = data.ByteTokenizer()
    text = tok.decode(_stream(data.GrainPacked(docs, None, tok, 4, 15, seed=1), 12))
    pieces = re.findall(r"<(\d+)>([^<]*)", text)
    # One epoch is every document once, each exactly its source text, in a shuffled order.
    first_epoch = [int(i) for i, _ in pieces[:30]]
    assert sorted(first_epoch) == list(range(30)) and first_epoch != list(range(30))
    for i, body in pieces[:-1]:  # the last one may be cut by the end of the last row
        assert f"<{i}>{body}" == docs[int(i)]


_write = text_files.write


def test_text_files_documents_from_txt_and_jsonl(tmp_path):
    _write(tmp_path / "a" / "one.txt", "First file.\nStill the first document.\n")
    _write(tmp_path / "a" / "two.txt", "Second — ünïcode.\n")
    _write(tmp_path / "b" / "rows.jsonl",
           '{"body": "row one", "id": 1}\n\n{"body": "row \\u00e9 two"}\n{"body": ""}\n')
    _write(tmp_path / "a" / "skip.md", "not a text file")
    files = data.resolve_text_files([str(tmp_path / "a"), str(tmp_path / "b" / "*.jsonl"),
                                     str(tmp_path / "a" / "one.txt")])
    assert [f.name for f in files] == ["one.txt", "two.txt", "rows.jsonl"]  # sorted, no repeats
    docs = data.TextDocuments(files, "body")
    # Blank lines and empty texts are not documents.
    assert [docs[i] for i in range(len(docs))] == [
        "First file.\nStill the first document.\n", "Second — ünïcode.\n", "row one", "row é two"]


def test_validation_split_is_by_document_and_fixed():
    train, valid = data.split_documents(100, 0.05)
    assert len(valid) == 5 and len(train) == 95
    assert sorted(np.concatenate([train, valid])) == list(range(100))
    again = data.split_documents(100, 0.05)
    np.testing.assert_array_equal(again[1], valid)
    assert len(data.split_documents(3, 0.05)[1]) == 1 and len(data.split_documents(2, 0.9)[0]) == 1
    with pytest.raises(data.DataError, match="at least 2"):
        data.split_documents(1, 0.05)


def test_text_dataset_trains_validates_and_shards_by_document(tmp_path):
    for i in range(40):
        _write(tmp_path / f"doc{i:02d}.txt", f"<{i}>" + "xy" * (5 + i) + "\n")
    cfg = _cfg("data.source=text", f"data.text_files={tmp_path}/*.txt", "train.batch_size=4",
               "train.seq_len=16", "train.eval_batches=2", "data.validation_fraction=0.1")
    assert cfg.data.text_files == (f"{tmp_path}/*.txt",)
    tok = data.ByteTokenizer()
    _, valid_idx = data.split_documents(40, 0.1)

    def ids(stream):
        return {int(i) for i in re.findall(r"<(\d+)>", tok.decode(stream))}

    ds = data.Dataset(cfg)
    train_ids = ids(_stream(ds.train, 30))
    assert train_ids == set(range(40)) - set(valid_idx.tolist())  # 30 x 4 x 17 > one epoch
    valid_stream = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).reshape(-1)
                                   for b in ds.validation])
    assert ids(valid_stream) <= set(valid_idx.tolist()) and len(ds.validation) == 2
    # Resumable: a new iterator set to a saved state continues with the same batches.
    state = json.loads(json.dumps(ds.train.get_state()))
    want = [next(ds.train)["inputs"] for _ in range(3)]
    again = data.Dataset(cfg)
    again.train.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again.train)["inputs"], w)
    # Two processes read disjoint documents that together are the training split.
    shards = [ids(_stream(data.Dataset(cfg, p, 2).train, 30)) for p in range(2)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == train_ids


@pytest.mark.parametrize("case", ["empty_glob", "missing", "empty_dir", "suffix", "not_utf8",
                                  "not_json", "no_key", "not_string", "unreadable", "broken_link",
                                  "one_document", "all_empty"])
def test_bad_text_files_are_one_line_naming_the_file(tmp_path, case):
    good = _write(tmp_path / "good.txt", "a good document\n")
    key = "text"
    if case == "empty_glob":
        files, needle = [str(tmp_path / "nothing" / "*.txt")], "matches no file"
    elif case == "missing":
        files, needle = [str(tmp_path / "gone.txt")], "gone.txt' does not exist"
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        files, needle = [str(tmp_path / "empty")], "holds no .txt or .jsonl file"
    elif case == "suffix":
        files, needle = [str(_write(tmp_path / "x.csv", "a,b"))], "x.csv is not a text file"
    elif case == "not_utf8":
        files = [str(good), str(_write(tmp_path / "latin1.txt", "ok\ncaf\xe9\n".encode("latin-1")))]
        needle = "latin1.txt is not UTF-8 text (line 2, byte 6"
    elif case == "not_json":
        files, needle = [str(_write(tmp_path / "r.jsonl", '{"text": "a"}\n{"text": \n'))], "r.jsonl line 2 is not JSON"
    elif case == "no_key":
        files, key = [str(_write(tmp_path / "r.jsonl", '{"body": "a", "id": 3}\n'))], "text"
        needle = "data.text_key='text' is not in " + str(tmp_path / "r.jsonl") + " line 1; it has ['body', 'id']"
    elif case == "not_string":
        files, needle = [str(_write(tmp_path / "r.jsonl", '{"text": 5}\n'))], "line 1 is a int, not a string"
    elif case == "unreadable":
        # A regular file whose read fails (EIO) even for root, unlike a chmod 000 file.
        (tmp_path / "mem.txt").symlink_to("/proc/self/mem")
        files, needle = [str(tmp_path / "mem.txt")], "cannot read " + str(tmp_path / "mem.txt")
    elif case == "broken_link":
        (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere")
        files, needle = [str(tmp_path / "*.txt")], "dangling.txt is not a regular file"
    elif case == "one_document":
        files, needle = [str(good)], "1 document; a validation split by document needs at least 2"
    else:
        files, needle = [str(_write(tmp_path / "blank.txt", "\n \n"))], "hold no non-empty document"
    cfg = _cfg("data.source=text", f"data.text_files={','.join(files)}", f"data.text_key={key}")
    with pytest.raises(data.DataError) as err:
        data.Dataset(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_text_source_config_fields():
    cfg = _cfg("data.text_files=a/*.txt, b.jsonl ,c")
    assert cfg.data.text_files == ("a/*.txt", "b.jsonl", "c")
    with pytest.raises(config.ConfigError, match="data.text_files is empty"):
        _cfg("data.source=text")
    with pytest.raises(config.ConfigError, match="allowed values: .*'text'"):
        _cfg("data.source=txt")


# ------------------------------------------------------------------------ TFDS (ArrayRecord)
@pytest.fixture(scope="module")
def marked_tfds(tmp_path_factory):
    """A real TFDS dataset on disk: 60 training and 12 validation documents with markers."""
    from sparsejax import tfds_build

    docs = {"train": [f"<{i}>" + "tr" * (3 + i % 11) + "\n" for i in range(60)],
            "validation": [f"<{100 + i}>" + "va" * (3 + i) + "\n" for i in range(12)]}
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_build.build(docs, data_dir, name="marked_docs")
    return data_dir, docs


def _tfds_cfg(data_dir, *overrides):
    return _cfg("data.source=tfds", "data.tfds_name=marked_docs", f"data.tfds_data_dir={data_dir}",
                "train.batch_size=4", "train.seq_len=16", "train.eval_batches=2", *overrides)


def test_tfds_dataset_packs_its_documents(marked_tfds):
    data_dir, docs = marked_tfds
    ds = data.Dataset(_tfds_cfg(data_dir))
    tok = data.ByteTokenizer()
    pieces = re.findall(r"<(\d+)>([^<]*)", tok.decode(_stream(ds.train, 20)))
    seen = [int(i) for i, _ in pieces]
    assert set(seen[:60]) == set(range(60))  # 20 x 4 x 17 tokens > one epoch of 60 documents
    for i, body in pieces[:-1]:
        assert f"<{i}>{body}" == docs["train"][int(i)]
    valid = tok.decode(np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1).reshape(-1)
                                       for b in ds.validation]))
    assert {int(i) for i in re.findall(r"<(\d+)>", valid)} <= set(range(100, 112))


@pytest.mark.parametrize("override, needle", [
    ("data.tfds_eval_split=test", "data.tfds_eval_split='test': TFDS dataset 'marked_docs' has no "
                                  "split 'test'; its splits: ['train', 'validation']"),
    ("data.tfds_train_split=train[:50%]+extra", "data.tfds_train_split='train[:50%]+extra': TFDS "
                                                "dataset 'marked_docs' has no split 'extra'"),
    ("data.tfds_text_key=content", "data.tfds_text_key='content' is not a feature of TFDS dataset "
                                   "'marked_docs'; its features: ['text']"),
    ("data.tfds_name=other_docs", "data.tfds_name='other_docs' split 'train' is not available"),
])
def test_tfds_missing_split_or_key_names_the_field_and_what_exists(marked_tfds, override, needle):
    with pytest.raises(data.DataError) as err:
        data.Dataset(_tfds_cfg(marked_tfds[0], override))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_tfds_split_slices_are_allowed(marked_tfds):
    ds = data.Dataset(_tfds_cfg(marked_tfds[0], "data.tfds_train_split=train[:50%]"))
    assert ds.train.shard == "records 0::1 of 30"


@pytest.mark.parametrize("split, needle", [
    ("train[:200%]", "is not a valid slice of TFDS dataset 'marked_docs'"),
    ("train[:500]", "is not a valid slice of TFDS dataset 'marked_docs'"),
    ("train[40:10]", "is not a valid slice of TFDS dataset 'marked_docs'"),
    ("train[:90%", "is not a valid TFDS split slice (unbalanced brackets)"),
])
def test_a_bad_tfds_split_slice_gets_a_slice_hint(marked_tfds, split, needle):
    with pytest.raises(data.DataError) as err:
        data.Dataset(_tfds_cfg(marked_tfds[0], f"data.tfds_train_split={split}"))
    text = str(err.value)
    assert text.startswith(f"data.tfds_train_split={split!r}") and needle in text, text
    assert "slices look like train[:90%]" in text and "'train': 60, 'validation': 12" in text
    assert "array_record" not in text and "\n" not in text


def test_a_recursive_glob_through_a_symlink_cycle_keeps_each_file_once(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / ("sub" if i % 2 else ".") / f"d{i}.txt").write_text(f"document {i} " * 10)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # docs/sub/loop -> docs
    (root / "alias.txt").symlink_to(root / "d0.txt")
    want = sorted(str((root / ("sub" if i % 2 else ".") / f"d{i}.txt").resolve()) for i in range(6))
    for pattern in (f"{root}/**/*.txt", str(root)):
        files = data.resolve_text_files([pattern])
        assert sorted(str(f.resolve()) for f in files) == want, files
    cfg = _cfg("data.source=text", f"data.text_files={root}/**/*.txt",
               "data.validation_fraction=0.3")
    train, valid = data.text_sources(cfg)
    texts = [train[i] for i in range(len(train))], [valid[i] for i in range(len(valid))]
    assert len(texts[0]) + len(texts[1]) == 6 and not set(texts[0]) & set(texts[1])
