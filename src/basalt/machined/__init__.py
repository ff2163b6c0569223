"""machined: the Basalt node agent (PID 1 on metal, a plain process in a container)."""
