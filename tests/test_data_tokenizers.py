"""sparsejax.data.tokenizers: every tokenizer kind through the one loader (round trip, vocabulary
size and special tokens against the libraries read directly), its one-line errors, and that no
other code in the project loads a tokenizer."""

import ast
import dataclasses
import pathlib
import shutil

import numpy as np
import pytest

import text_files

from sparsejax import config, configure, data

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF_FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "llama_gqa"
SAMPLES = ["Speak, speak. We know't, we know't.", "Hark, é! 東京 — ünïcödé\n\ttabs  and  spaces",
           ""]


def _cfg(*overrides):
    return configure.apply_overrides(config.proxy_config("tiny"), list(overrides))


_write = text_files.write


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    ids = tok.encode("Hark, é!")
    assert ids.dtype == np.int32 and ids.max() < 256
    assert list(ids[:4]) == [72, 97, 114, 107]
    assert tok.decode(ids) == "Hark, é!"


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


def test_a_corrupt_cached_sentencepiece_model_is_one_line(tmp_path):
    text = data.split_text(data.load_corpus_text(), 0.05)[0][:100_000]
    tok = data.SentencePieceTokenizer([text], vocab_size=400, cache_dir=tmp_path)
    tok.model_path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(data.DataError) as err:
        data.SentencePieceTokenizer([text], vocab_size=400, cache_dir=tmp_path)
    assert f"the cached SentencePiece model {tok.model_path} cannot be loaded" in str(err.value)
    assert "delete it" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------ existing tokenizers
def _save_sentencepiece(tmp_path, vocab_size=400) -> str:
    import sentencepiece as spm

    lines = data.load_corpus_text()[:100_000].splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(line for line in lines if line),
                                   model_prefix=str(tmp_path / "tok"), vocab_size=vocab_size,
                                   model_type="unigram", byte_fallback=True, minloglevel=2)
    return str(tmp_path / "tok.model")


def _save_hf_tokenizer(tmp_path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(data.load_corpus_text()[:100_000].splitlines(), trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_existing_tokenizer_sets_the_vocabulary(tmp_path, kind):
    path = _save_sentencepiece(tmp_path) if kind == "sentencepiece" else _save_hf_tokenizer(tmp_path)
    if kind == "sentencepiece":
        import sentencepiece as spm

        reference = spm.SentencePieceProcessor(model_file=path)
        size, encode = reference.get_piece_size(), reference.encode
    else:
        import tokenizers

        reference = tokenizers.Tokenizer.from_file(path)
        size, encode = reference.get_vocab_size(), lambda s: reference.encode(s).ids
    assert size not in (256, 4096)  # differs from every default, so "taken from it" is visible
    cfg = _cfg(f"data.tokenizer_path={path}", "model.vocab_size=0", "train.batch_size=4",
               "train.seq_len=32", "train.eval_batches=1")
    assert cfg.model.vocab_size == size  # model.vocab_size=0: the tokenizer's size
    ds = data.Dataset(cfg)
    sample = "Speak, speak. We know't, we know't."
    assert ds.tokenizer.vocab_size == size
    assert list(ds.tokenizer.encode(sample)) == list(encode(sample))
    assert ds.tokenizer.decode(ds.tokenizer.encode(sample)) == sample
    assert next(ds.train)["inputs"].max() < size
    with pytest.raises(config.ConfigError) as err:
        _cfg(f"data.tokenizer_path={path}", "model.vocab_size=4096")
    assert f"model.vocab_size=4096 disagrees with the {size}-token vocabulary of " \
           f"data.tokenizer_path='{path}'" in str(err.value)


def test_bad_tokenizer_paths_are_one_line(tmp_path):
    bad = _write(tmp_path / "broken.model", b"not a sentencepiece model")
    for value, needle in [(tmp_path / "none.model", "does not exist or is not a readable file"),
                          (_write(tmp_path / "vocab.txt", "a\nb\n"), "allowed suffixes: ['.json', '.model']"),
                          (bad, "could not be loaded as SentencePieceModel")]:
        with pytest.raises(config.ConfigError) as err:
            _cfg(f"data.tokenizer_path={value}", "model.vocab_size=0")
        assert f"data.tokenizer_path='{value}'" in str(err.value) and needle in str(err.value)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------ the one loader
@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """A SentencePiece .model and a tokenizer.json on disk, each also as the only tokenizer of a
    checkpoint-style directory."""
    root = tmp_path_factory.mktemp("tokenizers")
    spm_model = pathlib.Path(_save_sentencepiece(root))
    hf_json = pathlib.Path(_save_hf_tokenizer(root))
    (root / "spm_dir").mkdir()
    shutil.copy(spm_model, root / "spm_dir" / "tokenizer.model")
    (root / "both_dir").mkdir()
    shutil.copy(spm_model, root / "both_dir" / "tokenizer.model")
    shutil.copy(hf_json, root / "both_dir" / "tokenizer.json")
    return root


def _reference(path: pathlib.Path):
    """(vocabulary size, encode, decode) read with the tokenizer's own library."""
    if path.suffix == ".model":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        return sp.get_piece_size(), sp.encode, sp.decode
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(path))
    return (tok.get_vocab_size(with_added_tokens=True),
            lambda s: tok.encode(s, add_special_tokens=False).ids, tok.decode)


@pytest.mark.parametrize("spec, kind, file", [
    ("tok.model", "SentencePieceModel", "tok.model"),
    ("tokenizer.json", "HuggingFaceTokenizer", "tokenizer.json"),
    ("spm_dir", "SentencePieceModel", "spm_dir/tokenizer.model"),
    ("both_dir", "HuggingFaceTokenizer", "both_dir/tokenizer.json"),  # tokenizer.json first
    (str(HF_FIXTURE), "HuggingFaceTokenizer", str(HF_FIXTURE / "tokenizer.json")),
])
def test_each_file_kind_loads_through_the_one_loader(tokenizer_files, spec, kind, file):
    tok = data.load_tokenizer(tokenizer_files / spec)
    assert type(tok).__name__ == kind and tok.model_path == tokenizer_files / file
    size, encode, decode = _reference(tokenizer_files / file)
    assert tok.vocab_size == size
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, np.asarray(encode(text), np.int32), err_msg=repr(text))
        assert tok.decode(ids) == decode([int(i) for i in ids])
    if kind == "SentencePieceModel":  # SentencePiece normalises whitespace; the others do not
        assert tok.decode(tok.encode(SAMPLES[0])) == SAMPLES[0]
    else:
        assert all(tok.decode(tok.encode(text)) == text for text in SAMPLES)


