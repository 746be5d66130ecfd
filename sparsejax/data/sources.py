"""Where training text comes from: the embedded corpus, local text files, TFDS datasets.

* ``embedded``: Tiny Shakespeare (Karpathy 2015; public-domain text, 1.1 MB, shipped gzipped in
  ``sparsejax/corpus``). The last ``validation_fraction`` of the text, cut at a line break, is
  the validation split (:func:`split_text`).
* ``text``: local ``.txt`` / ``.jsonl`` files (:func:`resolve_text_files`,
  :class:`TextDocuments`), split into training and validation documents by a fixed permutation
  (:func:`split_documents`).
* ``tfds``: ``tfds.data_source`` (ArrayRecord, random access) of a dataset prepared under
  ``data.tfds_data_dir`` (:func:`tfds_source`).

:data:`RECORD_SOURCES` gives the random-access records of one split for the sources that
:mod:`sparsejax.data.pipeline` packs with grain (``text``, ``tfds``).
"""

from __future__ import annotations

import errno
import glob
import gzip
import json
import os
import pathlib
import re
from typing import Protocol

import numpy as np

from sparsejax.config import Config
from sparsejax.data.errors import DataError

CORPUS_PATH = pathlib.Path(__file__).parents[1] / "corpus" / "tinyshakespeare.txt.gz"


# ------------------------------------------------------------------------------ embedded corpus
def load_corpus_text() -> str:
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
        return f.read()


def split_text(text: str, validation_fraction: float) -> tuple[str, str]:
    """(train, validation): the validation split is the tail, cut at a line break."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - validation_fraction))) + 1
    return text[:cut], text[cut:]


# ------------------------------------------------------------------------------------- TFDS
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
# or None when records are strings). "embedded" is not here: it samples windows
# (sparsejax.data.pipeline.RandomWindows).
RECORD_SOURCES: dict[str, RecordSource] = {"tfds": _tfds_records, "text": _text_records}

