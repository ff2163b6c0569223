"""Basalt Fleet: the open, self-hosted fleet manager (``basalt-fleet``).

One process: a REST API (FastAPI) for people and tools, a gRPC link service that
machines dial out to, and background controllers; SQLite by default, PostgreSQL for
replicas. It reaches a node's API only through that node's link (a tunnel of TLS
bytes), with the client certificates of the clusters it manages. It never imports
machined. docs/fleet.md describes it.
"""
