"""sparsejax.data_identity on real files: what each change to a run's data looks like in the
fingerprint, and that an unchanged input gives the same fingerprint (no false refusals)."""

import pytest

from sparsejax import config, configure, data, data_identity, tfds_build


def _cfg(*overrides):
    return configure.apply_overrides(config.proxy_config("tiny"), list(overrides))


def test_text_files_edits_additions_removals_are_each_named(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(f"document {i} " * 20)
    cfg = _cfg("data.source=text", f"data.text_files={docs}")
    tok = data.ByteTokenizer()
    before = data_identity.describe(cfg, tok)
    assert data_identity.differences(before, data_identity.describe(cfg, tok)) == []
    assert data_identity.differences(before, data_identity.describe(
        _cfg("data.source=text", f"data.text_files={docs}/"), tok)) == []
    (docs / "d1.txt").write_text("document 1 " * 20 + "!")  # one byte more
    (docs / "d2.txt").unlink()
    (docs / "d9.txt").write_text("new")
    changes = data_identity.differences(before, data_identity.describe(cfg, tok))
    assert changes == [f"data.text_files: 1 file(s) added: {(docs / 'd9.txt').resolve()}",
                       f"data.text_files: 1 file(s) removed: {(docs / 'd2.txt').resolve()}",
                       changes[2]]
    assert changes[2].startswith(f"data.text_files: 1 file(s) changed: {(docs / 'd1.txt').resolve()} "
                                 f"(220 -> 221 bytes, sha256 ")


def test_a_large_file_is_hashed_by_sampled_blocks_and_a_sampled_edit_is_seen(tmp_path, monkeypatch):
    monkeypatch.setattr(data_identity, "WHOLE_HASH_BYTES", 1000)
    monkeypatch.setattr(data_identity, "SAMPLE_BLOCK_BYTES", 100)
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * 5000)
    first = data_identity.file_digest(path)
    assert first["hashed"] == "16 blocks of 100 bytes" and first["size"] == 5000
    path.write_bytes(b"a" * 4999 + b"b")  # the last block is always sampled
    assert data_identity.file_digest(path)["sha256"] != first["sha256"]


def test_a_rebuilt_tfds_dataset_and_a_replaced_tokenizer_file_are_named(tmp_path):
    tfds_dir = tmp_path / "tfds"
    docs = {"train": [f"train doc {i}\n" for i in range(30)], "validation": ["valid doc\n"] * 4}
    tfds_build.build(docs, tfds_dir, name="ident_docs")
    cfg = _cfg("data.source=tfds", "data.tfds_name=ident_docs", f"data.tfds_data_dir={tfds_dir}",
               "data.tfds_eval_split=validation")
    tok = data.ByteTokenizer()
    before = data_identity.describe(cfg, tok)
    assert before["records"] == {"train": 30, "validation": 4}
    assert data_identity.differences(before, data_identity.describe(cfg, tok)) == []
    docs["train"][3] = "an edited document\n"  # same record counts, other records
    tfds_build.build_in_place(docs, tfds_dir, "ident_docs", overwrite=True)
    changes = data_identity.differences(before, data_identity.describe(cfg, tok))
    assert changes and all(c.startswith("TFDS dataset data.tfds_name='ident_docs' ") for c in changes)
    assert any("train sample" in c for c in changes), changes

    sp_a = data.SentencePieceTokenizer(["alpha beta gamma " * 300], 512, tmp_path / "a")
    sp_b = data.SentencePieceTokenizer(["delta epsilon zeta " * 300], 512, tmp_path / "b")
    text_cfg = _cfg("data.source=embedded")
    a = data_identity.describe(text_cfg, sp_a)
    b = data_identity.describe(text_cfg, sp_b)
    (changed,) = data_identity.differences(a, b)
    assert changed.startswith(f"tokenizer {sp_b.model_path.resolve()}: path ") and "sha256" in changed


def test_a_fingerprint_of_an_older_run_compares_as_nothing():
    new = data_identity.describe(_cfg(), data.ByteTokenizer())
    assert data_identity.differences(None, new) == []
    assert data_identity.differences(new, new) == []
