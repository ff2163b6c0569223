"""The support bundle's archive, scrubber, redaction and summary (no node needed)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from basalt.cli._collect import (
    NodeState,
    Scrubber,
    SupportArchive,
    event_line,
    node_dir,
    redact_sensitive_spec,
    summary,
)
from basalt.cli.main import main
from basalt.machinery.api import machine_pb2
from basalt.machinery.config.redact import SECRET, secret_values
from basalt.machinery.config.secrets import SecretsBundle


def _documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


def _bundle_secrets(secrets: SecretsBundle) -> list[str]:
    raw = secrets.model_dump(mode="json", by_alias=True)
    found = [raw["cluster"]["secret"], *raw["tokens"].values()]
    return found + [pair["key"] for pair in raw["certs"].values() if pair.get("key")]


def _zip(buffer: io.BytesIO) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_scrubber_replaces_values_pem_lines_and_base64(cp_yaml: str) -> None:
    scrub = Scrubber()
    scrub.arm(_documents(cp_yaml))
    values = secret_values(_documents(cp_yaml))
    assert values
    pem = next(v for v in values if "PRIVATE KEY" in v)
    middle = pem.splitlines()[2]
    text = f"a {values[0]} b\nline {middle} end\nb64 {base64.b64encode(pem.encode()).decode()}\n"
    cleaned = scrub(text)
    assert values[0] not in cleaned and middle not in cleaned
    assert cleaned.count(SECRET) == 3


def test_machine_config_redaction_covers_the_secrets_bundle(
    cp_yaml: str, secrets: SecretsBundle
) -> None:
    redacted = redact_sensitive_spec("MachineConfigs", {"yaml": cp_yaml, "staged": False})
    assert redacted["staged"] is False
    assert SECRET in redacted["yaml"]
    for value in _bundle_secrets(secrets):
        for line in value.splitlines():
            if len(line) >= 16 and not line.startswith("-----"):
                assert line not in redacted["yaml"]
    # Still a config: same documents and kinds.
    kinds = [d["kind"] for d in _documents(redacted["yaml"])]
    assert kinds == [d["kind"] for d in _documents(cp_yaml)]


def test_an_unknown_sensitive_type_keeps_its_shape_but_no_text() -> None:
    spec = {"name": "x", "size": 3, "ok": True, "inner": {"key": "abc", "list": ["d", 4]}}
    assert redact_sensitive_spec("SomeKeys", spec) == {
        "name": SECRET,
        "size": 3,
        "ok": True,
        "inner": {"key": SECRET, "list": [SECRET, 4]},
    }


def test_a_secret_split_across_chunks_is_still_scrubbed() -> None:
    scrub = Scrubber()
    scrub.add("s3cr3t-value-that-is-long")
    buffer = io.BytesIO()
    archive = SupportArchive(buffer, scrub)
    with archive.open_text("nodes/n/logs/x.log", "a log") as out:
        out.write(b"first line\nhere is s3cr3t-va")
        out.write(b"lue-that-is-long and more\n")
        # A long stretch without a newline, the secret crossing the write boundary.
        out.write(b"y" * (1024 * 1024 + 5) + b"s3cr3t-value-tha")
        out.write(b"t-is-long\xc3")  # and half a UTF-8 character
        out.write(b"\xa9 tail")
    archive.finish({"collected": "now"})
    data = _zip(buffer)["nodes/n/logs/x.log"].decode()
    assert "s3cr3t" not in data
    assert data.count(SECRET) == 2
    assert data.endswith("\u00e9 tail")
    assert data.startswith("first line\nhere is (secret) and more\n")


def test_readme_and_manifest_list_files_and_failures() -> None:
    buffer = io.BytesIO()
    archive = SupportArchive(buffer)
    archive.yaml("nodes/a/version.yaml", "the version", {"tag": "1"})
    archive.failed("b", "version", "UNAVAILABLE: no route")
    with pytest.raises(RuntimeError), archive.open_text("nodes/a/dmesg.log", "the kernel log") as o:
        o.write("half\n")
        raise RuntimeError("stream broke")
    archive.failed("a", "dmesg", "stream broke")
    assert archive.node_entries() == 1  # the incomplete one does not count
    archive.finish({"collected": "now", "nodes": ["a", "b"]})
    members = _zip(buffer)
    readme = members["README.txt"].decode()
    assert "nodes/a/version.yaml" in readme and "the version" in readme
    assert "nodes/a/dmesg.log" in readme and "INCOMPLETE" in readme
    assert "b: version: UNAVAILABLE: no route" in readme
    assert "nodes: a, b" in readme
    manifest = json.loads(members["manifest.json"])
    assert {f["name"]: f["complete"] for f in manifest["files"]} == {
        "nodes/a/version.yaml": True,
        "nodes/a/dmesg.log": False,
    }
    assert manifest["failures"][0] == {
        "where": "b",
        "item": "version",
        "error": "UNAVAILABLE: no route",
    }
    assert members["nodes/a/dmesg.log"] == b"half\n"


def test_failures_are_scrubbed_too() -> None:
    scrub = Scrubber()
    scrub.add("tok123.abcdefghijklmnop")
    archive = SupportArchive(io.BytesIO(), scrub)
    archive.failed("n", "log", "bad token tok123.abcdefghijklmnop")
    assert archive.failures[0].error == f"bad token {SECRET}"


def test_summary_compares_etcd_views() -> None:
    def node(label: str, ids: list[str] | None, leader: str = "") -> NodeState:
        state = NodeState(label, [label], {"tag": "0.1.0", "machine_type": "controlplane"})
        if ids is not None:
            state.etcd_members = [{"id": i} for i in ids]
        state.etcd_leader = leader
        return state

    agree = summary([node("a", ["1", "2"], "1"), node("b", ["2", "1"], "1"), node("w", None)])
    assert agree["etcd"]["membersAgree"] is True and agree["etcd"]["leadersAgree"] is True
    assert set(agree["etcd"]["membersAsSeenBy"]) == {"a", "b"}
    split = summary([node("a", ["1", "2"], "1"), node("b", ["1"], "2")])
    assert split["etcd"]["membersAgree"] is False and split["etcd"]["leadersAgree"] is False
    down = NodeState("c", ["c"], unreachable="UNAVAILABLE: refused")
    assert summary([down])["nodes"][0]["unreachable"] == "UNAVAILABLE: refused"
    assert summary([down])["etcd"]["membersAgree"] is None


def test_node_dirs_and_event_lines() -> None:
    assert node_dir("10.0.0.2") == "nodes/10.0.0.2"
    assert node_dir("fd00::1") == "nodes/fd00__1"
    assert node_dir("../x") == "nodes/.._x"
    event = machine_pb2.Event(
        id="7", type="boot", timestamp=0, actor="boot", message="slot a", fields={"k": "v"}
    )
    line = event_line(event)
    assert line.startswith("7 ") and "1970-01-01 00:00:00" in line and line.endswith("k=v\n")


def test_an_existing_output_is_refused_before_anything_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "support.zip"
    out.write_bytes(b"keep me")
    # No client config at all: the refusal comes first and names the file.
    code = main(["--basaltconfig", str(tmp_path / "none"), "support", "-o", str(out)])
    assert code == 1
    assert out.read_bytes() == b"keep me"
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
