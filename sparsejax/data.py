"""Training data: an offline default corpus, TFDS through grain, byte or SentencePiece tokens.

Every iterator yields this host's share of the global batch as numpy arrays
``{"inputs": [b, L], "targets": [b, L], "weights": [b, L]}`` and exposes ``get_state()`` /
``set_state()`` (JSON-serialisable) so a resumed run sees exactly the batches an uninterrupted one
would.

* ``embedded``: Tiny Shakespeare (Karpathy 2015; public-domain text, 1.1 MB, shipped gzipped in
  ``sparsejax/corpus``). The last ``validation_fraction`` of the text, cut at a line break, is
  the validation split. Batch ``s`` is a set of random windows drawn from a generator seeded by
  ``(seed, s)``, so the iterator state is just the step.
* ``tfds``: ``tfds.data_source`` (ArrayRecord, random access) + grain: shard by host, shuffle,
  tokenize, pack documents into fixed-length rows (``ConcatThenSplitIterDataset``), batch. Packed
  rows may span document boundaries; attention is not masked across them (as in nanodo).
* ``text``: local ``.txt`` / ``.jsonl`` files (:class:`TextDocuments`), split into training and
  validation documents, then the same grain pipeline as ``tfds``.

Tokens: bytes, a SentencePiece model trained on the training text, or an existing tokenizer file
(``data.tokenizer_path``: a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``).
"""

from __future__ import annotations

import errno
import glob
import gzip
import hashlib
import json
import os
import pathlib
import re
from typing import Iterator, Protocol

import numpy as np

from sparsejax.config import Config, ConfigError

CORPUS_PATH = pathlib.Path(__file__).parent / "corpus" / "tinyshakespeare.txt.gz"


class DataError(ValueError):
    pass


class Batches(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


# ---------------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class SentencePieceModel:
    """An existing SentencePiece ``.model`` file."""

    def __init__(self, model_path: str | pathlib.Path):
        import sentencepiece as spm

        self.model_path = pathlib.Path(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
    """An existing Hugging Face ``tokenizer.json`` (the ``tokenizers`` package), no special tokens
    added: documents are packed back to back as with the other tokenizers."""

    def __init__(self, path: str | pathlib.Path):
        import tokenizers

        self.model_path = pathlib.Path(path)
        self._tok = tokenizers.Tokenizer.from_file(str(self.model_path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


# data.tokenizer_path suffix -> loader.
TOKENIZER_FILES = {".model": SentencePieceModel, ".json": HuggingFaceTokenizer}


def load_tokenizer_file(path: str):
    """The tokenizer in ``path``; DataError (one line naming ``data.tokenizer_path``) if unusable."""
    where = f"data.tokenizer_path={path!r}"
    loader = TOKENIZER_FILES.get(pathlib.Path(path).suffix)
    if loader is None:
        raise DataError(f"{where} is not a tokenizer file; allowed suffixes: {sorted(TOKENIZER_FILES)} "
                        f"(SentencePiece .model, Hugging Face tokenizer.json)")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise DataError(f"{where} does not exist or is not a readable file")
    try:
        return loader(path)
    except Exception as err:  # each library raises its own types for a damaged file
        text = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{where} could not be loaded as {loader.__name__} "
                        f"({type(err).__name__}: {text})") from None


def tokenizer_file_vocab_size(path: str) -> int:
    return load_tokenizer_file(path).vocab_size


def tokenizer_vocab_for_config(cfg: Config) -> int:
    """The vocabulary size of ``data.tokenizer_path`` (ConfigError if it cannot be read)."""
    try:
        return tokenizer_file_vocab_size(cfg.data.tokenizer_path)
    except DataError as err:
        raise ConfigError(str(err)) from None


def check_config(cfg: Config) -> None:
    """With an existing tokenizer (``data.tokenizer_path``) the embedding has exactly its
    vocabulary; ``model.vocab_size=0`` must have been resolved to it first."""
    if not cfg.data.tokenizer_path:
        return
    size, m = tokenizer_vocab_for_config(cfg), cfg.model
    if m.vocab_size == 0:
        raise ConfigError(f"model.vocab_size=0 (take it from data.tokenizer_path) is resolved by "
                          f"configure.load / configure.apply_overrides; set it to {size}")
    if m.vocab_size != size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} disagrees with the {size}-token vocabulary of "
            f"data.tokenizer_path={cfg.data.tokenizer_path!r}; set model.vocab_size={size} (or 0 "
            f"to take it from the tokenizer)")


class SentencePieceTokenizer(SentencePieceModel):
    """A SentencePiece unigram model trained on the corpus once and cached by content hash."""

    def __init__(self, texts: list[str], vocab_size: int, cache_dir: str | pathlib.Path):
        import sentencepiece as spm

        prefix = self.cached_model(texts, vocab_size, cache_dir).with_suffix("")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if not prefix.with_suffix(".model").exists():
            tmp_prefix = prefix.with_name(prefix.name + "_partial")
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sentences(texts),
                model_prefix=str(tmp_prefix), vocab_size=vocab_size, model_type="unigram",
                character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False,
                minloglevel=2)
            # Rename last so a crash mid-training never leaves a half-written cached model.
            tmp_prefix.with_suffix(".vocab").replace(prefix.with_suffix(".vocab"))
            tmp_prefix.with_suffix(".model").replace(prefix.with_suffix(".model"))
        try:
            super().__init__(prefix.with_suffix(".model"))
        except Exception as err:  # sentencepiece raises plain RuntimeErrors for damaged files
            text = (str(err).strip().splitlines() or [""])[0][:200]
            raise DataError(f"data.cache_dir={str(cache_dir)!r}: the cached SentencePiece model "
                            f"{prefix.with_suffix('.model')} cannot be loaded ({type(err).__name__}: "
                            f"{text}); delete it and it is trained again") from None

    @staticmethod
    def cached_model(texts: list[str], vocab_size: int, cache_dir: str | pathlib.Path) -> pathlib.Path:
        """Where the model trained on ``texts`` is cached (by content hash; it may not exist)."""
        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode("utf-8"))
        return pathlib.Path(cache_dir) / f"spm_{vocab_size}_{digest.hexdigest()[:16]}.model"


