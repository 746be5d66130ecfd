#!/usr/bin/env python
"""Peak memory of one long one-line document in the text pipeline, each number from a fresh
process (peak RSS from ``getrusage``), baselines measured in the same run:

* tokenizing it whole vs in bounded pieces (``sparsejax.data.encode_bounded``);
* ``data.source=text`` training batches (``data.Dataset``, 40 batches of 8 x 129 tokens, with a
  3 s pause after 20) with the document and a short one in training, a short one in validation, with grain's default read-ahead (16 threads, 500 records) vs
  the pipeline's (``data.pipeline.READ_THREADS``, ``data.pipeline.READ_AHEAD``).

    python benchmarks/text_memory.py [--mb 0.03,0.3,3] [--tokenizer byte,sentencepiece]

A SentencePiece model (vocabulary 512) is trained once on a sample in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
import numpy as np
from sparsejax import data
path, kind, model, bounded = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
text = open(path, encoding="utf-8").read()
tok = data.ByteTokenizer() if kind == "byte" else data.SentencePieceModel(model)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = data.encode_bounded(tok, text) if bounded else tok.encode(text)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"tokens": int(len(ids)), "peak_mib": peak / 1024, "before_mib": base / 1024}))
"""

PIPELINE = r"""
import json, resource, sys, time
from sparsejax import configure, data
from sparsejax.data import pipeline
doc, small, default_read = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if default_read:
    pipeline.READ_THREADS, pipeline.READ_AHEAD = 16, 500
cfg = configure.load("configs/tiny_relu.py", ["data.source=text",
                     f"data.text_files={doc},{small}1.txt,{small}2.txt", "train.batch_size=8",
                     "train.seq_len=128", "data.validation_fraction=0.3"])
ds = data.Dataset(cfg)
for _ in range(20):
    next(ds.train)
time.sleep(3)  # grain's reader threads fill their read-ahead meanwhile
for _ in range(20):
    next(ds.train)
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", default="0.03,0.3,3")
    p.add_argument("--tokenizer", default="byte,sentencepiece")
    args = p.parse_args()
    random.seed(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "sparsity", "neuron"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model = tmp / "spm.model"
        if "sentencepiece" in args.tokenizer:
            import sentencepiece as spm

            sample = [" ".join(random.choice(words) for _ in range(200)) for _ in range(500)]
            spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_prefix=str(tmp / "spm"),
                                           vocab_size=512, model_type="unigram", byte_fallback=True,
                                           hard_vocab_limit=False, minloglevel=2)
        print("| document | tokenizer | tokens | peak RSS whole (MiB) | peak RSS bounded (MiB) |")
        print("|---|---|---|---|---|")
        pipeline = []
        for mb in (float(x) for x in args.mb.split(",")):
            doc = tmp / f"doc_{mb}.txt"
            text = " ".join(random.choice(words) for _ in range(int(mb * 1e6 / 6)))
            doc.write_text(text[:int(mb * 1e6)], encoding="utf-8")
            for kind in args.tokenizer.split(","):
                row = []
                for bounded in ("0", "1"):
                    out = subprocess.run([sys.executable, "-c", CHILD, str(doc), kind, str(model), bounded],
                                         capture_output=True, text=True)
                    if out.returncode:
                        row.append({"peak_mib": float("nan"), "tokens": -1})
                        continue
                    row.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"| {mb:g} MB, one line | {kind} | {row[1]['tokens']:,} | "
                      f"{row[0]['peak_mib']:.0f} | {row[1]['peak_mib']:.0f} |", flush=True)
            pipeline.append((mb, doc))
        # The validation split is by document: of these three (split_documents' fixed order),
        # the long one is in training and one short one is the validation document.
        small = tmp / "small"
        for i in (1, 2):
            (tmp / f"small{i}.txt").write_text("short document " * 2000)
        print("\n| document in training | peak RSS, grain default read-ahead (MiB) | "
              "peak RSS, pipeline's (MiB) |")
        print("|---|---|---|")
        for mb, doc in pipeline:
            row = []
            for default_read in ("1", "0"):
                out = subprocess.run([sys.executable, "-c", PIPELINE, str(doc), str(small),
                                      default_read], capture_output=True, text=True, cwd=REPO)
                row.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
                           if out.returncode == 0 else float("nan"))
            print(f"| {mb:g} MB, one line | {row[0]:.0f} | {row[1]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
