"""``python -m lottery`` (also what ``torchrun -m lottery`` runs)."""

import sys

from lottery.cli import main

sys.exit(main())
