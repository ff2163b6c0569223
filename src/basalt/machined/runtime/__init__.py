"""The resource runtime: a versioned, watchable store and the controller engine."""

from .controller import Controller, ControllerEngine
from .store import Resource, ResourceMeta, ResourceStore, WatchEvent

__all__ = [
    "Controller",
    "ControllerEngine",
    "Resource",
    "ResourceMeta",
    "ResourceStore",
    "WatchEvent",
]
