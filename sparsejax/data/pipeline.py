"""Training and validation batches: deterministic, resumable iterators and fixed validation sets.

Every iterator yields this host's share of the global batch as numpy arrays
``{"inputs": [b, L], "targets": [b, L], "weights": [b, L]}`` and exposes ``get_state()`` /
``set_state()`` (JSON-serialisable) so a resumed run sees exactly the batches an uninterrupted one
would.

* ``embedded`` (:class:`RandomWindows`): batch ``s`` is a set of random windows of the tokenized
  corpus drawn from a generator seeded by ``(seed, s)``, so the iterator state is just the step.
* ``tfds`` and ``text`` (:class:`GrainPacked`): grain over the random-access records of
  :data:`sparsejax.data.sources.RECORD_SOURCES`: shard by host, shuffle, tokenize, pack
  documents into fixed-length rows (``ConcatThenSplitIterDataset``), batch. Packed rows may span
  document boundaries; attention is not masked across them (as in nanodo).

Validation batches are fixed: :func:`validation_batches` builds them without a training
iterator (evaluation), and :func:`sequential_batches` cuts a token stream into consecutive
windows, the one text-batching function (the embedded corpus's validation split, an imported
checkpoint's evaluation text).
"""

from __future__ import annotations

import pathlib
from typing import Iterator

import numpy as np

from sparsejax.config import Config
from sparsejax.data import sources, tokenizers
from sparsejax.data.errors import DataError


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


def sequential_batches(tokens: np.ndarray, batch: int, seq_len: int, n_batches: int, *,
                       bos_id: int | None = None, overlap: bool = True,
                       what: str = "validation split") -> list[dict]:
    """Fixed batches of consecutive windows from the start of a token stream: ``n_batches`` of
    them, fewer if the stream is shorter (DataError naming ``what`` if it is shorter than one).

    A row is ``seq_len + 1`` tokens, inputs its first ``seq_len`` and targets its last: the
    stream's next tokens, after ``bos_id`` when one is given (as documents start in training).
    ``overlap``: a row starts at the previous row's last token, so every token after the first
    is a target exactly once (the validation split of a trained run); otherwise rows are
    disjoint pieces of the stream.
    """
    width = seq_len + (bos_id is None)  # stream tokens per row
    stride = max(width - 1, 1) if overlap else width
    rows_fit = (len(tokens) - width) // stride + 1 if len(tokens) >= width else 0
    have = rows_fit // batch
    if have < 1:
        raise DataError(f"{what} has {len(tokens)} tokens, fewer than one batch "
                        f"({batch} x {width if not overlap else seq_len})")
    out = []
    for b in range(min(have, n_batches)):
        starts = (b * batch + np.arange(batch)) * stride
        window_BxW = tokens[starts[:, None] + np.arange(width)]
        if bos_id is not None:
            bos_Bx1 = np.full((batch, 1), bos_id, window_BxW.dtype)
            window_BxW = np.concatenate([bos_Bx1, window_BxW], axis=1)
        out.append(_to_example(window_BxW))
    return out


# ------------------------------------------------------------------------------ grain packing
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
            return {"tokens": tokenizers.encode_bounded(tokenizer, text)}

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


# ------------------------------------------------------------------------------------- factory
class Dataset:
    """Training iterator, fixed validation batches and the tokenizer of one config."""

    def __init__(self, cfg: Config, process_index: int = 0, process_count: int = 1):
        t = cfg.train
        if cfg.data.source == "embedded":
            train_text = sources.split_text(sources.load_corpus_text(),
                                            cfg.data.validation_fraction)[0]
            self.tokenizer = tokenizers.make_tokenizer(cfg, [train_text])
            train_tokens = self.tokenizer.encode(train_text)
            self.train = RandomWindows(train_tokens, t.batch_size, t.seq_len, t.seed,
                                       process_index, process_count)
            self.train_tokens_available = len(train_tokens)
        else:
            train_source, text_key = sources.RECORD_SOURCES[cfg.data.source](cfg, "train")
            self.tokenizer = run_tokenizer(cfg, (train_source, text_key))
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


def sentencepiece_texts(cfg: Config, train_records: tuple | None = None) -> list[str]:
    """The text a SentencePiece model of ``cfg`` is trained on (empty when it has none to train:
    byte tokens or a ``data.tokenizer_path``): the embedded corpus's training split, or the first
    20,000 training records (``train_records``: (source, text key), opened here if not given)."""
    if cfg.data.tokenizer != "sentencepiece" or cfg.data.tokenizer_path:
        return []
    if cfg.data.source == "embedded":
        return [sources.split_text(sources.load_corpus_text(), cfg.data.validation_fraction)[0]]
    train_source, text_key = train_records or sources.RECORD_SOURCES[cfg.data.source](cfg, "train")
    sample = [train_source[i] for i in range(min(20_000, len(train_source)))]
    sample = [s[text_key] if text_key is not None else s for s in sample]
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in sample]


def run_tokenizer(cfg: Config, train_records: tuple | None = None):
    """The tokenizer a run of ``cfg`` trains with (a SentencePiece model is found in
    ``data.cache_dir`` by its training text, or trained there)."""
    return tokenizers.make_tokenizer(cfg, sentencepiece_texts(cfg, train_records))


def tokenizer_file(cfg: Config) -> pathlib.Path | None:
    """The file of the run's tokenizer, read-only: ``data.tokenizer_path``, or the SentencePiece
    model trained for this config (its cache path, found from the same training text the run
    trained it on; it may have been deleted); None for the byte tokenizer."""
    if cfg.data.tokenizer_path:
        return pathlib.Path(tokenizers.tokenizer_file_in(cfg.data.tokenizer_path))
    if cfg.data.tokenizer == "byte":
        return None
    return tokenizers.SentencePieceTokenizer.cached_model(
        sentencepiece_texts(cfg), cfg.data.sentencepiece_vocab_size, cfg.data.cache_dir)


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
        valid_text = sources.split_text(sources.load_corpus_text(), cfg.data.validation_fraction)[1]
        tokenizer = tokenizer or run_tokenizer(cfg)
        # The global batches, then this host's rows: every host sees different rows, and the
        # global validation set does not depend on the number of hosts.
        rows = slice(process_index * per_host, (process_index + 1) * per_host)
        return [{k: v[rows] for k, v in b.items()} for b in sequential_batches(
            tokenizer.encode(valid_text), t.batch_size, t.seq_len, t.eval_batches)]
    records = sources.RECORD_SOURCES[cfg.data.source]
    if tokenizer is None:
        tokenizer = run_tokenizer(cfg, records(cfg, "train"))
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
