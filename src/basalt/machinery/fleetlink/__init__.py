"""A machine's side of its link to Basalt Fleet: where the fleet is, enrolment, the stream.

machined runs :class:`~.agent.FleetAgent`; ``bench/fleet.py`` runs the same class without
machined to load a fleet with thousands of machines. It imports nothing of the node.
"""
