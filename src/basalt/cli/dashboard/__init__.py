"""``basaltctl dashboard``: a live terminal view of nodes (and of a Basalt Fleet).

Only the command is imported here; Textual loads when the dashboard starts, never at
``basaltctl`` start-up.
"""

from .command import dashboard

__all__ = ["dashboard"]
