"""``python -m lowbit``: the ``lowbit`` command line (:mod:`lowbit.compiler.cli`)."""

import sys

from lowbit.compiler.cli import main

sys.exit(main())
