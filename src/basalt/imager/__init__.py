"""Basalt's image builder: a pipeline of small, typed, cached stages.

``lock`` (image.lock) -> ``packages`` (fetch-debs, fetch-wheels, unpack) -> ``rootfs``
(with the ``sources`` snapshot) -> ``squashfs``; ``boot`` (kernel + initramfs) beside it.
``pipeline.build`` wires them; ``pipeline.inspect`` reads an image back. ``init`` is the
initramfs' PID 1, which mounts the root and execs its init, machined (see
docs/adr/0006-initramfs.md).

Nothing is imported here on purpose: the initramfs runs ``init.py`` as a plain file, and
nothing in the guest should pay for the build-side modules.
"""
