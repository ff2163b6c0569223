"""Disks: GUID partition tables and Basalt's partition layout (pure; no kernel calls).

The exports are imported on first use: a node's boot needs only the partition names
(:mod:`.names`), not the tables and ``uuid`` that :mod:`.gpt` brings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from basalt.machinery import lazy

if TYPE_CHECKING:
    from .gpt import ESP_TYPE, LINUX_DATA_TYPE, SECTOR, GptError, Partition, Table
    from .layout import LAYOUT, Layout

__all__ = [
    "ESP_TYPE",
    "LAYOUT",
    "LINUX_DATA_TYPE",
    "SECTOR",
    "GptError",
    "Layout",
    "Partition",
    "Table",
]

__getattr__ = lazy.exports(
    __name__,
    {
        "gpt": ("ESP_TYPE", "LINUX_DATA_TYPE", "SECTOR", "GptError", "Partition", "Table"),
        "layout": ("LAYOUT", "Layout"),
    },
)
