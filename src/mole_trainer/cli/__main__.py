"""`python -m mole_trainer.cli` runs `mole`."""

import sys

from . import main

sys.exit(main())
