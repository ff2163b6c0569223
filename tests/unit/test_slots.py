"""Container-mode slots: bundles from a source tree, writing slots, the launcher's firmware part.

Real files in a temporary directory; the launcher functions are called as the launcher
calls them, with the boot state going through ``boot.json`` each time.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from basalt.machinery.boot import (
    Boot,
    BootState,
    GatesPassed,
    SlotHealth,
    SlotName,
    apply,
    initial_state,
)
from basalt.machinery.boot.slots import SlotDirectories, SlotWriteError
from basalt.machinery.images import (
    BASALT_TREE,
    BundleInputError,
    ImagePayloadError,
    VerifiedBundle,
    create_bundle,
    load_signing_key,
    required_payload,
    verification_key,
    verify_bundle,
)
from basalt.provision.bundle_from_tree import bundle_from_tree, main, write_tree_tar
from basalt.provision.launcher import (
    BOOTED_SLOT_ENV,
    VERSION_ENV,
    child_env,
    choose_boot,
    record_crash,
)
from tests.fakes import bundles
from tests.fakes.bundles import CHANGES, Change, change

A, B = SlotName.A, SlotName.B


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    package = tmp_path / "src" / "basalt"
    (package / "machined").mkdir(parents=True)
    (package / "__pycache__").mkdir()
    (package / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (package / "machined" / "__init__.py").write_text("")
    (package / "machined" / "main.py").write_text("print('machined')\n")
    (package / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    (package / "stale.pyc").write_bytes(b"cache")
    return package


def build(tree: Path, out: Path, keypair: tuple[str, str], version: str = "0.2.0") -> Path:
    bundle_from_tree(tree, out, version, load_signing_key(keypair[0]))
    return out


def verified(bundle: Path, keypair: tuple[str, str]) -> VerifiedBundle:
    return bundles.verified(bundle, keypair, "container")


# -- bundles from a source tree -------------------------------------------------------------------


def test_bundle_from_tree_holds_the_package_without_caches(tmp_path, tree, keypair) -> None:
    bundle = build(tree, tmp_path / "v2.tar", keypair)
    result = verified(bundle, keypair)
    assert result.version == "0.2.0"
    assert [f.path for f in result.manifest.files] == [BASALT_TREE]
    with tarfile.open(bundle) as outer:
        inner = outer.extractfile(BASALT_TREE)
        assert inner is not None
        with tarfile.open(fileobj=inner) as tar:
            names = tar.getnames()
            assert {m.uid for m in tar.getmembers()} == {0}
    assert names == [
        "basalt",
        "basalt/__init__.py",
        "basalt/machined",
        "basalt/machined/__init__.py",
        "basalt/machined/main.py",
    ]


def test_bundle_from_tree_is_reproducible(tmp_path, tree, keypair, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = build(tree, tmp_path / "one.tar", keypair).read_bytes()
    (tree / "__pycache__" / "y.pyc").write_bytes(b"more cache")  # caches do not count
    assert build(tree, tmp_path / "two.tar", keypair).read_bytes() == first


def test_bundle_from_tree_cli(tmp_path, tree, keypair, capsys) -> None:
    key = tmp_path / "k.key"
    key.write_text(keypair[0])
    out = tmp_path / "b.tar"
    args = ["--src", str(tree), "--version", "0.2.0", "--key", str(key), "-o", str(out)]
    assert main(args) == 0
    assert "basalt 0.2.0 x86_64 (container)" in capsys.readouterr().out
    assert main(args) == 1  # exists already
    assert "already exists" in capsys.readouterr().err
    assert main([*args[:1], str(tmp_path), *args[2:], "--force"]) == 1
    assert "is not the basalt package" in capsys.readouterr().err


def test_container_bundles_need_basalt_tar(tmp_path, keypair) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"k")
    key = load_signing_key(keypair[0])
    with pytest.raises(BundleInputError, match=r"container bundle needs the payload 'basalt\.tar'"):
        create_bundle(
            tmp_path / "b.tar", {"kernel": kernel}, "0.2.0", "x", "x86_64", key,
            platform="container",
        )  # fmt: skip
    assert not (tmp_path / "b.tar").exists()
    assert required_payload("metal") == ("kernel", "initramfs", "rootfs.squashfs")
    with pytest.raises(BundleInputError, match="unknown platform"):
        required_payload("qemu")


@pytest.mark.parametrize("tar", [True, False], ids=["tar", "directory"])
def test_verify_requires_the_platform_payload_and_uses_the_label(tmp_path, keypair, tar) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"k")
    out = tmp_path / ("metal.tar" if tar else "metal")
    create_bundle(out, {"kernel": kernel}, "0.2.0", "x", "x86_64", load_signing_key(keypair[0]))
    keys = [verification_key(keypair[1])]
    with pytest.raises(ImagePayloadError) as raised:
        verify_bundle(out, keys, "x86_64", required=("basalt.tar",), label="uploaded bundle")
    assert str(raised.value).startswith(
        "uploaded bundle: payload check failed: basalt.tar: is required here"
    )
    assert raised.value.path == "basalt.tar"


# -- writing slots --------------------------------------------------------------------------------


def test_write_slot_then_replace_it(tmp_path, tree, keypair) -> None:
    slots = SlotDirectories(tmp_path / "slots")
    slots.write(B, verified(build(tree, tmp_path / "v2.tar", keypair), keypair))
    python = slots.python_path(B)
    assert python == slots.directory(B) / "python"
    assert (python / "basalt" / "machined" / "main.py").read_text() == "print('machined')\n"
    manifest = json.loads((slots.directory(B) / "manifest.json").read_text())
    assert manifest["version"] == "0.2.0"

    (tree / "machined" / "main.py").write_text("print('v3')\n")
    slots.write(B, verified(build(tree, tmp_path / "v3.tar", keypair, "0.3.0"), keypair))
    assert (python / "basalt" / "machined" / "main.py").read_text() == "print('v3')\n"
    assert sorted(p.name for p in slots.root.iterdir()) == ["b"]  # no temp or old dirs left


@pytest.mark.parametrize("how", CHANGES)
def test_a_bundle_changed_after_verification_is_not_written(
    tmp_path, tree, keypair, how: Change
) -> None:
    slots = SlotDirectories(tmp_path / "slots")
    bundle = build(tree, tmp_path / "v2.tar", keypair)
    good = verified(bundle, keypair)
    slots.write(B, good)
    before = (slots.directory(B) / BASALT_TREE).read_bytes()
    change(good, how)
    with pytest.raises(SlotWriteError, match=f"changed after it was verified: {CHANGES[how]}"):
        slots.write(B, good)
    assert (slots.directory(B) / BASALT_TREE).read_bytes() == before
    assert sorted(p.name for p in slots.root.iterdir()) == ["b"]


def test_a_tree_outside_the_basalt_package_is_refused(tmp_path, keypair) -> None:
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "x.py"
    payload.write_text("x = 1\n")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="basalt/__init__.py")
        tar.add(payload, arcname="sitecustomize.py")
    bundle = tmp_path / "b.tar"
    key = load_signing_key(keypair[0])
    create_bundle(bundle, {BASALT_TREE: evil}, "0.2.0", "x", "x86_64", key)
    slots = SlotDirectories(tmp_path / "slots")
    with pytest.raises(SlotWriteError, match=r"'sitecustomize\.py' is outside the basalt/"):
        slots.write(A, verified(bundle, keypair))
    assert not slots.directory(A).exists() and not (slots.root / ".a.tmp").exists()


def test_write_tree_tar_needs_a_package(tmp_path) -> None:
    from basalt.machinery.errors import BasaltError

    with pytest.raises(BasaltError, match="not the basalt package"):
        write_tree_tar(tmp_path, tmp_path / "t.tar")


def test_stage_and_clear(tmp_path) -> None:
    slots = SlotDirectories(tmp_path / "slots")
    assert slots.staged() is None
    upload = tmp_path / "upload.tar"
    upload.write_bytes(b"bundle")
    slots.stage(upload)
    staged = slots.staged()
    assert staged is not None and staged.read_bytes() == b"bundle"
    slots.clear_staged()
    assert slots.staged() is None


# -- the launcher as firmware ---------------------------------------------------------------------


def state_of(node_dir: Path) -> BootState:
    state = SlotDirectories.of_node(node_dir).load()
    assert state is not None
    return state


def install(node_dir: Path, tree: Path, keypair: tuple[str, str], version: str) -> None:
    """What machined does on an upgrade: write the inactive slot, then record Install."""
    bundle = build(tree, node_dir.parent / f"{version}.tar", keypair, version)
    bundles.install(SlotDirectories.of_node(node_dir), verified(bundle, keypair))


def test_first_boot_is_slot_a_from_the_installed_basalt(tmp_path) -> None:
    choice = choose_boot(tmp_path, "0.1.0")
    assert (choice.slot, choice.version, choice.python_path) == ("a", "0.1.0", None)
    assert state_of(tmp_path) == apply(initial_state("0.1.0"), Boot()).state
    env = child_env(choice)
    assert env[BOOTED_SLOT_ENV] == "a" and VERSION_ENV not in env


def test_an_installed_slot_boots_on_trial_with_its_tree_and_version(
    tmp_path, tree, keypair, monkeypatch
) -> None:
    node = tmp_path / "node"
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    choose_boot(node, "0.1.0")
    install(node, tree, keypair, "0.2.0")
    choice = choose_boot(node, "0.1.0")
    assert (choice.slot, choice.version) == ("b", "0.2.0")
    assert "on trial: try 1 of 3" in choice.message
    env = child_env(choice)
    assert env[VERSION_ENV] == "0.2.0"
    assert env["PYTHONPATH"] == f"{node / 'slots' / 'b' / 'python'}:/elsewhere"
    state = state_of(node)
    assert state.booted is B and state.b.tries_left == 2
    SlotDirectories.of_node(node).save(apply(state, GatesPassed()).state)
    assert choose_boot(node, "0.1.0").message == "booting slot b (0.2.0)"


def test_crashes_count_against_a_slot_on_trial_until_it_falls_back(tmp_path, tree, keypair) -> None:
    node = tmp_path / "node"
    choose_boot(node, "0.1.0")
    install(node, tree, keypair, "0.2.0")
    for _ in range(3):
        choice = choose_boot(node, "0.1.0")
        assert choice.slot == "b"
        assert "machined exited with code 1" in (record_crash(node, choice.slot, 1) or "")
    choice = choose_boot(node, "0.1.0")
    assert choice.slot == "a" and "slot b (0.2.0) has no boot tries left" in choice.message
    state = state_of(node)
    assert state.b.health is SlotHealth.BAD and state.b.reason == "machined exited with code 1"
    assert record_crash(node, "a", 1) is None  # a good slot's crash changes nothing


def test_a_slot_whose_files_are_gone_uses_up_its_tries(tmp_path, tree, keypair) -> None:
    import shutil

    node = tmp_path / "node"
    choose_boot(node, "0.1.0")
    install(node, tree, keypair, "0.2.0")
    shutil.rmtree(node / "slots" / "b")
    choice = choose_boot(node, "0.1.0")
    assert choice.slot == "a" and choice.python_path is None
    assert "slot b (0.2.0): slot files are missing" in choice.message
    assert state_of(node).b.health is SlotHealth.BAD


def test_an_unreadable_boot_state_boots_the_installed_basalt(tmp_path) -> None:
    (tmp_path / "slots").mkdir()
    (tmp_path / "slots" / "boot.json").write_text("{not json")
    choice = choose_boot(tmp_path, "0.1.0")
    assert choice.slot is None and "boot state unusable" in choice.message
    assert BOOTED_SLOT_ENV not in child_env(choice)
