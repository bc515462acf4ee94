"""`python -m mole_trainer ...` is `mole ...` (torchrun launches it this way: `torchrun -m mole_trainer`)."""

import sys

from .cli import main

sys.exit(main())
