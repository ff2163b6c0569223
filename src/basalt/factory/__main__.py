"""``python -m basalt.factory``: the same as ``basalt-factory``."""

import sys

from .main import main

sys.exit(main())
