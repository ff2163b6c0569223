"""Disks: GUID partition tables and Basalt's partition layout (pure; no kernel calls)."""

from __future__ import annotations

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
