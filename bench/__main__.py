"""``python -m lowbit.bench``: the ``lowbit-bench`` command (bench/cli.py)."""

import sys

from lowbit.bench.cli import main

sys.exit(main())
