"""``python -m sparsejax.launch {local,tpu-vm,xpk,jobset} ...`` (see :mod:`sparsejax.launch`)."""

import sys

from sparsejax.launch import main

sys.exit(main())
