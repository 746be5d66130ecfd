"""sparsejax.tfds_build: a real TFDS ArrayRecord dataset written offline and read back through
``tfds.data_source`` (the reader data.source=tfds uses), compared with the text it came from."""

import re

import tensorflow_datasets as tfds

from sparsejax import data, tfds_build


def _read(data_dir, name, split):
    source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    return [source[i]["text"].decode("utf-8") for i in range(len(source))]


def test_embedded_corpus_documents_are_the_corpus_cut_at_blank_lines():
    docs = tfds_build.embedded_documents(0.05)
    train_text, valid_text = data.split_text(data.load_corpus_text(), 0.05)
    assert len(docs["train"]) > 5000 and len(docs["validation"]) > 300
    for split, text in (("train", train_text), ("validation", valid_text)):
        assert all(d.endswith("\n") and "\n\n" not in d for d in docs[split])
        # The documents, back to back with one blank line between, are the split's text (whose
        # few runs of several blank lines count as one).
        assert "\n".join(docs[split]) == re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def test_command_builds_the_embedded_corpus_and_reads_back(tmp_path, capsys):
    assert tfds_build.main(["--data-dir", str(tmp_path)]) == 0
    assert "6723 train and 500 validation documents" in capsys.readouterr().out
    want = tfds_build.embedded_documents(0.05)
    for split in ("train", "validation"):
        got = _read(tmp_path, tfds_build.DEFAULT_NAME, split)
        assert sorted(got) == sorted(want[split])  # TFDS shuffles the records on write


def test_command_builds_own_files_split_by_document(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"{i:02d}.txt").write_text(f"document {i}\n")
    (src / "more.jsonl").write_text('{"body": "json one"}\n{"body": "json two"}\n')
    code = tfds_build.main(["--data-dir", str(tmp_path / "out"), "--name", "own_docs",
                            "--text-files", str(src), "--text-key", "body",
                            "--validation-fraction", "0.1"])
    assert code == 0, capsys.readouterr().err
    train, valid = _read(tmp_path / "out", "own_docs", "train"), _read(tmp_path / "out", "own_docs", "validation")
    assert len(valid) == 2 and not set(train) & set(valid)
    assert sorted(train + valid) == sorted([f"document {i}\n" for i in range(20)] + ["json one", "json two"])


def test_command_bad_input_is_one_line_exit_2(tmp_path, capsys):
    for args, needle in [(["--text-files", str(tmp_path / "none" / "*.txt")], "matches no file"),
                         (["--name", "Bad-Name"], "--name='Bad-Name' must be snake_case"),
                         (["--validation-fraction", "1.5"], "--validation-fraction=1.5 must be in (0, 1)")]:
        assert tfds_build.main(["--data-dir", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_existing_dataset_is_refused_and_overwrite_swaps_it_whole(tmp_path, capsys):
    out = tmp_path / "out"

    def docs(tag, n):
        src = tmp_path / tag
        src.mkdir()
        for i in range(n):
            (src / f"{i:02d}.txt").write_text(f"{tag} {i}\n")
        return ["--data-dir", str(out), "--name", "mine", "--text-files", str(src)]

    assert tfds_build.main(docs("old", 10)) == 0
    capsys.readouterr()
    new = docs("new", 12)
    assert tfds_build.main(new) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds dataset 'mine'" in err[0] and "--overwrite" in err[0], err
    old_records = _read(out, "mine", "train") + _read(out, "mine", "validation")
    assert sorted(old_records) == sorted(f"old {i}\n" for i in range(10))
    assert tfds_build.main(new + ["--overwrite"]) == 0, capsys.readouterr().err
    records = _read(out, "mine", "train") + _read(out, "mine", "validation")
    assert sorted(records) == sorted(f"new {i}\n" for i in range(12))
    # No scratch directory or old copy left (TFDS itself keeps an empty downloads/).
    assert sorted(p.name for p in out.iterdir()) == ["downloads", "mine"]


def test_a_data_dir_that_is_a_file_and_a_text_key_alone_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args, needle in [(["--data-dir", str(afile)], f"--data-dir {afile} is a file"),
                         (["--data-dir", str(tmp_path / "out"), "--text-key", "body"],
                          "--text-key applies to --text-files only")]:
        assert tfds_build.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists() and afile.read_text() == "x"
