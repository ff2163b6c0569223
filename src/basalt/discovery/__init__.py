"""The open discovery service (``basalt-discovery serve``, or inside ``basalt-fleet``):
per cluster, the sealed records of its nodes, their time to live and a watch of changes.
It imports only machinery, and is never in a node's image (NOT_IN_IMAGE)."""
