#!/usr/bin/env python
"""Sparsity evaluation of trained checkpoints (zero, top-k, FAT-ε, CETT, CETT-PPL-p%).

Not implemented yet: the metric library is being built under issue "Evaluation". Until then this
entry point exits with status 3 and writes nothing, rather than producing placeholder numbers.
"""

import sys

if __name__ == "__main__":
    print("eval.py: not yet implemented (see the Evaluation issue); nothing was written",
          file=sys.stderr)
    sys.exit(3)