ENCODE_CHARS = 1 << 16  # a document is tokenized in pieces of at most this many characters


def _pieces(text: str, limit: int, keep_space: bool):
    """``text`` cut at spaces into pieces of at most ``limit`` characters (at ``limit`` where a
    stretch has no space). ``keep_space``: the space starts the next piece (so that bytes and
    byte-level BPE see the same text); otherwise it is dropped."""
    start = 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + limit // 2, start + limit)
        cut = cut if cut > start else start + limit
        yield text[start:cut]
        start = cut if keep_space else cut + (text[cut:cut + 1] == " ")
    if start < len(text):
        yield text[start:]


def encode_bounded(tokenizer, text: str, limit: int = ENCODE_CHARS) -> np.ndarray:
    """``tokenizer.encode(text)`` with memory bounded by ``limit`` characters, not by the
    document: a long document is encoded in pieces cut at spaces (the space starts the next
    piece) and the ids joined. SentencePiece's unigram lattice and a ``tokenizer.json``'s
    encoding objects grow with their input (gigabytes for a document of megabytes); cut at a
    space, byte tokens are exactly the same, and SentencePiece and byte-level BPE, which start
    a word at its space, give the same pieces."""
    if len(text) <= limit:
        return tokenizer.encode(text)
    return np.concatenate([tokenizer.encode(piece) for piece in _pieces(text, limit, True)])


SENTENCE_CHARS = 4000  # below SentencePiece's max_sentence_length (4192 bytes by default)


def _sentences(texts: list[str]):
    """The lines of ``texts`` as SentencePiece training sentences, a long line cut at spaces into
    pieces of at most :data:`SENTENCE_CHARS` characters (the trainer skips longer ones, so a
    corpus of long one-line documents would leave it nothing to train on)."""
    for text in texts:
        for line in text.splitlines():
            yield from (piece for piece in _pieces(line, SENTENCE_CHARS, False) if piece)


def load_corpus_text() -> str:
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
        return f.read()


