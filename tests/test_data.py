import json

import numpy as np
import pytest

from sparsejax import config, data


def _cfg(*overrides):
    return config.apply_overrides(config.proxy_config("tiny"), list(overrides))


def test_embedded_corpus_is_real_text_with_fixed_split():
    text = data.load_corpus_text()
    assert len(text) > 1_000_000 and "First Citizen:" in text[:100]
    train, valid = data.split_text(text, 0.05)
    assert train + valid == text and train.endswith("\n")
    assert abs(len(valid) / len(text) - 0.05) < 0.001
    assert data.split_text(text, 0.05) == (train, valid)


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    ids = tok.encode("Hark, é!")
    assert ids.dtype == np.int32 and ids.max() < 256
    assert list(ids[:4]) == [72, 97, 114, 107]
    assert tok.decode(ids) == "Hark, é!"


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


def test_sentencepiece_trains_once_and_round_trips(tmp_path):
    text = data.split_text(data.load_corpus_text(), 0.05)[0][:200_000]
    tok = data.SentencePieceTokenizer([text], vocab_size=512, cache_dir=tmp_path)
    mtime = tok.model_path.stat().st_mtime_ns
    again = data.SentencePieceTokenizer([text], vocab_size=512, cache_dir=tmp_path)
    assert again.model_path == tok.model_path and tok.model_path.stat().st_mtime_ns == mtime
    sample = "Speak, speak. We know't, we know't."
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode()) and ids.max() < tok.vocab_size
    assert tok.decode(ids) == sample


def test_dataset_for_embedded_config():
    ds = data.Dataset(_cfg("train.batch_size=4", "train.seq_len=32", "train.eval_batches=2"))
    batch = next(ds.train)
    assert batch["inputs"].shape == (4, 32) and len(ds.validation) == 2
    assert ds.tokenizer.vocab_size == 256 and ds.train_tokens_available > 1_000_000


def test_missing_tfds_dataset_gives_actionable_error(tmp_path):
    cfg = _cfg("data.source=tfds", "data.tfds_name=lm1b", f"data.tfds_data_dir={tmp_path}")
    with pytest.raises(data.DataError, match="tfds build lm1b"):
        data.Dataset(cfg)
