"""basaltctl end to end: real files, real exit codes, every refusal leaves files untouched."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from basalt.cli.main import main
from basalt.machinery import pki

ENDPOINT = "https://127.0.0.11:6443"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def secrets_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "secrets.yaml"
    assert run(capsys, "gen", "secrets", "-o", str(path))[0] == 0
    return path


def gen_config(capsys: pytest.CaptureFixture[str], secrets: Path, out: Path, *extra: str):
    return run(
        capsys,
        "gen",
        "config",
        "demo",
        ENDPOINT,
        "--with-secrets",
        str(secrets),
        "--version-contract",
        "0.1",
        "-o",
        str(out),
        *extra,
    )


def test_gen_secrets_refuses_to_overwrite(secrets_file: Path, capsys) -> None:
    before = secrets_file.read_bytes()
    code, _, err = run(capsys, "gen", "secrets", "-o", str(secrets_file))
    assert code == 1
    assert "already exists" in err and "--force" in err
    assert secrets_file.read_bytes() == before
    assert run(capsys, "gen", "secrets", "-o", str(secrets_file), "--force")[0] == 0
    assert secrets_file.read_bytes() != before
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600


def test_gen_config_is_reproducible(secrets_file: Path, tmp_path: Path, capsys) -> None:
    patch = tmp_path / "p.yaml"
    patch.write_text("apiVersion: basalt.dev/v1alpha1\nkind: HostnameConfig\nhostname: cp-1\n")
    assert gen_config(capsys, secrets_file, tmp_path / "a", "--config-patch", f"@{patch}")[0] == 0
    assert gen_config(capsys, secrets_file, tmp_path / "b", "--config-patch", f"@{patch}")[0] == 0
    for name in ("controlplane.yaml", "worker.yaml"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes()
        assert b"hostname: cp-1" in first
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in (tmp_path / "a" / "worker.yaml").read_bytes()


def test_basaltconfig_holds_an_admin_cert_signed_by_the_os_ca(
    secrets_file: Path, tmp_path: Path, capsys
) -> None:
    assert gen_config(capsys, secrets_file, tmp_path)[0] == 0
    client = yaml.safe_load((tmp_path / "basaltconfig").read_text())
    context = client["contexts"][client["context"]]
    assert client["context"] == "demo"
    assert context["endpoints"] == ["127.0.0.11"]
    secrets = yaml.safe_load(secrets_file.read_text())
    assert pki.verify_issued_by(context["crt"], secrets["certs"]["os"]["crt"])
    assert pki.certificate_organizations(context["crt"]) == ["os:admin"]
    assert pki.key_matches_certificate(context["crt"], context["key"])


def test_gen_config_without_secrets_writes_a_new_bundle(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "gen", "config", "demo", ENDPOINT, "-o", str(tmp_path))
    assert code == 0
    assert "Pin it" in err  # no --version-contract: warned
    assert {"secrets.yaml", "controlplane.yaml", "worker.yaml", "basaltconfig"} <= set(
        os.listdir(tmp_path)
    )


def test_gen_config_output_types(secrets_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "only-worker"
    assert gen_config(capsys, secrets_file, out, "-t", "worker")[0] == 0
    assert os.listdir(out) == ["worker.yaml"]
    code, _, err = gen_config(capsys, secrets_file, tmp_path / "x", "-t", "worker,laptop")
    assert code == 1 and "laptop" in err


def test_gen_config_refuses_any_existing_output_and_writes_nothing(
    secrets_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "worker.yaml").write_text("mine\n")
    code, _, err = gen_config(capsys, secrets_file, out)
    assert code == 1 and "worker.yaml already exists" in err
    assert snapshot(out) == {"worker.yaml": b"mine\n"}


def test_bad_patch_names_file_and_line_and_writes_nothing(
    secrets_file: Path, tmp_path: Path, capsys
) -> None:
    patch = tmp_path / "bad.yaml"
    patch.write_text(
        "apiVersion: basalt.dev/v1alpha1\n"
        "kind: ClusterConfig\n"
        "network:\n"
        "  podSubnets: [10.244.0.1/16]\n"
        "  dnsDomian: cluster.local\n"
    )
    out = tmp_path / "out"
    code, _, err = gen_config(capsys, secrets_file, out, "--config-patch", f"@{patch}")
    assert code == 1
    assert f"{patch}:4: error: ClusterConfig.network.podSubnets[0]" in err
    assert f"{patch}:5: error: ClusterConfig.network.dnsDomian: unknown field" in err
    assert "did you mean 'dnsDomain'?" in err
    assert not out.exists()


def test_patch_yaml_syntax_error(secrets_file: Path, tmp_path: Path, capsys) -> None:
    patch = tmp_path / "broken.yaml"
    patch.write_text("kind: ClusterConfig\nnetwork:\n  podSubnets: [10.0.0.0/8\n")
    code, _, err = gen_config(capsys, secrets_file, tmp_path / "o", "--config-patch", f"@{patch}")
    assert code == 1
    assert f"{patch}:4" in err and "YAML syntax error" in err
    assert "Traceback" not in err


def test_missing_patch_file(secrets_file: Path, tmp_path: Path, capsys) -> None:
    code, _, err = gen_config(capsys, secrets_file, tmp_path / "o", "--config-patch", "@nope.yaml")
    assert code == 1 and "nope.yaml does not exist" in err


def test_contract_newer_than_tool_is_refused(secrets_file: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run(
        capsys,
        "gen",
        "config",
        "demo",
        ENDPOINT,
        "--with-secrets",
        str(secrets_file),
        "--version-contract",
        "9.9",
        "-o",
        str(tmp_path / "o"),
    )
    assert code == 1 and "newer than this basaltctl" in err
    assert not (tmp_path / "o").exists()


def test_validate_reports_every_error(secrets_file: Path, tmp_path: Path, capsys) -> None:
    assert gen_config(capsys, secrets_file, tmp_path)[0] == 0
    config = tmp_path / "controlplane.yaml"
    code, _, err = run(capsys, "validate", "-c", str(config), "--mode", "container")
    assert code == 0 and "valid for container mode" in err
    code, _, err = run(capsys, "validate", "-c", str(config), "--mode", "metal")
    assert code == 1 and "MachineConfig.install.disk: required on metal" in err
    text = config.read_text().replace("dnsDomain: cluster.local", "dnsDomain: Not_A_Domain")
    text = text.replace("type: controlplane", "type: master")
    config.write_text(text)
    code, _, err = run(capsys, "validate", "-c", str(config), "--mode", "metal")
    assert code == 1
    assert "2 errors found" in err  # field errors first; mode rules run on a parsed config
    assert "MachineConfig.type" in err and "ClusterConfig.network.dnsDomain" in err


def test_validate_strict_turns_warnings_into_errors(
    secrets_file: Path, tmp_path: Path, capsys
) -> None:
    assert gen_config(capsys, secrets_file, tmp_path, "--install-disk", "/dev/vda")[0] == 0
    config = str(tmp_path / "worker.yaml")
    assert run(capsys, "validate", "-c", config, "--mode", "container")[0] == 0
    code, _, err = run(capsys, "validate", "-c", config, "--mode", "container", "--strict")
    assert code == 1 and "ignored in container mode" in err


def test_machineconfig_patch(secrets_file: Path, tmp_path: Path, capsys) -> None:
    assert gen_config(capsys, secrets_file, tmp_path)[0] == 0
    config = str(tmp_path / "worker.yaml")
    code, out, _ = run(
        capsys,
        "machineconfig",
        "patch",
        config,
        "--patch",
        "{apiVersion: basalt.dev/v1alpha1, kind: LinkConfig, name: eth0, dhcp: true}",
    )
    assert code == 0
    documents = list(yaml.safe_load_all(out))
    assert documents[-1] == {
        "apiVersion": "basalt.dev/v1alpha1",
        "kind": "LinkConfig",
        "name": "eth0",
        "up": True,
        "dhcp": True,
    }
    code, _, err = run(
        capsys,
        "machineconfig",
        "patch",
        config,
        "--patch",
        '[{"op": "replace", "path": "/type", "value": "controlplane"}]',
    )
    assert code == 1 and "JSON patches apply to single-document configs" in err


def test_machineconfig_patch_json_on_single_document(tmp_path: Path, capsys) -> None:
    config = tmp_path / "link.yaml"
    config.write_text("apiVersion: basalt.dev/v1alpha1\nkind: LinkConfig\nname: eth0\nmtu: 1500\n")
    code, out, _ = run(
        capsys,
        "machineconfig",
        "patch",
        str(config),
        "--patch",
        '[{"op": "replace", "path": "/mtu", "value": 9000}]',
    )
    assert code == 0 and "mtu: 9000" in out
    code, _, err = run(
        capsys,
        "machineconfig",
        "patch",
        str(config),
        "--patch",
        '[{"op": "remove", "path": "/addresses/3"}]',
    )
    assert code == 1 and "operation 1 (remove /addresses/3)" in err


def test_client_config_contexts(secrets_file: Path, tmp_path: Path, capsys) -> None:
    assert gen_config(capsys, secrets_file, tmp_path / "g")[0] == 0
    home = tmp_path / "home-config"
    base = ("--basaltconfig", str(home))
    assert run(capsys, *base, "config", "merge", str(tmp_path / "g" / "basaltconfig"))[0] == 0
    code, _, err = run(capsys, *base, "config", "merge", str(tmp_path / "g" / "basaltconfig"))
    assert code == 0
    assert stat.S_IMODE(home.stat().st_mode) == 0o600
    # Merging an identical context again does not duplicate it.
    assert list(yaml.safe_load(home.read_text())["contexts"]) == ["demo"]
    assert gen_config(capsys, secrets_file, tmp_path / "h")[0] == 0
    code, _, err = run(capsys, *base, "config", "merge", str(tmp_path / "h" / "basaltconfig"))
    assert code == 0 and "demo-1" in err
    code, out, _ = run(capsys, *base, "config", "contexts")
    assert code == 0 and "demo-1" in out
    assert run(capsys, *base, "config", "use-context", "demo")[0] == 0
    assert run(capsys, *base, "config", "endpoint", "127.0.0.11,127.0.0.12")[0] == 0
    assert run(capsys, *base, "config", "node", "127.0.0.13")[0] == 0
    code, out, _ = run(capsys, *base, "config", "info")
    assert code == 0
    assert "127.0.0.11, 127.0.0.12" in out and "127.0.0.13" in out and "os:admin" in out
    code, _, err = run(capsys, *base, "config", "use-context", "nope")
    assert code == 1 and "context 'nope' is not in the client config" in err
    code, _, err = run(capsys, "--basaltconfig", str(tmp_path / "missing"), "config", "info")
    assert code == 1 and "does not exist" in err


def test_basaltconfig_env_var(secrets_file: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert gen_config(capsys, secrets_file, tmp_path)[0] == 0
    monkeypatch.setenv("BASALTCONFIG", str(tmp_path / "basaltconfig"))
    code, out, _ = run(capsys, "config", "info")
    assert code == 0 and "Current context:" in out and "demo" in out


def test_errors_are_one_clear_message_unless_debug(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    argv = [sys.executable, "-m", "basalt.cli.main", "validate", "-c", missing, "--mode", "metal"]
    plain = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert plain.returncode == 1
    assert plain.stderr.startswith(f"error: config {missing} does not exist")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(
        [*argv[:3], "--debug", *argv[3:]], capture_output=True, text=True, check=False
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_table_cells_are_printed_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    """Brackets in a cell (a progress bar, an error message) are text, not rich markup."""
    from basalt.cli._api import table

    table(["A", "B"], [["[####....] 4/8", "[bold]x[/bold]"]])
    out = capsys.readouterr().out
    assert "[####....] 4/8" in out and "[bold]x[/bold]" in out
