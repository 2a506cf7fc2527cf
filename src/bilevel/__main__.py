"""``python -m bilevel ...`` (also what ``torchrun -m bilevel ...`` runs on each rank)."""

import sys

from .cli import main

sys.exit(main())
