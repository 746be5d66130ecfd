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
"""

from __future__ import annotations

import gzip
import hashlib
import pathlib
from typing import Iterator, Protocol

import numpy as np

from sparsejax.config import Config

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


class SentencePieceTokenizer:
    """A SentencePiece unigram model trained on the corpus once and cached by content hash."""

    def __init__(self, texts: list[str], vocab_size: int, cache_dir: str | pathlib.Path):
        import sentencepiece as spm

        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode("utf-8"))
        cache = pathlib.Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        prefix = cache / f"spm_{vocab_size}_{digest.hexdigest()[:16]}"
        if not prefix.with_suffix(".model").exists():
            tmp_prefix = prefix.with_name(prefix.name + "_partial")
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(line for t in texts for line in t.splitlines() if line),
                model_prefix=str(tmp_prefix), vocab_size=vocab_size, model_type="unigram",
                character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False,
                minloglevel=2)
            # Rename last so a crash mid-training never leaves a half-written cached model.
            tmp_prefix.with_suffix(".vocab").replace(prefix.with_suffix(".vocab"))
            tmp_prefix.with_suffix(".model").replace(prefix.with_suffix(".model"))
        self.model_path = prefix.with_suffix(".model")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_corpus_text() -> str:
    with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
        return f.read()


def split_text(text: str, validation_fraction: float) -> tuple[str, str]:
    """(train, validation): the validation split is the tail, cut at a line break."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - validation_fraction))) + 1
    return text[:cut], text[cut:]


def make_tokenizer(cfg: Config, train_text_for_spm: list[str]):
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
class GrainPacked:
    """Any random-access source of text records -> shuffled, tokenized, packed, batched rows."""

    def __init__(self, source, text_key: str, tokenizer, global_batch: int, seq_len: int,
                 seed: int, process_index: int = 0, process_count: int = 1, repeat: bool = True):
        import grain

        if global_batch % process_count:
            raise DataError(f"train.batch_size={global_batch} is not divisible by the "
                            f"{process_count} processes")

        def tokenize(record):
            text = record[text_key] if isinstance(record, dict) else record
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            return {"tokens": tokenizer.encode(text)}

        ds = grain.MapDataset.source(source)[process_index::process_count].shuffle(seed=seed)
        if repeat:
            ds = ds.repeat()
        ds = ds.map(tokenize).to_iter_dataset()
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


def tfds_source(cfg: Config, split: str):
    """A random-access TFDS source; needs the dataset prepared under data.tfds_data_dir."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(cfg.data.tfds_name, split=split,
                                data_dir=cfg.data.tfds_data_dir or None, download=False)
    except Exception as err:  # tfds raises several types for "not prepared"
        raise DataError(
            f"TFDS dataset data.tfds_name={cfg.data.tfds_name!r} split {split!r} is not available "
            f"under data.tfds_data_dir={cfg.data.tfds_data_dir!r} ({type(err).__name__}: "
            f"{(str(err).strip().splitlines() or [''])[0][:200]}). Prepare it first with "
            f"`tfds build {cfg.data.tfds_name} --file_format=array_record` on a machine with "
            f"internet, or use --set data.source=embedded") from err


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
            train_source = tfds_source(cfg, cfg.data.tfds_train_split)
            self.tokenizer = make_tokenizer(cfg, _spm_sample(cfg, train_source))
            self.train = GrainPacked(train_source, cfg.data.tfds_text_key, self.tokenizer,
                                     t.batch_size, t.seq_len, t.seed, process_index, process_count)
            self.train_tokens_available = None
        self.validation = validation_batches(cfg, process_index, process_count, self.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise DataError(f"tokenizer has {self.tokenizer.vocab_size} tokens but "
                            f"model.vocab_size={cfg.model.vocab_size}")


def _spm_sample(cfg: Config, train_source) -> list[str]:
    """Training text for a SentencePiece model (empty for byte tokens: nothing to train)."""
    if cfg.data.tokenizer != "sentencepiece":
        return []
    sample = [train_source[i][cfg.data.tfds_text_key] for i in range(min(20_000, len(train_source)))]
    return [s.decode("utf-8") if isinstance(s, bytes) else s for s in sample]


def validation_batches(cfg: Config, process_index: int = 0, process_count: int = 1,
                       tokenizer=None) -> list[dict]:
    """This host's fixed validation batches (``train.eval_batches`` of them).

    Evaluation calls this alone: with byte tokens (or a cached SentencePiece model) the
    training split is never tokenized and no training iterator is built.
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
    tokenizer = tokenizer or make_tokenizer(
        cfg, _spm_sample(cfg, tfds_source(cfg, cfg.data.tfds_train_split)))
    valid_iter = GrainPacked(tfds_source(cfg, cfg.data.tfds_eval_split), cfg.data.tfds_text_key,
                             tokenizer, t.batch_size, t.seq_len, seed=0, process_index=process_index,
                             process_count=process_count, repeat=False)
    return [next(valid_iter) for _ in range(t.eval_batches)]
