import sys

from lowbit.compiler.cli import main

sys.exit(main())
