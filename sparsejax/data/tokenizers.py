"""Tokenizers: the one place a tokenizer is loaded, trained or built from a config.

Kinds (every one has ``vocab_size``, ``encode(text) -> int32 ids``, ``decode(ids) -> text`` and
``special_ids()``):

* :class:`ByteTokenizer`: UTF-8 bytes as ids 0..255 (``data.tokenizer=byte``);
* :class:`SentencePieceTokenizer`: a SentencePiece unigram model trained on the training text
  once and cached under ``data.cache_dir`` by content hash (``data.tokenizer=sentencepiece``);
* an existing file (:func:`load_tokenizer`, by suffix, :data:`TOKENIZER_FILES`): a SentencePiece
  ``.model`` (:class:`SentencePieceModel`) or a Hugging Face ``tokenizer.json``
  (:class:`HuggingFaceTokenizer`); ``data.tokenizer_path`` of a run, ``--tokenizer`` of the
  export, or a Hugging Face checkpoint directory's ``tokenizer.json`` / ``tokenizer.model``
  (``eval.py --hf``, ``python -m sparsejax.generate --hf``).

:func:`make_tokenizer` is the tokenizer of a config (training, evaluation, generation); the class
names are part of a run's data fingerprint (:mod:`sparsejax.data_identity`).

Encoding is bounded in memory (:func:`encode_bounded`): a long document is encoded in pieces cut
at spaces, which gives the same ids for bytes, SentencePiece and byte-level BPE.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Callable

import numpy as np

from sparsejax.config import Config, ConfigError
from sparsejax.data.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

    def special_ids(self) -> dict[str, int]:
        return {}


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

    def model_proto(self):
        """The loaded model as a ``ModelProto`` (pieces, trainer and normalizer specs)."""
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        return proto

    def special_ids(self) -> dict[str, int]:
        """``bos_token_id`` / ``eos_token_id`` where the model defines them."""
        return {k: v for k, v in (("bos_token_id", self._sp.bos_id()),
                                  ("eos_token_id", self._sp.eos_id())) if v >= 0}


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

    def special_ids(self) -> dict[str, int]:
        """``bos_token_id`` / ``eos_token_id``: the ids of ``<s>`` / ``</s>`` where it has them."""
        return {k: self._tok.token_to_id(t) for k, t in (("bos_token_id", "<s>"),
                                                         ("eos_token_id", "</s>"))
                if self._tok.token_to_id(t) is not None}


# Tokenizer file suffix -> its loader.
TOKENIZER_FILES: dict[str, Callable] = {".model": SentencePieceModel, ".json": HuggingFaceTokenizer}
# The tokenizer files of a Hugging Face checkpoint directory, in the order they are looked for.
CHECKPOINT_FILES = ("tokenizer.json", "tokenizer.model")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def tokenizer_file_in(path: str | pathlib.Path) -> str | pathlib.Path:
    """``path`` itself, or for a directory the first of its :data:`CHECKPOINT_FILES` (DataError
    if it has none)."""
    if not os.path.isdir(path):
        return path
    found = [pathlib.Path(path) / name for name in CHECKPOINT_FILES
             if (pathlib.Path(path) / name).is_file()]
    if not found:
        raise DataError(f"no {' or '.join(CHECKPOINT_FILES)} in {path}")
    return found[0]


def load_tokenizer(path: str | pathlib.Path, field: str = "data.tokenizer_path"):
    """The tokenizer in ``path``: a SentencePiece ``.model`` or a Hugging Face ``tokenizer.json``
    file, or a checkpoint directory holding one of :data:`CHECKPOINT_FILES` (the first found).

    ``field`` is the config field or flag that named ``path``: anything unusable (no such file, an
    unknown suffix, a file its library cannot read) is a :class:`DataError`, one line naming it.
    """
    path = str(tokenizer_file_in(path))
    where = f"{field}={path!r}"
    loader = TOKENIZER_FILES.get(pathlib.Path(path).suffix)
    if loader is None:
        raise DataError(f"{where} is not a tokenizer file; allowed suffixes: {sorted(TOKENIZER_FILES)} "
                        f"(SentencePiece .model, Hugging Face tokenizer.json)")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise DataError(f"{where} does not exist or is not a readable file")
    try:
        return loader(path)
    except Exception as err:  # each library raises its own types for a damaged file
        raise DataError(f"{where} could not be loaded as {loader.__name__} "
                        f"({type(err).__name__}: {_first_line(err)})") from None


def tokenizer_vocab_for_config(cfg: Config) -> int:
    """The vocabulary size of ``data.tokenizer_path`` (ConfigError if it cannot be read)."""
    try:
        return load_tokenizer(cfg.data.tokenizer_path).vocab_size
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
            raise DataError(f"data.cache_dir={str(cache_dir)!r}: the cached SentencePiece model "
                            f"{prefix.with_suffix('.model')} cannot be loaded ({type(err).__name__}: "
                            f"{_first_line(err)}); delete it and it is trained again") from None

    @staticmethod
    def cached_model(texts: list[str], vocab_size: int, cache_dir: str | pathlib.Path) -> pathlib.Path:
        """Where the model trained on ``texts`` is cached (by content hash; it may not exist)."""
        digest = hashlib.sha256()
        for text in texts:
            digest.update(text.encode("utf-8"))
        return pathlib.Path(cache_dir) / f"spm_{vocab_size}_{digest.hexdigest()[:16]}.model"


# data.tokenizer -> (config, training texts) -> tokenizer; data.tokenizer_path replaces them.
TOKENIZER_KINDS: dict[str, Callable] = {
    "byte": lambda cfg, texts: ByteTokenizer(),
    "sentencepiece": lambda cfg, texts: SentencePieceTokenizer(
        texts, cfg.data.sentencepiece_vocab_size, cfg.data.cache_dir),
}


def make_tokenizer(cfg: Config, train_texts: list[str]):
    """The tokenizer of ``cfg``: ``data.tokenizer_path`` if set, else ``data.tokenizer``'s kind
    (a SentencePiece model is trained on ``train_texts``, or found in the cache)."""
    if cfg.data.tokenizer_path:
        return load_tokenizer(cfg.data.tokenizer_path)
    build = TOKENIZER_KINDS.get(cfg.data.tokenizer)
    if build is None:
        raise DataError(f"data.tokenizer={cfg.data.tokenizer!r}; allowed: {sorted(TOKENIZER_KINDS)} "
                        f"or an existing file in data.tokenizer_path")
    return build(cfg, train_texts)


# ------------------------------------------------------------------------------------ encoding
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


def encode_prefix(tokenizer, text: str, need_tokens: int) -> np.ndarray:
    """Tokens of (a prefix of) ``text``: enough for ``need_tokens``, without encoding a whole
    large file (prefixes cut at a line break, doubled until long enough)."""
    chars = max(need_tokens * 8, 4096)
    while True:
        cut = len(text) if chars >= len(text) else (text.rfind("\n", 0, chars) + 1 or chars)
        tokens = tokenizer.encode(text[:cut])
        if len(tokens) >= need_tokens or cut >= len(text):
            return tokens
        chars *= 2


SENTENCE_CHARS = 4000  # below SentencePiece's max_sentence_length (4192 bytes by default)


def _sentences(texts: list[str]):
    """The lines of ``texts`` as SentencePiece training sentences, a long line cut at spaces into
    pieces of at most :data:`SENTENCE_CHARS` characters (the trainer skips longer ones, so a
    corpus of long one-line documents would leave it nothing to train on)."""
    for text in texts:
        for line in text.splitlines():
            yield from (piece for piece in _pieces(line, SENTENCE_CHARS, False) if piece)
