"""``python -m basalt.discovery``: the same as ``basalt-discovery``."""

import sys

from .main import main

sys.exit(main())
