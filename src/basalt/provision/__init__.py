"""Local clusters: the ``process`` provisioner (default, rootless); ``qemu`` comes later."""
