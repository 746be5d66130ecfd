"""``python -m sparsejax.sweep SWEEP_FILE --out DIR``: see :mod:`sparsejax.sweep.cli`."""

import sys

from sparsejax.sweep.cli import main

sys.exit(main())
