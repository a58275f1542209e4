"""``python -m vlmforge`` (used with ``torchrun -m vlmforge train ...``)."""

import sys

from vlmforge.cli import main

sys.exit(main())
