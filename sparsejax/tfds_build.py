"""Build a TFDS dataset in ArrayRecord format from text, offline: no download, no TensorFlow.

    # the embedded corpus (Tiny Shakespeare), one document per speech:
    python -m sparsejax.tfds_build --data-dir ~/tensorflow_datasets
    # your own .txt / .jsonl files (a .txt file is one document, a .jsonl line one):
    python -m sparsejax.tfds_build --data-dir DIR --name my_corpus --text-files 'docs/*.jsonl'

then train on it through ``tfds.data_source`` and grain:

    python train.py --config configs/tiny_relu.py --workdir runs/x --set data.source=tfds \\
        --set data.tfds_name=NAME --set data.tfds_data_dir=DIR --set data.tfds_eval_split=validation

The dataset has splits ``train`` and ``validation`` (a held-out share of the documents,
``--validation-fraction``) and one feature, ``text``. Exit 2 with one line for bad input.

A dataset directory ``DIR/NAME`` that exists already is refused (training would go on reading the
old records); ``--overwrite`` rebuilds it atomically: the new dataset is written beside it
(``DIR/.NAME.building-PID``), then swapped in with one rename (``renameat2(RENAME_EXCHANGE)``;
where the kernel lacks it, two renames), and the old one is deleted only after the swap, so a
build that fails or is killed leaves the old dataset as it was.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.resources
import importlib.resources.abc  # noqa: F401  (the shim below needs the submodule loaded)
import os
import pathlib
import re
import shutil
import sys
import types

from sparsejax import data

# tensorflow_datasets 4.9 imports the `importlib_resources` backport that it declares only for
# Python < 3.9 (dataset_builder.code_path); the standard library module has what it uses.
try:
    import importlib_resources  # noqa: F401
except ImportError:
    sys.modules["importlib_resources"] = importlib.resources

DEFAULT_NAME = "sparsejax_shakespeare"


def embedded_documents(validation_fraction: float) -> dict[str, list[str]]:
    """The embedded corpus cut into documents at blank lines (one speech each). The validation
    documents are those of the corpus's tail, as in ``data.split_text`` for data.source=embedded."""
    train_text, valid_text = data.split_text(data.load_corpus_text(), validation_fraction)
    return {name: [doc.strip("\n") + "\n" for doc in text.split("\n\n") if doc.strip()]
            for name, text in (("train", train_text), ("validation", valid_text))}


def file_documents(patterns, text_key: str, validation_fraction: float) -> dict[str, list[str]]:
    """The documents of local text files, split by document as ``data.source=text`` splits them."""
    documents = data.TextDocuments(data.resolve_text_files(patterns), text_key)
    train, valid = data.split_documents(len(documents), validation_fraction)
    return {"train": [documents[int(i)] for i in train],
            "validation": [documents[int(i)] for i in valid]}


def build(documents: dict[str, list[str]], data_dir: str | pathlib.Path,
          name: str = DEFAULT_NAME, version: str = "1.0.0") -> pathlib.Path:
    """Write ``{split: [text, ...]}`` as TFDS dataset ``name`` (ArrayRecord) under ``data_dir``;
    returns the dataset's version directory. An existing version is kept (TFDS does not rebuild)."""
    import tensorflow_datasets as tfds

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise data.DataError(f"--name={name!r} must be snake_case: [a-z][a-z0-9_]*")

    def body(ns):
        ns.update(
            name=name,
            VERSION=tfds.core.Version(version),
            _info=lambda self: tfds.core.DatasetInfo(
                builder=self, description="Text documents built by sparsejax.tfds_build.",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()})),
            _split_generators=lambda self, dl_manager: {
                split: self._generate_examples(docs) for split, docs in documents.items()},
            _generate_examples=lambda self, docs: ((i, {"text": d}) for i, d in enumerate(docs)),
        )

    # skip_registration: building a second dataset (or the same twice) in one process is fine.
    builder_cls = types.new_class("TextDocumentsBuilder", (tfds.core.GeneratorBasedBuilder,),
                                  {"skip_registration": True}, body)
    builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return pathlib.Path(builder.data_dir)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> None:
    """Swap two directories in one step (Linux ``renameat2``); two renames where it is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                          _RENAME_EXCHANGE) == 0:
            return
    except (OSError, AttributeError):  # no renameat2 in this libc
        pass
    parked = b.with_name(b.name + ".old")
    os.rename(b, parked)
    os.rename(a, b)
    os.rename(parked, a)


def check_target(data_dir: str | pathlib.Path, name: str, overwrite: bool) -> bool:
    """True if dataset ``name`` exists under ``data_dir`` (and ``overwrite`` allows rebuilding
    it); DataError for a ``data_dir`` that is a file, or an existing dataset without
    ``overwrite``."""
    data_dir = pathlib.Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise data.DataError(f"--data-dir {data_dir} is a file, not a directory")
    target = data_dir / name
    if not (target.exists() or target.is_symlink()):
        return False
    if not overwrite:
        raise data.DataError(f"--data-dir {data_dir} already holds dataset {name!r} ({target}); "
                             f"pass --overwrite to rebuild it, or choose another --name or "
                             f"--data-dir")
    return True


def build_in_place(documents: dict[str, list[str]], data_dir: str | pathlib.Path, name: str,
                   overwrite: bool) -> pathlib.Path:
    """:func:`build` into ``data_dir``, refusing an existing ``data_dir/name`` unless
    ``overwrite``, which builds beside it and swaps (module docstring)."""
    data_dir, target = pathlib.Path(data_dir), pathlib.Path(data_dir) / name
    if not check_target(data_dir, name, overwrite):
        return build(documents, data_dir, name)
    scratch = data_dir / f".{name}.building-{os.getpid()}"
    try:
        version_dir = build(documents, scratch, name)
        _exchange(scratch / name, target)  # scratch/name now holds the old dataset
        return target / version_dir.relative_to(scratch / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="TFDS data directory (data.tfds_data_dir)")
    p.add_argument("--name", default=DEFAULT_NAME, help="dataset name (data.tfds_name)")
    p.add_argument("--text-files", nargs="+", metavar="PATH_OR_GLOB",
                   help=".txt / .jsonl files, directories or globs (default: the embedded corpus)")
    p.add_argument("--text-key", default=None,
                   help="the JSONL field that holds the text (default text; with --text-files)")
    p.add_argument("--validation-fraction", type=float, default=0.05)
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild an existing dataset NAME under --data-dir (atomically: built "
                        "beside it, then swapped in)")
    args = p.parse_args(argv)
    try:
        if not 0 < args.validation_fraction < 1:
            raise data.DataError(f"--validation-fraction={args.validation_fraction} must be in (0, 1)")
        if args.text_key is not None and not args.text_files:
            raise data.DataError("--text-key applies to --text-files only (the embedded corpus "
                                 "has no JSONL fields); give --text-files or leave --text-key out")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", args.name):
            raise data.DataError(f"--name={args.name!r} must be snake_case: [a-z][a-z0-9_]*")
        check_target(args.data_dir, args.name, args.overwrite)  # before reading any input
        docs = (file_documents(args.text_files, args.text_key or "text", args.validation_fraction)
                if args.text_files else embedded_documents(args.validation_fraction))
        out = build_in_place(docs, args.data_dir, args.name, args.overwrite)
    except data.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}: {len(docs['train'])} train and {len(docs['validation'])} validation "
          f"documents in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
