"""``python -m diffopt``: the same command line as the ``diffopt`` console script."""

import sys

from diffopt.cli import main

sys.exit(main())
