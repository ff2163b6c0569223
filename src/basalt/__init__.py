"""Basalt: an immutable, API-managed, minimal Linux for Kubernetes nodes."""

__version__ = "0.1.0"