def split_text(text: str, validation_fraction: float) -> tuple[str, str]:
    """(train, validation): the validation split is the tail, cut at a line break."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - validation_fraction))) + 1
    return text[:cut], text[cut:]


def make_tokenizer(cfg: Config, train_text_for_spm: list[str]):
    if cfg.data.tokenizer_path:
        return load_tokenizer_file(cfg.data.tokenizer_path)
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    return SentencePieceTokenizer(train_text_for_spm, cfg.data.sentencepiece_vocab_size,
                                  cfg.data.cache_dir)


# ------------------------------------------------------------------------------ embedded corpus
class RandomWindows:
    """Batch ``step`` = windows at offsets drawn from ``default_rng([seed, step])``.

    Every host draws the same global set of offsets and keeps its own rows, so the global batch
    does not depend on the number of hosts.
    """

    def __init__(self, tokens: np.ndarray, global_batch: int, seq_len: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if len(tokens) < seq_len + 2:
            raise DataError(f"corpus has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        if global_batch % process_count:
            raise DataError(f"train.batch_size={global_batch} is not divisible by the "
                            f"{process_count} processes")
        self.tokens, self.global_batch, self.seq_len, self.seed = tokens, global_batch, seq_len, seed
        per_host = global_batch // process_count
        self.rows = slice(process_index * per_host, (process_index + 1) * per_host)
        self.step = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch)
        self.step += 1
        window_BxL1 = self.tokens[starts[self.rows, None] + np.arange(self.seq_len + 1)]
        return _to_example(window_BxL1)

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def _to_example(window_BxL1: np.ndarray) -> dict[str, np.ndarray]:
    window_BxL1 = window_BxL1.astype(np.int32)
    return {"inputs": window_BxL1[:, :-1], "targets": window_BxL1[:, 1:],
            "weights": np.ones(window_BxL1[:, 1:].shape, np.float32)}


def sequential_batches(tokens: np.ndarray, batch: int, seq_len: int, n_batches: int) -> list[dict]:
    """Non-overlapping windows from the start of a token stream (fixed validation set)."""
    needed = batch * n_batches * seq_len + 1
    if len(tokens) < needed:
        n_batches = max(1, (len(tokens) - 1) // (batch * seq_len))
        if (len(tokens) - 1) < batch * seq_len:
            raise DataError(f"validation split has {len(tokens)} tokens, fewer than one batch "
                            f"({batch} x {seq_len})")
    out = []
    for b in range(n_batches):
        starts = (b * batch + np.arange(batch)) * seq_len
        out.append(_to_example(tokens[starts[:, None] + np.arange(seq_len + 1)]))
    return out


# ----------------------------------------------------------------------------------- grain/TFDS
READ_THREADS, READ_AHEAD = 2, 8  # grain read options of the packed pipelines


class GrainPacked:
    """Any random-access source of text records -> shuffled, tokenized, packed, batched rows."""

    def __init__(self, source, text_key: str, tokenizer, global_batch: int, seq_len: int,
                 seed: int, process_index: int = 0, process_count: int = 1, repeat: bool = True):
        import grain

        if global_batch % process_count:
            raise DataError(f"train.batch_size={global_batch} is not divisible by the "
                            f"{process_count} processes")
        if len(source) < process_count:
            raise DataError(f"the data source has {len(source)} records, fewer than the "
                            f"{process_count} processes that each read their own share")
        # Each process reads every process_count-th record: disjoint shares of the source.
        self.shard = f"records {process_index}::{process_count} of {len(source)}"

        def tokenize(record):
            text = record[text_key] if isinstance(record, dict) else record
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            return {"tokens": encode_bounded(tokenizer, text)}

        ds = grain.MapDataset.source(source)[process_index::process_count].shuffle(seed=seed)
        if repeat:
            ds = ds.repeat()
        # Few records read ahead: grain's default (16 threads, 500 records) holds up to 500
        # tokenized documents at once, gigabytes when documents are megabytes long.
        ds = ds.map(tokenize).to_iter_dataset(grain.ReadOptions(
            num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD))
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
        self._iter = iter(ds.batch(global_batch // process_count, drop_remainder=True))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return _to_example(np.asarray(next(self._iter)["tokens"]))

    def get_state(self) -> dict:
        return _jsonable(self._iter.get_state())

    def set_state(self, state: dict) -> None:
        self._iter.set_state(_untuple(state))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return {"__tuple__": [_jsonable(v) for v in value]}
    return value


def _untuple(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_untuple(v) for v in value["__tuple__"])
        return {k: _untuple(v) for k, v in value.items()}
    return value


def _split_names(split: str) -> list[str]:
    """The split names in a TFDS split spec: "train[:90%]+validation" -> [train, validation]."""
    return [re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")]


def tfds_source(cfg: Config, split: str, field: str):
    """A random-access TFDS source; needs the dataset prepared under data.tfds_data_dir.

    ``field`` is the config field that named ``split``: a split or text key the dataset lacks is
    one line naming that field and what the dataset has.
    """
    import tensorflow_datasets as tfds

    d = cfg.data
    try:
        builder = tfds.builder(d.tfds_name, data_dir=d.tfds_data_dir or None)
        if not builder.is_prepared():
            raise FileNotFoundError(f"no prepared dataset under {builder.data_dir}")
    except Exception as err:  # tfds raises several types for "not prepared"
        raise DataError(
            f"TFDS dataset data.tfds_name={d.tfds_name!r} split {split!r} is not available "
            f"under data.tfds_data_dir={d.tfds_data_dir!r} ({type(err).__name__}: "
            f"{(str(err).strip().splitlines() or [''])[0][:200]}). Prepare it first with "
            f"`tfds build {d.tfds_name} --file_format=array_record` on a machine with "
            f"internet (or, for local text, `python -m sparsejax.tfds_build`), or use "
            f"--set data.source=embedded") from err
    splits = sorted(builder.info.splits.keys())
    slice_hint = (f"slices look like train[:90%], train[1000:], train[10%:20%] or "
                  f"train[:90%]+validation; its splits: "
                  f"{ {k: int(v.num_examples) for k, v in sorted(builder.info.splits.items())} }")
    if any("[" in name or "]" in name for name in _split_names(split)):
        raise DataError(f"{field}={split!r} is not a valid TFDS split slice (unbalanced "
                        f"brackets); {slice_hint}")
    missing = [name for name in _split_names(split) if name not in splits]
    if missing:
        raise DataError(f"{field}={split!r}: TFDS dataset {d.tfds_name!r} has no split "
                        f"{missing[0]!r}; its splits: {splits}")
    features = sorted(builder.info.features.keys())
    if d.tfds_text_key not in features:
        raise DataError(f"data.tfds_text_key={d.tfds_text_key!r} is not a feature of TFDS dataset "
                        f"{d.tfds_name!r}; its features: {features}")
    try:
        source = builder.as_data_source(split=split)
        len(source)  # a reversed slice (train[5:2]) fails only here
        return source
    except Exception as err:  # e.g. prepared in TFRecord format: no random access
        text = (str(err).strip().splitlines() or [''])[0][:200]
        if "[" in split and ("split" in text.lower() or "slice" in text.lower()
                             or "__len__" in text):
            raise DataError(f"{field}={split!r} is not a valid slice of TFDS dataset "
                            f"{d.tfds_name!r} ({type(err).__name__}: {text}); "
                            f"{slice_hint}") from None
        raise DataError(
            f"TFDS dataset data.tfds_name={d.tfds_name!r} split {split!r} cannot be read with random "
            f"access ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}); "
            f"prepare it with --file_format=array_record") from err


# ------------------------------------------------------------------------------ local text files
TEXT_SUFFIXES = (".txt", ".jsonl")


def resolve_text_files(patterns) -> list[pathlib.Path]:
    """Files named by ``data.text_files``: paths, directories (their .txt / .jsonl files, searched
    recursively) and glob patterns, in sorted order without repeats.

    A file reached by several paths (a symlink, or a symlinked directory: a recursive glob that
    follows a symlink cycle meets the same files again and again, until the kernel stops
    resolving the path) is kept once, by the first path that names it, so one document is never
    counted twice nor in both splits."""
    files: list[pathlib.Path] = []
    seen: set[pathlib.Path] = set()  # resolved paths of the files kept
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise DataError(f"data.text_files pattern {pattern!r} matches no file")
        elif os.path.isdir(expanded):
            matches = sorted(str(p) for p in pathlib.Path(expanded).rglob("*")
                             if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not matches:
                raise DataError(f"data.text_files directory {pattern!r} holds no "
                                f"{' or '.join(TEXT_SUFFIXES)} file")
        elif os.path.exists(expanded):
            matches = [expanded]
        else:
            raise DataError(f"data.text_files: {pattern!r} does not exist")
        for match in matches:
            path = pathlib.Path(match)
            if path.is_dir():
                continue  # a glob such as docs/** also yields directories
            if not path.is_file():
                try:
                    os.stat(match)
                except OSError as err:
                    if err.errno == errno.ELOOP:
                        continue  # deeper round a symlink cycle than the kernel follows
                raise DataError(f"data.text_files: {match} is not a regular file")
            if path.suffix not in TEXT_SUFFIXES:
                raise DataError(f"data.text_files: {match} is not a text file; allowed suffixes: "
                                f"{list(TEXT_SUFFIXES)}")
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                files.append(path)
    return files


class TextDocuments:
    """The documents of local text files, random access (a grain source).

    A ``.txt`` file is one document; each non-blank line of a ``.jsonl`` file is one (its
    ``text_key`` field). Every file is read and checked once here (readable, UTF-8, JSON with the
    text field), so a bad file is an error before training, naming it; documents are read again on
    access, so memory holds only their offsets.
    """

    def __init__(self, files: list[pathlib.Path], text_key: str):
        self.files, self.text_key = [str(f) for f in files], text_key
        refs = []  # (file index, byte start, byte end) per non-empty document
        for index, path in enumerate(files):
            try:
                raw = pathlib.Path(path).read_bytes()
            except OSError as err:
                raise DataError(f"data.text_files: cannot read {path} ({err.strerror or err})") from None
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line = raw.count(b"\n", 0, err.start) + 1
                raise DataError(f"data.text_files: {path} is not UTF-8 text (line {line}, byte "
                                f"{err.start}: {err.reason})") from None
            if pathlib.Path(path).suffix == ".txt":
                if raw.strip():
                    refs.append((index, 0, len(raw)))
                continue
            start = 0
            for number, line in enumerate(raw.split(b"\n"), start=1):
                end = start + len(line)
                if line.strip() and self._parse(line, path, number):
                    refs.append((index, start, end))
                start = end + 1
        if not refs:
            raise DataError(f"data.text_files: {len(files)} file(s) hold no non-empty document")
        self.refs = np.asarray(refs, dtype=np.int64)

    def _parse(self, line: bytes, path, number: int) -> str:
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"data.text_files: {path} line {number} is not JSON ({err})") from None
        if not isinstance(record, dict) or self.text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"data.text_key={self.text_key!r} is not in {path} line {number}; "
                            f"it has {keys}")
        text = record[self.text_key]
        if not isinstance(text, str):
            raise DataError(f"data.text_key={self.text_key!r} in {path} line {number} is a "
                            f"{type(text).__name__}, not a string")
        return text

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> str:
        file_index, start, end = (int(x) for x in self.refs[index])
        path = self.files[file_index]
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        if path.endswith(".jsonl"):
            return json.loads(raw)[self.text_key]
        return raw.decode("utf-8")


class Subset:
    """Records ``indices`` of a random-access source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]


