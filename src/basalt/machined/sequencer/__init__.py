"""Sequences (boot, apply-config, reboot, shutdown, reset) as declared lists of phases."""

from .sequencer import Phase, Sequence, SequenceConflictError, Sequencer, sequence

__all__ = ["Phase", "Sequence", "SequenceConflictError", "Sequencer", "sequence"]
