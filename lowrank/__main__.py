"""``python -m lowrank ...`` (also what ``torchrun -m lowrank pretrain ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
