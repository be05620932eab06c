"""`python -m kbitprep ...`: the same as the `kbitprep` command."""

import sys

from .cli import main

sys.exit(main())