@pytest.mark.parametrize("setting", ["byte", "sentencepiece", "tokenizer_path", "tokenizer_dir"])
def test_a_config_gets_its_tokenizer_through_the_one_loader(tokenizer_files, tmp_path, setting):
    """Training, evaluation and generation all take a run's tokenizer from run_tokenizer."""
    overrides = {"byte": ["data.tokenizer=byte"],
                 "sentencepiece": ["data.tokenizer=sentencepiece", "data.sentencepiece_vocab_size=512",
                                   "model.vocab_size=512",
                                   f"data.cache_dir={tmp_path / 'cache'}"],
                 "tokenizer_path": [f"data.tokenizer_path={tokenizer_files / 'tokenizer.json'}",
                                    "model.vocab_size=0"],
                 "tokenizer_dir": [f"data.tokenizer_path={tokenizer_files / 'spm_dir'}",
                                   "model.vocab_size=0"]}[setting]
    corpus = data.load_corpus_text()[:120_000]
    for i in range(4):  # small text files: a SentencePiece model trains on them in about a second
        _write(tmp_path / "docs" / f"d{i}.txt", corpus[i * 30_000:(i + 1) * 30_000])
    cfg = _cfg("data.source=text", f"data.text_files={tmp_path / 'docs'}", *overrides)
    tok = data.run_tokenizer(cfg)
    if setting == "byte":
        assert isinstance(tok, data.ByteTokenizer) and tok.vocab_size == 256
        assert data.tokenizer_file(cfg) is None
        np.testing.assert_array_equal(tok.encode(SAMPLES[1]), list(SAMPLES[1].encode("utf-8")))
    else:
        assert data.tokenizer_file(cfg) == tok.model_path and tok.model_path.is_file()
        assert setting != "tokenizer_dir" or tok.model_path.name == "tokenizer.model"
        size, encode, _ = _reference(tok.model_path)
        assert tok.vocab_size == size
        np.testing.assert_array_equal(tok.encode(SAMPLES[0]), encode(SAMPLES[0]))
    for text in SAMPLES[:1] if "sentencepiece" in setting or "dir" in setting else SAMPLES[:2]:
        assert tok.decode(tok.encode(text)) == text
    # The training iterator's tokenizer is the same one.
    small = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=2, seq_len=16,
                                                               eval_batches=1))
    ds = data.Dataset(small)
    assert type(ds.tokenizer) is type(tok) and ds.tokenizer.vocab_size == tok.vocab_size
    assert getattr(ds.tokenizer, "model_path", None) == getattr(tok, "model_path", None)


