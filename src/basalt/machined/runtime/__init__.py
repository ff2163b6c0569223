"""The runtime: a versioned, watchable resource store, the controller engine, and the
sequencer that runs one sequence of phases at a time."""

from .controller import Controller, ControllerEngine
from .sequencer import (
    SEQUENCE_NAMES,
    Phase,
    Sequence,
    SequenceConflictError,
    SequenceName,
    Sequencer,
    sequence,
)
from .store import Resource, ResourceMeta, ResourceStore, WatchEvent

__all__ = [
    "SEQUENCE_NAMES",
    "Controller",
    "ControllerEngine",
    "Phase",
    "Resource",
    "ResourceMeta",
    "ResourceStore",
    "Sequence",
    "SequenceConflictError",
    "SequenceName",
    "Sequencer",
    "WatchEvent",
    "sequence",
]
