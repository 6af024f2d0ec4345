"""`python -m imgtrain` (and `torchrun -m imgtrain`): the `imgtrain` command line."""

import sys

from imgtrain.cli import main

sys.exit(main())
