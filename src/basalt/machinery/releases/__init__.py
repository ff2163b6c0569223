"""Release channels as a TUF repository (python-tuf): what ``basaltctl release`` makes
and what a node's updater will trust. See :mod:`.repository`."""
