"""``python -m tlearn``: the same as the ``tlearn`` command (and what ``torchrun -m tlearn`` starts)."""

import sys

from tlearn.cli import main

sys.exit(main())
