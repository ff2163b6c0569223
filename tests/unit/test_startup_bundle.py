"""The start-up bundle (basalt.machined.startup_bundle): built from a tree's byte code,
it serves those modules with their real files' specs, once, and leaves when released."""

from __future__ import annotations

import compileall
import marshal
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from basalt.machined import startup_bundle

BUILD_AND_IMPORT = """
import sys
from basalt.machined import startup_bundle
names = startup_bundle.build(
    sys.argv[1], sys.argv[2], roots=["bundled_pkg.leaf", "bundled_pkg.records"]
)
print(" ".join(names))
"""

#: A bundled dataclasses module runs the functions it writes from their recorded code:
#: the class behaves as compiled the usual way; a class the build never saw compiles.
GENERATED = """
import sys
from basalt.machined import startup_bundle
finder = startup_bundle.install(sys.argv[1])
import dataclasses
from bundled_pkg.records import Point
assert dataclasses.exec == finder.exec_generated
recorded = finder.generated_served
p = Point(1)
assert (p.x, p.y, repr(p)) == (1, 2, "Point(x=1, y=2)")
assert p == Point(1, 2) and p != Point(1, 3) and hash(p) == hash(Point(1, 2))
try:
    p.x = 5
except dataclasses.FrozenInstanceError:
    pass
else:
    raise AssertionError("frozen")

@dataclasses.dataclass
class Unseen:
    name_never_recorded: str = "u"

assert Unseen().name_never_recorded == "u" and finder.generated_served == recorded
print(recorded, startup_bundle.served_generated())
startup_bundle.release()
print("exec" in vars(dataclasses))
"""

USE = """
import sys
from basalt.machined import startup_bundle
finder = startup_bundle.install(sys.argv[1])
assert finder is not None and sys.meta_path[0] is finder
import bundled_pkg.leaf
print(bundled_pkg.leaf.ANSWER, bundled_pkg.leaf.__file__, bundled_pkg.__path__[0])
print(type(bundled_pkg.leaf.__spec__.loader).__name__, finder.served)
print(startup_bundle.release(), finder in sys.meta_path, startup_bundle.release())
import bundled_pkg.other  # after the release: from its file
print(bundled_pkg.other.ANSWER, type(bundled_pkg.other.__spec__.loader).__name__)
"""


def _tree(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    package = site / "bundled_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "leaf.py").write_text(
        textwrap.dedent(
            """
            import json  # the standard library comes along (when not imported yet)
            ANSWER = json.dumps({"from": "leaf"})
            """
        )
    )
    (package / "other.py").write_text("ANSWER = 'other'\n")
    (package / "records.py").write_text(
        textwrap.dedent(
            """
            import dataclasses

            @dataclasses.dataclass(frozen=True)
            class Point:
                x: int
                y: int = 2
            """
        )
    )
    compileall.compile_dir(
        site, quiet=1, invalidation_mode=compileall.py_compile.PycInvalidationMode.UNCHECKED_HASH
    )
    return site


