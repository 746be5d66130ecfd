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
                                     sequential_batches, tokenizer_file, validation_batches)
from sparsejax.data.sources import (CORPUS_PATH, RECORD_SOURCES, TextDocuments, load_corpus_text,
                                    resolve_text_files, split_documents, split_text, text_sources)
from sparsejax.data.tokenizers import (TOKENIZER_FILES, ByteTokenizer, SentencePieceModel,
                                       SentencePieceTokenizer, check_config, encode_bounded,
                                       encode_prefix, load_tokenizer, tokenizer_vocab_for_config)

__all__ = [
    "CORPUS_PATH", "RECORD_SOURCES", "TOKENIZER_FILES", "ByteTokenizer", "DataError", "Dataset",
    "GrainPacked", "RandomWindows", "SentencePieceModel", "SentencePieceTokenizer",
    "TextDocuments", "check_config", "encode_bounded", "encode_prefix", "load_corpus_text",
    "load_tokenizer", "resolve_text_files", "run_tokenizer",
    "sequential_batches", "split_documents", "split_text", "text_sources", "tokenizer_file",
    "tokenizer_vocab_for_config", "validation_batches",
]
