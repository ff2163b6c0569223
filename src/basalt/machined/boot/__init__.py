"""The node's side of A/B slots: the metal backend (ESP entries, slot partitions, META,
kexec) and the ESP's check and repair. The pure model it applies (assessment, entry
naming, codecs) and the container slot directories are shared contracts and live in
:mod:`basalt.machinery.boot`."""
