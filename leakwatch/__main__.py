"""``python -m leakwatch``."""

import sys

from leakwatch.cli import main

sys.exit(main())
