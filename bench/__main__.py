import sys

from lowbit.bench.cli import main

sys.exit(main())
