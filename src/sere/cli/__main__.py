"""`python -m sere.cli ...` (what torchrun starts): the `sere` command."""

import sys

from sere.cli import main

sys.exit(main())
