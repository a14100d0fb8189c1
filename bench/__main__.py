"""``python -m sparse_ops_bench``: the benchmark command line (same as ``sparse-ops bench``)."""

import sys

from .cli import main

sys.exit(main())