def test_special_ids_and_model_proto_match_the_libraries(tokenizer_files):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    path = tokenizer_files / "tok.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = data.load_tokenizer(path)
    assert tok.special_ids() == {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    assert tok.model_proto() == proto
    hf = data.load_tokenizer(HF_FIXTURE)  # its added tokens: <unk>, <s>, </s>
    assert hf.special_ids() == {"bos_token_id": 1, "eos_token_id": 2}
    assert data.load_tokenizer(tokenizer_files / "tokenizer.json").special_ids() == {}
    assert data.ByteTokenizer().special_ids() == {}


def test_unusable_tokenizers_are_one_data_error_naming_the_field(tmp_path):
    empty = tmp_path / "checkpoint"
    empty.mkdir()
    broken_json = _write(tmp_path / "bad" / "tokenizer.json", "{not json")
    cases = [
        (tmp_path / "vocab.txt", "--tokenizer",
         f"--tokenizer='{tmp_path / 'vocab.txt'}' is not a tokenizer file; allowed suffixes: "
         f"['.json', '.model']"),
        (tmp_path / "missing.json", "data.tokenizer_path",
         f"data.tokenizer_path='{tmp_path / 'missing.json'}' does not exist or is not a readable file"),
        (empty, "--hf", f"no tokenizer.json or tokenizer.model in {empty}"),
        (broken_json.parent, "--hf",
         f"--hf='{broken_json}' could not be loaded as HuggingFaceTokenizer ("),
        (_write(tmp_path / "broken.model", b"\x00\x01"), "--tokenizer",
         f"--tokenizer='{tmp_path / 'broken.model'}' could not be loaded as SentencePieceModel ("),
    ]
    for path, field, message in cases:
        with pytest.raises(data.DataError) as err:
            data.load_tokenizer(path, field=field)
        assert str(err.value).startswith(message), (path, str(err.value))
        assert "\n" not in str(err.value)


def test_an_unknown_tokenizer_kind_is_one_data_error():
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="wordpiece"))
    with pytest.raises(data.DataError) as err:
        data.run_tokenizer(cfg)
    assert str(err.value) == ("data.tokenizer='wordpiece'; allowed: ['byte', 'sentencepiece'] or "
                              "an existing file in data.tokenizer_path")


# ------------------------------------------------------------------------ bounded encoding
class _Recording(data.ByteTokenizer):
    """Byte tokens that remember the longest text they were asked to encode."""

    longest = 0

    def encode(self, text):
        self.longest = max(self.longest, len(text))
        return super().encode(text)


def test_long_documents_are_tokenized_in_bounded_pieces_with_the_same_tokens(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "the", "of", "and", "neuron", "x" * 300]
    text = " ".join(rng.choice(words, size=5000)) + " " + "y" * 2500 + " end"
    tok = _Recording()
    ids = data.encode_bounded(tok, text, limit=1000)
    assert tok.longest <= 1000
    np.testing.assert_array_equal(ids, data.ByteTokenizer().encode(text))  # bytes: exactly equal
    sp = data.SentencePieceTokenizer([" ".join(rng.choice(words[:-1], size=3000))], vocab_size=512,
                                     cache_dir=tmp_path)
    spaced = " ".join(rng.choice(words[:-1], size=4000))
    # SentencePiece starts each word at its space: cut at spaces, the pieces are the same.
    np.testing.assert_array_equal(data.encode_bounded(sp, spaced, limit=700), sp.encode(spaced))


# ------------------------------------------------------------------------ one loader only
# Calls that load a tokenizer (or a SentencePiece model's contents) from a file or a hub.
LOADING_CALLS = {"SentencePieceProcessor", "from_file", "from_str", "from_buffer",
                 "from_pretrained", "AutoTokenizer", "sentencepiece_model_pb2", "LoadFromFile",
                 "load_from_serialized_proto"}
THE_LOADER = ROOT / "sparsejax" / "data" / "tokenizers.py"


def _loading_calls(path: pathlib.Path) -> list[str]:
    """The tokenizer-loading names a Python file uses (attributes, names, imported names)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in LOADING_CALLS]
    return found


def test_no_tokenizer_is_loaded_outside_the_data_package():
    """Only sparsejax/data/tokenizers.py loads tokenizer files: training, evaluation, HF import
    and export, generation and the benchmarks all go through it."""
    files = [p for d in ("sparsejax", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    files += [ROOT / "train.py", ROOT / "eval.py"]
    assert THE_LOADER in files and len(files) > 20
    elsewhere = [hit for p in files if p != THE_LOADER for hit in _loading_calls(p)]
    assert elsewhere == [], elsewhere
    # The scan sees the loader's own calls: a second loader written the same way would be found.
    own = " ".join(_loading_calls(THE_LOADER))
    assert "SentencePieceProcessor" in own and "from_file" in own and "sentencepiece_model_pb2" in own