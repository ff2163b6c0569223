"""basalt.machinery: the pure library shared by the node, the CLI and the provisioners.

It imports nothing else from Basalt and does no I/O beyond reading and writing files.
"""
