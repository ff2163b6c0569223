"""The contract between a node process and whatever launched it (a launcher or the kernel).

In container mode machined is a plain process: it asks for a reboot by exiting with
:data:`EXIT_REBOOT`, and the launcher starts it again; :data:`EXIT_SHUTDOWN` stops it.
"""

from __future__ import annotations

EXIT_SHUTDOWN = 0
EXIT_REBOOT = 75
#: A fatal error; the launcher restarts after a delay, like a machine that reboots.
EXIT_FATAL = 70
