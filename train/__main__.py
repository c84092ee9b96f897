"""``python -m fss.train``: ``fss-train`` (the form ``torchrun -m fss.train`` starts in every process)."""

import sys

from fss.train.cli import main

sys.exit(main())
