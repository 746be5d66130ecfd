"""What defines a run's data, recorded in every checkpoint and compared when the run resumes.

A config names its data (``data.text_files``, ``data.tfds_name``, ``data.tokenizer_path``), but the
files behind those names can change between a checkpoint and its resume: a file edited, added or
removed, a tokenizer file replaced at the same path, a TFDS dataset rebuilt in place. Any of these
silently breaks "a resumed run sees the batches an uninterrupted one would" (the record count and
the validation split are drawn from the documents). :func:`describe` fingerprints what the config
names; :func:`differences` says, in one line each, what changed.

The fingerprint, per ``data.source``:

* ``embedded``: the SHA-256 of the shipped corpus file.
* ``text``: every resolved file (absolute path, after symlinks), its size and a SHA-256 of its
  content: the whole file up to :data:`WHOLE_HASH_BYTES`; above that, the size plus
  :data:`SAMPLE_BLOCKS` blocks of :data:`SAMPLE_BLOCK_BYTES` at evenly spaced offsets (first and
  last included), so a large corpus costs seconds, not minutes. An edit to a large file that
  keeps its size and touches no sampled block is not detected.
* ``tfds``: the dataset's name, version, the record count of every split, and a SHA-256 of
  :data:`SAMPLE_RECORDS` records at evenly spaced indices of the training and evaluation splits.
* the tokenizer: its kind and vocabulary size, and for a file (``data.tokenizer_path``, or the
  cached SentencePiece model trained on the data) its path and whole-file SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

from sparsejax import data
from sparsejax.config import Config

WHOLE_HASH_BYTES = 64 << 20
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 1 << 20
SAMPLE_RECORDS = 16


def file_digest(path: str | os.PathLike) -> dict:
    """``{"size", "sha256", "hashed"}`` of one file: whole, or sampled blocks above
    :data:`WHOLE_HASH_BYTES` (``hashed`` says which)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            hashed = "whole"
        else:
            digest.update(str(size).encode())
            last = size - SAMPLE_BLOCK_BYTES
            for i in range(SAMPLE_BLOCKS):
                f.seek(last * i // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BLOCK_BYTES))
            hashed = f"{SAMPLE_BLOCKS} blocks of {SAMPLE_BLOCK_BYTES} bytes"
    return {"size": size, "sha256": digest.hexdigest(), "hashed": hashed}


def _records_digest(source, text_key) -> str:
    digest = hashlib.sha256(str(len(source)).encode())
    n = len(source)
    for i in sorted({n * j // SAMPLE_RECORDS for j in range(SAMPLE_RECORDS)} | {n - 1}):
        record = source[i]
        text = record[text_key] if text_key is not None and isinstance(record, dict) else record
        digest.update(text if isinstance(text, bytes) else str(text).encode("utf-8"))
    return digest.hexdigest()


def _embedded(cfg: Config) -> dict:
    return {"corpus": file_digest(data.CORPUS_PATH)["sha256"]}


def _text(cfg: Config) -> dict:
    files = data.resolve_text_files(cfg.data.text_files)
    return {"files": {str(pathlib.Path(f).resolve()): file_digest(f) for f in files}}


def _tfds(cfg: Config) -> dict:
    import tensorflow_datasets as tfds

    d = cfg.data
    builder = tfds.builder(d.tfds_name, data_dir=d.tfds_data_dir or None)
    out = {"name": d.tfds_name, "version": str(builder.info.version),
           "records": {name: int(split.num_examples) for name, split in
                       sorted(builder.info.splits.items())}}
    for split in ("train", "validation"):
        source, text_key = data.RECORD_SOURCES["tfds"](cfg, split)
        out[f"{split}_sample"] = _records_digest(source, text_key)
    return out


# data.source -> its fingerprint (a JSON-able dict).
SOURCES = {"embedded": _embedded, "text": _text, "tfds": _tfds}


def tokenizer_identity(tokenizer) -> dict:
    out = {"kind": type(tokenizer).__name__, "vocab_size": int(tokenizer.vocab_size)}
    path = getattr(tokenizer, "model_path", None)
    if path is not None:
        out.update(path=str(pathlib.Path(path).resolve()), sha256=file_digest(path)["sha256"])
    return out


def describe(cfg: Config, tokenizer) -> dict:
    """The fingerprint of ``cfg``'s data and ``tokenizer`` (see the module docstring)."""
    return {"source": cfg.data.source, **SOURCES[cfg.data.source](cfg),
            "tokenizer": tokenizer_identity(tokenizer)}


def _short(sha: str | None) -> str:
    return (sha or "?")[:12]


def _files_differences(old: dict, new: dict) -> list[str]:
    added = [p for p in new if p not in old]
    removed = [p for p in old if p not in new]
    changed = [f"{p} ({old[p]['size']} -> {new[p]['size']} bytes, sha256 {_short(old[p]['sha256'])}"
               f" -> {_short(new[p]['sha256'])})"
               for p in old if p in new and (old[p]["size"], old[p]["sha256"]) !=
               (new[p]["size"], new[p]["sha256"])]
    out = []
    for what, items in (("added", added), ("removed", removed), ("changed", changed)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            out.append(f"data.text_files: {len(items)} file(s) {what}: {shown}")
    return out


def differences(old: dict | None, new: dict) -> list[str]:
    """What changed between two fingerprints, one phrase each (empty: the same data). A run
    saved without a fingerprint (an older version) has nothing to compare: empty."""
    if not old:
        return []
    if old.get("source") != new.get("source"):
        return [f"data.source {old.get('source')!r} -> {new.get('source')!r}"]
    out = []
    if new["source"] == "text":
        out += _files_differences(old.get("files", {}), new["files"])
    elif new["source"] == "tfds":
        for key in ("name", "version", "records", "train_sample", "validation_sample"):
            if old.get(key) != new.get(key):
                shown = (f"{_short(old.get(key))} -> {_short(new.get(key))}" if key.endswith("sample")
                         else f"{old.get(key)} -> {new.get(key)}")
                out.append(f"TFDS dataset data.tfds_name={new['name']!r} {key.replace('_', ' ')}: "
                           f"{shown}")
    elif old.get("corpus") != new.get("corpus"):
        out.append(f"the embedded corpus: sha256 {_short(old.get('corpus'))} -> "
                   f"{_short(new.get('corpus'))}")
    a, b = old.get("tokenizer", {}), new["tokenizer"]
    if a != b:
        where = f" {b['path']}" if "path" in b else ""
        parts = [f"{k} {_short(a.get(k)) if k == 'sha256' else a.get(k)} -> "
                 f"{_short(b.get(k)) if k == 'sha256' else b.get(k)}"
                 for k in ("kind", "path", "sha256", "vocab_size") if a.get(k) != b.get(k)]
        out.append(f"tokenizer{where}: {', '.join(parts)}")
    return out