def _python(site: Path, script: str, *args: str) -> str:
    src = Path(startup_bundle.__file__).resolve().parents[2]
    env = {"PYTHONPATH": f"{site}:{src}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-s", "-B", "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_built_bundle_serves_its_modules_with_their_files(tmp_path: Path) -> None:
    site = _tree(tmp_path)
    bundle = tmp_path / "startup.bundle"
    # Root "/": the files are named by their paths on this host.
    names = _python(site, BUILD_AND_IMPORT, str(bundle), "/").split()
    assert {"bundled_pkg", "bundled_pkg.leaf"} <= set(names)  # and json's, unless loaded
    assert "bundled_pkg.other" not in names and "basalt.machined.startup_bundle" not in names
    assert "dataclasses" in names
    # Sources changed after the build: the bundle's code is what runs, the files name it.
    (site / "bundled_pkg" / "leaf.py").write_text("ANSWER = 'from the file'\n")
    lines = _python(site, USE, str(bundle)).splitlines()
    answer, file, path = lines[0].rsplit(" ", 2)
    assert answer == '{"from": "leaf"}'
    assert file == f"{site}/bundled_pkg/leaf.py" and path == f"{site}/bundled_pkg"
    loader, served = lines[1].split()
    assert loader == "_BundledLoader" and int(served) >= 2
    assert lines[2] == f"{served} False 0"  # released: off sys.meta_path, once
    assert lines[3] == "other SourceFileLoader"


def test_generated_functions_run_from_recorded_code(tmp_path: Path) -> None:
    site = _tree(tmp_path)
    bundle = tmp_path / "startup.bundle"
    _python(site, BUILD_AND_IMPORT, str(bundle), "/")
    recorded, served, left = _python(site, GENERATED, str(bundle)).split()
    # Point's __init__, __repr__, __eq__, __setattr__, __delattr__, __hash__
    assert int(recorded) >= 5 and served == recorded
    assert left == "False"  # released: dataclasses compiles with the builtin exec again


def test_no_or_a_foreign_bundle_changes_nothing(tmp_path: Path) -> None:
    meta_path = list(sys.meta_path)
    assert startup_bundle.install(str(tmp_path / "absent")) is None
    (tmp_path / "foreign").write_bytes(b"PK\x03\x04 not a bundle")
    assert startup_bundle.install(str(tmp_path / "foreign")) is None
    assert sys.meta_path == meta_path and startup_bundle.release() == 0


def _fd(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_a_bundle_serves_a_module_once(tmp_path: Path) -> None:
    code = compile("VALUE = 1\n", "/x/mod.py", "exec")
    data = startup_bundle.pack([("some_mod", "/x/mod.py", False, marshal.dumps(code))])
    finder = startup_bundle.BundleFinder(_fd(tmp_path / "b", data))
    assert len(finder) == 1 and finder.find_spec("other") is None
    spec = finder.find_spec("some_mod")
    assert spec is not None and spec.origin == "/x/mod.py" and spec.has_location
    assert spec.loader is not None and spec.loader.get_code("some_mod") == code  # type: ignore[attr-defined]
    assert finder.find_spec("some_mod") is None and finder.served == 1
    finder.close()
    with pytest.raises(startup_bundle.BundleError, match="bad magic"):
        startup_bundle.BundleFinder(_fd(tmp_path / "c", b"XXXXXXXX" + data[8:]))
    with pytest.raises(startup_bundle.BundleError, match="unreadable bundle index"):
        startup_bundle.BundleFinder(_fd(tmp_path / "d", data[:12] + b"\xff" * 8))


def test_an_edited_module_leaves_the_bundle(tmp_path: Path) -> None:
    """A tool that edits a module of a built root (imager.variant) drops it from the
    bundle, or the bundled code would win over the edit."""
    one = marshal.dumps(compile("A = 1\n", "/r/a.py", "exec"))
    two = marshal.dumps(compile("B = 2\n", "/r/b.py", "exec"))
    text = "def __create_fn__():\n def f(self):\n  return 7\n return f"
    generated = [(text, marshal.dumps(compile(text, "<string>", "exec")))]
    data = startup_bundle.pack(
        [("a", "/r/a.py", False, one), ("b", "/r/b.py", False, two)], generated
    )
    kept = startup_bundle.without(data, ["/r/a.py"])
    finder = startup_bundle.BundleFinder(_fd(tmp_path / "kept", kept))
    assert finder.find_spec("a") is None
    spec = finder.find_spec("b")
    assert spec is not None and spec.loader is not None
    assert spec.loader.get_code("b") == marshal.loads(two)  # type: ignore[attr-defined]
    # Generated functions stay: keyed by their text, an edited class only misses them.
    namespace: dict[str, object] = {}
    finder.exec_generated(text, {}, namespace)
    assert finder.generated_served == 1 and callable(namespace["__create_fn__"])
    finder.close()
    with pytest.raises(startup_bundle.BundleError):
        startup_bundle.without(b"not a bundle", [])