def split_documents(n_documents: int, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices: a fixed random ``validation_fraction`` of the
    documents (at least one) is held out. The permutation's seed is fixed, not train.seed, so
    runs with different seeds validate on the same documents."""
    if n_documents < 2:
        raise DataError(f"data.text_files hold {n_documents} document; a validation split by "
                        f"document needs at least 2 (a .txt file is one document, a .jsonl line one)")
    n_valid = min(n_documents - 1, max(1, round(n_documents * validation_fraction)))
    order = np.random.default_rng(0).permutation(n_documents)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


_TEXT_CACHE: dict = {}


def text_sources(cfg: Config) -> tuple[Subset, Subset]:
    """(train, validation) documents of data.text_files. The files are indexed once per process
    (training and validation both ask) unless one changed since (size or mtime)."""
    files = resolve_text_files(cfg.data.text_files)
    key = (tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files),
           cfg.data.text_key, cfg.data.validation_fraction)
    if key not in _TEXT_CACHE:
        documents = TextDocuments(files, cfg.data.text_key)
        train, valid = split_documents(len(documents), cfg.data.validation_fraction)
        _TEXT_CACHE.clear()  # one corpus at a time: the offsets of a large one are not small
        _TEXT_CACHE[key] = Subset(documents, train), Subset(documents, valid)
    return _TEXT_CACHE[key]


# ---------------------------------------------------------------------------- record sources
class RecordSource(Protocol):
    """What a grain-packed data.source provides: random-access records of one split."""

    def __call__(self, cfg: Config, split: str) -> tuple[object, str]: ...


def _tfds_records(cfg: Config, split: str):
    field = {"train": "data.tfds_train_split", "validation": "data.tfds_eval_split"}[split]
    name = cfg.data.tfds_train_split if split == "train" else cfg.data.tfds_eval_split
    return tfds_source(cfg, name, field), cfg.data.tfds_text_key


def _text_records(cfg: Config, split: str):
    train, valid = text_sources(cfg)
    return (train if split == "train" else valid), None


# data.source -> (cfg, "train" | "validation") -> (random-access source, text key of its records
# or None when records are strings). "embedded" is not here: it samples windows (RandomWindows).
RECORD_SOURCES: dict[str, RecordSource] = {"tfds": _tfds_records, "text": _text_records}


# ------------------------------------------------------------------------------------- factory
class Dataset:
    """Training iterator, fixed validation batches and the tokenizer of one config."""

    def __init__(self, cfg: Config, process_index: int = 0, process_count: int = 1):
        t = cfg.train
        if cfg.data.source == "embedded":
            train_text, valid_text = split_text(load_corpus_text(), cfg.data.validation_fraction)
            self.tokenizer = make_tokenizer(cfg, [train_text])
            train_tokens = self.tokenizer.encode(train_text)
            self.train = RandomWindows(train_tokens, t.batch_size, t.seq_len, t.seed,
                                       process_index, process_count)
            self.train_tokens_available = len(train_tokens)
        else:
            train_source, text_key = RECORD_SOURCES[cfg.data.source](cfg, "train")
            self.tokenizer = make_tokenizer(cfg, _spm_sample(cfg, train_source, text_key))
            self.train = GrainPacked(train_source, text_key, self.tokenizer, t.batch_size,
                                     t.seq_len, t.seed, process_index, process_count)
            self.train_tokens_available = None
        self.validation = validation_batches(cfg, process_index, process_count, self.tokenizer)
        # This process's own count; a multi-process trainer keeps the count every process has.
        self.own_validation_batches = len(self.validation)
        self.identity: dict | None = None  # the trainer's data_identity.describe of this data
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise DataError(f"tokenizer has {self.tokenizer.vocab_size} tokens but "
                            f"model.vocab_size={cfg.model.vocab_size}")


def tokenizer_file(cfg: Config) -> pathlib.Path | None:
    """The file of the run's tokenizer, read-only: ``data.tokenizer_path``, or the SentencePiece
    model trained for this config (its cache path, found from the same training text the run
    trained it on; it may have been deleted); None for the byte tokenizer."""
    if cfg.data.tokenizer_path:
        return pathlib.Path(cfg.data.tokenizer_path)
    if cfg.data.tokenizer == "byte":
        return None
    if cfg.data.source == "embedded":
        texts = [split_text(load_corpus_text(), cfg.data.validation_fraction)[0]]
    else:
        train_source, text_key = RECORD_SOURCES[cfg.data.source](cfg, "train")
        texts = _spm_sample(cfg, train_source, text_key)
    return SentencePieceTokenizer.cached_model(texts, cfg.data.sentencepiece_vocab_size,
                                               cfg.data.cache_dir)


def _spm_sample(cfg: Config, train_source, text_key: str | None) -> list[str]:
    """Training text for a SentencePiece model (empty when there is nothing to train)."""
    if cfg.data.tokenizer != "sentencepiece" or cfg.data.tokenizer_path:
        return []
    sample = [train_source[i] for i in range(min(20_000, len(train_source)))]
    sample = [s[text_key] if text_key is not None else s for s in sample]
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in sample]


def validation_batches(cfg: Config, process_index: int = 0, process_count: int = 1,
                       tokenizer=None) -> list[dict]:
    """This host's fixed validation batches (``train.eval_batches`` of them, fewer if the split
    is shorter).

    Evaluation calls this alone: with byte tokens, an existing tokenizer or a cached SentencePiece
    model the training split is never tokenized and no training iterator is built.
    """
    t = cfg.train
    per_host = t.batch_size // process_count
    if cfg.data.source == "embedded":
        train_text, valid_text = split_text(load_corpus_text(), cfg.data.validation_fraction)
        tokenizer = tokenizer or make_tokenizer(cfg, [train_text])
        # The global batches, then this host's rows: every host sees different rows, and the
        # global validation set does not depend on the number of hosts.
        rows = slice(process_index * per_host, (process_index + 1) * per_host)
        return [{k: v[rows] for k, v in b.items()} for b in sequential_batches(
            tokenizer.encode(valid_text), t.batch_size, t.seq_len, t.eval_batches)]
    records = RECORD_SOURCES[cfg.data.source]
    if tokenizer is None:
        train_source, text_key = records(cfg, "train")
        tokenizer = make_tokenizer(cfg, _spm_sample(cfg, train_source, text_key))
    valid_source, text_key = records(cfg, "validation")
    valid_iter = GrainPacked(valid_source, text_key, tokenizer, t.batch_size, t.seq_len, seed=0,
                             process_index=process_index, process_count=process_count, repeat=False)
    batches = []
    for _ in range(t.eval_batches):
        try:
            batches.append(next(valid_iter))
        except StopIteration:
            break
    if not batches:
        raise DataError(f"validation split has fewer tokens than one batch of this process "
                        f"({per_host} x {t.seq_len + 1}); lower train.batch_size or train.seq_len, "
                        f"or add validation documents")
    return batches
