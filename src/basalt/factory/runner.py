"""The factory's build function: the imager in a child process, watched for progress.

Progress comes from the stage cache itself: the child writes the image's stage plan
first (``plan.json``), and a stage is done when its cache directory is complete; the
stage being built is the first one of the plan that is not. Nothing is parsed out of
the imager's log, which is kept as the build's ``build.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .builds import BuildCancelled, BuildKey, Progress
from .errors import BuildFailed
from .store import BUILD_LOG, Store
from .worker import Spec

#: Seconds between two looks at a running build.
POLL = 0.5
#: Lines of the build's log an error carries when the build left no error of its own.
LOG_TAIL = 20
#: A stage's cache directory is complete when it holds this file (basalt.imager.stage).
COMPLETE = ".complete"


@dataclass(frozen=True)
class BuildInputs:
    """What every build of one factory uses besides the schematic."""

    lock: Path
    signing_key: Path | None = None
    extension_keys: tuple[Path, ...] = ()


class ImagerRunner:
    """Runs one build at a time (the queue guarantees it) in ``python -m
    basalt.factory.worker``, in its own process group."""

    def __init__(self, store: Store, inputs: BuildInputs) -> None:
        self.store = store
        self.inputs = inputs

    def __call__(self, key: BuildKey, progress: Progress) -> list[dict[str, Any]]:
        store = self.store
        work = store.work_dir(key.schematic, key.version)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        spec = Spec(
            schematic=str(store.schematic_file(key.schematic)),
            work=str(work),
            cache=str(store.cache),
            lock=str(self.inputs.lock),
            signing_key=str(self.inputs.signing_key) if self.inputs.signing_key else None,
            extension_dirs=(str(store.extensions),),
            extension_keys=tuple(str(k) for k in self.inputs.extension_keys),
        )
        (work / "spec.json").write_text(spec.to_json())
        log_path = work / BUILD_LOG
        with log_path.open("wb") as log_file:
            child = subprocess.Popen(
                [sys.executable, "-m", "basalt.factory.worker", str(work / "spec.json")],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # its own process group: stopped as one
            )
            try:
                self._watch(child, work, progress)
            finally:
                if child.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
        result = _read_json(work / "result.json")
        if child.returncode != 0 or not result.get("ok"):
            error = result.get("error") or _tail(log_path)
            raise BuildFailed(
                f"the build of image {key} failed (exit {child.returncode}):\n{error}",
                hint=f"the build's log is {log_path}; fix the cause and ask for the image again "
                "(POST /builds/ID/VERSION)",
            )
        image = work / "image"
        shutil.move(log_path, image / BUILD_LOG)
        store.install(key.schematic, key.version, image)
        shutil.rmtree(work, ignore_errors=True)
        progress.stage, progress.done = None, progress.total
        steps: list[dict[str, Any]] = result.get("build", [])
        return steps

    def _watch(self, child: subprocess.Popen[bytes], work: Path, progress: Progress) -> None:
        plan: list[list[str]] = []
        while True:
            try:
                child.wait(timeout=POLL)
                return
            except subprocess.TimeoutExpired:
                pass
            if progress.cancel.is_set():
                os.killpg(child.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=5)
                raise BuildCancelled(f"build {work} stopped")
            if not plan:
                plan = _read_json(work / "plan.json", []) or []
            observe(plan, self.store.cache, progress)


def observe(plan: list[list[str]], cache: Path, progress: Progress) -> None:
    """Fill ``progress`` from the cache: stages of ``plan`` that are complete, and the
    first one that is not (the one being built: stages run in plan order)."""
    if not plan:
        return
    done = [(cache / directory / COMPLETE).exists() for _name, directory in plan]
    progress.total = len(plan)
    progress.done = sum(done)
    pending = [name for (name, _), complete in zip(plan, done, strict=True) if not complete]
    progress.stage = pending[0] if pending else None


def _read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {} if default is None else default


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-LOG_TAIL:]) or "(the log is empty)"


__all__ = ["BuildInputs", "ImagerRunner", "observe"]
