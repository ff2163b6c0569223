"""Basalt: an immutable, API-managed, minimal Linux for Kubernetes nodes."""

import os as _os

#: The version of this Basalt. In container mode the launcher runs machined from an A/B
#: slot and sets ``BASALT_VERSION_OVERRIDE`` to the version in the slot's signed manifest,
#: so the node reports the version it was upgraded to.
__version__ = _os.environ.get("BASALT_VERSION_OVERRIDE") or "0.1.0"
