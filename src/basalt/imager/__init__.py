"""Basalt's image builder: a pipeline of small, typed, cached stages.

``lock`` (image.lock) -> ``packages`` (fetch-debs, fetch-wheels, unpack) -> ``rootfs``
(with the ``sources`` snapshot) -> ``squashfs``; ``boot`` (kernel + initramfs) beside it.
``pipeline.build`` wires them; ``pipeline.inspect`` reads an image back. ``init`` is the
guest's PID 1 stepping stone (see docs/adr/0006-initramfs.md).

Nothing is imported here on purpose: the guest imports ``basalt.imager.init`` at boot
and must not pay for the build-side modules.
"""
