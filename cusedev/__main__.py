"""`python -m cusedev`: the same as the `cusedev` command."""

import sys

from .cli import main

sys.exit(main())
