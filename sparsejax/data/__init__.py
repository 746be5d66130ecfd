"""Training data: where text comes from, how it becomes tokens, how tokens become batches.

* :mod:`sparsejax.data.tokenizers`: the one tokenizer loader (byte, SentencePiece trained and
  cached, an existing SentencePiece ``.model`` or Hugging Face ``tokenizer.json``, a checkpoint
  directory's tokenizer) and bounded encoding;
* :mod:`sparsejax.data.sources`: the embedded corpus, local text files, TFDS datasets;
* :mod:`sparsejax.data.pipeline`: deterministic, resumable training iterators (random windows,
  grain packing), fixed validation batches, the one text-batching function
  (:func:`sequential_batches`).

The names below are the package's public interface (``from sparsejax import data``).
Module-level settings (``pipeline.READ_THREADS``, ``pipeline.READ_AHEAD``) are read from their
module: set them there, not here.
"""

from sparsejax.data.errors import DataError
from sparsejax.data.pipeline import (Dataset, GrainPacked, RandomWindows, run_tokenizer,
                                     sentencepiece_texts, sequential_batches, tokenizer_file,
                                     validation_batches)
from sparsejax.data.sources import (CORPUS_PATH, RECORD_SOURCES, TEXT_SUFFIXES, Subset,
                                    TextDocuments, load_corpus_text, resolve_text_files,
                                    split_documents, split_text, text_sources, tfds_source)
from sparsejax.data.tokenizers import (TOKENIZER_FILES, TOKENIZER_KINDS, ByteTokenizer,
                                       HuggingFaceTokenizer, SentencePieceModel,
                                       SentencePieceTokenizer, check_config, encode_bounded,
                                       encode_prefix, load_tokenizer, make_tokenizer,
                                       tokenizer_vocab_for_config)

__all__ = [
    "CORPUS_PATH", "RECORD_SOURCES", "TEXT_SUFFIXES", "TOKENIZER_FILES", "TOKENIZER_KINDS",
    "ByteTokenizer", "DataError", "Dataset", "GrainPacked", "HuggingFaceTokenizer",
    "RandomWindows", "SentencePieceModel", "SentencePieceTokenizer", "Subset", "TextDocuments",
    "check_config", "encode_bounded", "encode_prefix", "load_corpus_text", "load_tokenizer",
    "make_tokenizer", "resolve_text_files", "run_tokenizer", "sentencepiece_texts",
    "sequential_batches", "split_documents", "split_text", "text_sources", "tfds_source",
    "tokenizer_file", "tokenizer_vocab_for_config", "validation_batches",
]
