"""The only modules that talk to the kernel directly."""
