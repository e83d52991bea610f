"""`python -m stellar.train` (and `torchrun -m stellar.train`): the stellar-train command."""

import sys

from .train import main

sys.exit(main())
