"""``python -m sweeps.cli``: the same as the ``lora-sweep`` script."""

import sys

from sweeps.cli.main import main

sys.exit(main())
