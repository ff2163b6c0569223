"""Two builds from the same lock (and the same Basalt sources) give identical images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from basalt.imager import lock as lockfile
from basalt.imager import pipeline
from basalt.imager.stage import Cache, sha256_file

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_same_lock_same_image(image_dir: Path, tmp_path: Path) -> None:
    stages = pipeline.Pipeline.from_lock(lockfile.read())
    main = Cache(pipeline.DEFAULT_CACHE)
    # Downloads (checked against the lock's sha256 anyway) and the sources snapshot are
    # shared; every stage that unpacks, assembles, compiles or compresses runs in both.
    shared = (stages.rootfs.unpack.debs, stages.rootfs.wheels, stages.rootfs.sources)
    images = []
    for run in ("a", "b"):
        cache = tmp_path / run / "cache"
        cache.mkdir(parents=True)
        for stage in shared:
            source = main.output(stage)
            shutil.copytree(source, cache / source.name, copy_function=os.link)
        manifest = pipeline.build(tmp_path / run / "image", cache, pipeline=stages)
        results = {step["stage"]: step["result"] for step in manifest["build"]}
        assert results["fetch-debs"] == results["sources"] == "cached"
        assert results["rootfs"] == results["squashfs"] == results["boot"] == "built"
        images.append(tmp_path / run / "image")
    first, second = images
    for name in ("root.sqfs", "initrd.img", "vmlinuz", "image.json"):
        assert sha256_file(first / name) == sha256_file(second / name), name
