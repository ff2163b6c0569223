"""Basalt's sequences (boot, apply-config, upgrade, rollback, reboot, shutdown, reset) as
declared lists of phases, in :mod:`.sequences`. The engine that runs them is the
runtime's (:mod:`basalt.machined.runtime.sequencer`)."""
