"""One image build, in its own process: ``python -m basalt.factory.worker SPEC.json``.

The factory starts one of these per build (``runner.py``), so the imager's work never
holds the server's event loop or GIL, a build can be stopped by killing its process
group, and each build imports the imager afresh (the imager refuses to run code that
changed since it was imported). SPEC names the schematic file, the output and cache
directories, the lock, the signing key and the extension registry with its trusted keys.

It writes, into the build directory: ``plan.json`` (the stages of the image, in build
order, with their cache directory names, for progress), then the image into ``image/``
with ``artefacts.json`` last, and ``result.json`` ({ok, build} or {ok: false, error}).
Its log (the imager's) goes to stderr, which the factory keeps as ``build.log``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from basalt.machinery.errors import BasaltError


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one build is given (written by the factory as JSON)."""

    schematic: str
    work: str
    cache: str
    lock: str
    signing_key: str | None = None
    extension_dirs: tuple[str, ...] = ()
    extension_keys: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Spec:
        data = json.loads(text)
        data["extension_dirs"] = tuple(data.get("extension_dirs", ()))
        data["extension_keys"] = tuple(data.get("extension_keys", ()))
        return cls(**data)


def stage_plan(pipeline: Any, cache: Any) -> list[list[str]]:
    """Every stage of ``pipeline`` once, inputs before the stages that read them, as
    ``[name, cache directory name]``."""
    from basalt.imager.stage import Stage

    seen: dict[str, list[str]] = {}

    def visit(stage: Stage) -> None:
        for field in dataclasses.fields(stage):
            value = getattr(stage, field.name)
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, Stage):
                    visit(item)
        directory = cache.path(stage).name
        seen.setdefault(directory, [stage.name, directory])

    tops = [pipeline.rootfs, *pipeline.extensions, pipeline.squashfs, pipeline.boot]
    if pipeline.disk is not None:
        tops.append(pipeline.disk)
    for top in tops:
        visit(top)
    return list(seen.values())


def describe_artefacts(image: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each artefact the image has (image.json's figures when it has
    them, else computed)."""
    from basalt.imager.stage import sha256_file

    from .store import ARTEFACTS

    described = manifest.get("files", {})
    found = {}
    for name in ARTEFACTS:
        path = image / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        known = described.get(name, {})
        digest = known.get("sha256") if known.get("bytes") == size else None
        found[name] = {"bytes": size, "sha256": digest or sha256_file(path)}
    return found


def run(spec: Spec) -> list[dict[str, Any]]:
    """Build the image of ``spec``; the manifest's build steps."""
    from basalt.imager import lock as lockfile
    from basalt.imager import pipeline
    from basalt.imager.custom import ExtensionSources
    from basalt.imager.stage import Cache
    from basalt.machinery.fileio import write_atomic
    from basalt.machinery.images import verification_key
    from basalt.machinery.schematic import read_schematic

    from .store import ARTEFACTS_FILE

    work = Path(spec.work)
    schematic = read_schematic(Path(spec.schematic))
    trusted = tuple(
        verification_key(Path(path).read_bytes(), Path(path).name) for path in spec.extension_keys
    )
    sources = ExtensionSources(search=tuple(Path(d) for d in spec.extension_dirs), trusted=trusted)
    lock_path = Path(spec.lock)
    lock = lockfile.read(lock_path)
    lockfile.check(lock, lock_path)
    wired = pipeline.Pipeline.from_lock(lock, schematic, sources)
    plan = stage_plan(wired, Cache(Path(spec.cache)))
    write_atomic(work / "plan.json", json.dumps(plan) + "\n")
    image = work / "image"
    manifest = pipeline.build(
        image,
        Path(spec.cache),
        lock_path,
        pipeline=wired,
        signing_key=Path(spec.signing_key) if spec.signing_key else None,
        extension_sources=sources,
    )
    artefacts = describe_artefacts(image, manifest)
    write_atomic(image / ARTEFACTS_FILE, json.dumps(artefacts, indent=2, sort_keys=True) + "\n")
    steps: list[dict[str, Any]] = manifest["build"]
    return steps


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m basalt.factory.worker SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    spec_path = Path(args[0])
    spec = Spec.from_json(spec_path.read_text())
    result_path = Path(spec.work) / "result.json"
    try:
        steps = run(spec)
    except BasaltError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        result_path.write_text(json.dumps({"ok": False, "error": exc.render()}) + "\n")
        return 1
    result_path.write_text(json.dumps({"ok": True, "build": steps}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
