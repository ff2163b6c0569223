"""Stages and the cache that runs them.

A stage is a frozen dataclass: its fields are its options, and fields that are themselves
stages are its inputs. ``stage_id()`` is the sha256 of the stage's canonical form (name,
format version, options, and the ids of its inputs), so equal options over equal inputs
give the same id, and a result found under ``<cache>/<name>-<id>/`` can be reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from basalt.machinery.fileio import sha256_file

from .errors import ImageToolError

log = logging.getLogger("basalt.imager")

#: The marker a stage writes last; a directory without it is a failed or partial run.
COMPLETE = ".complete"


def canonical(value: Any) -> Any:
    """A JSON-able form of an option value; stages are replaced by their ids."""
    if isinstance(value, Stage):
        return {"stage": value.name, "id": value.stage_id()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [canonical(item) for item in value]
    if isinstance(value, dict):
        return {str(key): canonical(item) for key, item in sorted(value.items())}
    if isinstance(value, Path):
        raise TypeError("a stage option must not be a host path: hash the content instead")
    return value


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a build. Subclasses are frozen dataclasses and implement :meth:`run`."""

    #: The stage's name, the prefix of its cache directory.
    name: ClassVar[str] = "stage"
    #: Bumped when the stage's output format or algorithm changes in a way options miss.
    version: ClassVar[int] = 1

    def canonical_form(self) -> dict[str, Any]:
        return {
            "stage": self.name,
            "version": self.version,
            "options": {f.name: canonical(getattr(self, f.name)) for f in dataclasses.fields(self)},
        }

    def stage_id(self) -> str:
        """sha256 of the canonical options and input ids."""
        text = json.dumps(self.canonical_form(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def inputs(self) -> Sequence[Stage]:
        """The stages whose outputs this one reads."""
        return [
            v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Stage)
        ]

    def run(self, out: Path, cache: Cache) -> None:
        """Write this stage's output into the empty directory ``out``."""
        raise NotImplementedError


class Cache:
    """Stage outputs under ``root``: ``<root>/<name>-<id[:16]>/``, reused when complete."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: list[tuple[str, str, float]] = []  # (stage, "built"/"cached", seconds)

    def path(self, stage: Stage) -> Path:
        return self.root / f"{stage.name}-{stage.stage_id()[:16]}"

    def output(self, stage: Stage) -> Path:
        """The output directory of ``stage``, building it (and its inputs) when needed."""
        for upstream in stage.inputs():
            self.output(upstream)
        path = self.path(stage)
        if (path / COMPLETE).exists():
            if not any(name == stage.name for name, _, _ in self.built):
                self.built.append((stage.name, "cached", 0.0))
            return path
        started = time.monotonic()
        work = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log.info("stage %s (%s): building", stage.name, stage.stage_id()[:16])
        try:
            stage.run(work, self)
            (work / "stage.json").write_text(json.dumps(stage.canonical_form(), indent=2) + "\n")
            (work / COMPLETE).write_text(stage.stage_id() + "\n")
            shutil.rmtree(path, ignore_errors=True)
            work.rename(path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        elapsed = time.monotonic() - started
        self.built.append((stage.name, "built", elapsed))
        log.info("stage %s: built in %.1f s", stage.name, elapsed)
        return path


def run_tool(argv: Sequence[str], *, what: str, **kwargs: Any) -> str:
    """Run a host tool; its failure becomes an :class:`ImageToolError` with its output."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)
    except FileNotFoundError:
        raise ImageToolError(
            f"{what}: {argv[0]} is not installed", hint="run 'make image-deps' (as root)"
        ) from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()[-2000:]
        raise ImageToolError(f"{what}: {' '.join(argv[:3])} ... exited {done.returncode}\n{output}")
    stdout: str = done.stdout
    return stdout


def walk_sorted(root: Path) -> Iterator[Path]:
    """Every path below ``root`` in a stable order (parents before children)."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from walk_sorted(entry)


__all__ = ["COMPLETE", "Cache", "Stage", "canonical", "run_tool", "sha256_file", "walk_sorted"]
