"""Basalt Fleet's pure parts: the fleet URL, sealed secrets, templates, the audit chain,
roles and scopes, the client config's fleet login, FleetConfig."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from basalt.fleet.audit import GENESIS, digest_of, verify
from basalt.fleet.auth import FleetRole, Scope, token_digest
from basalt.fleet.db import AuditEntry
from basalt.fleet.secretbox import SecretBox, SecretsKeyError
from basalt.fleet.template import parse_template
from basalt.machinery.errors import BasaltError, ConfigValidationError
from basalt.machinery.fleetlink.url import FleetURLError, parse_fleet_url

PIN = "ab" * 32


def test_fleet_url_parses_and_redacts_its_token() -> None:
    url = parse_fleet_url(f"https://10.0.2.2:8443/?token=bfj_1.secret&ca=sha256:{PIN.upper()}")
    assert (url.host, url.port, url.token, url.ca_sha256) == ("10.0.2.2", 8443, "bfj_1.secret", PIN)
    assert "secret" not in url.redacted()
    assert parse_fleet_url(str(url)) == url
    assert parse_fleet_url(f"https://[fd00::1]:9/?token=t&ca=sha256:{PIN}").base == (
        "https://[fd00::1]:9"
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (f"http://h:1/?token=t&ca=sha256:{PIN}", "https://"),
        (f"https://h:x/?token=t&ca=sha256:{PIN}", "port"),
        (f"https://:1/?token=t&ca=sha256:{PIN}", "no host"),
        (f"https://h:1/?ca=sha256:{PIN}", "token="),
        (f"https://h:1/?token=a&token=b&ca=sha256:{PIN}", "token="),
        ("https://h:1/?token=t", "ca=sha256"),
        ("https://h:1/?token=t&ca=md5:00", "ca=sha256"),
        ("https://h:1/?token=t&ca=sha256:1234", "64 hex"),
    ],
)
def test_a_bad_fleet_url_names_the_part(text: str, named: str) -> None:
    with pytest.raises(FleetURLError) as refused:
        parse_fleet_url(text, "basalt.fleet")
    assert named in str(refused.value) and str(refused.value).startswith("basalt.fleet:")


def test_secretbox_seals_opens_and_names_a_wrong_key(tmp_path: Path) -> None:
    box = SecretBox.from_file(tmp_path / "k", create=True)
    assert oct((tmp_path / "k").stat().st_mode & 0o777) == "0o600"
    sealed = box.seal(b"PRIVATE KEY", "setting ca.key")
    assert b"PRIVATE KEY" not in sealed
    assert box.open(sealed, "setting ca.key") == b"PRIVATE KEY"
    with pytest.raises(SecretsKeyError, match="altered"):
        box.open(sealed, "another row")  # the context is authenticated
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SecretsKeyError, match="altered"):
        box.open(tampered, "setting ca.key")
    other = SecretBox(os.urandom(32), "other.key")
    with pytest.raises(SecretsKeyError, match="another secrets key"):
        other.open(sealed, "setting ca.key")
    with pytest.raises(SecretsKeyError, match="32 bytes"):
        SecretBox(b"short")
    with pytest.raises(SecretsKeyError, match="cannot read"):
        SecretBox.from_file(tmp_path / "missing")


TEMPLATE = """\
apiVersion: fleet.basalt.dev/v1alpha1
kind: Cluster
name: edge
labels: {team: x}
controlPlane: {count: 3, machineSelector: {role: cp}}
workers:
  - name: default
    count: 2
    patches:
      - {kind: SysctlConfig, sysctls: {vm.max_map_count: "262144"}}
      - [{op: add, path: /machine/install/disk, value: /dev/vdb}]
      - |
        kind: SysctlConfig
        sysctls: {net.core.somaxconn: "1024"}
backup: {interval: 6h, keep: 3}
"""


def test_a_template_parses_with_every_patch_format() -> None:
    template = parse_template(TEMPLATE, "edge.yaml")
    assert template.spec.control_plane.machine_selector == {"role": "cp"}
    patches = template.set_patches("worker", "default")
    assert [type(p).__name__ for p in patches] == ["MergePatch", "JSONPatch", "MergePatch"]
    assert patches[1].source == "edge.yaml: workers[0].patches[1]"
    assert template.spec.backup is not None and template.spec.backup.keep == 3


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (("count: 3", "count: 0"), "Cluster.controlPlane.count"),
        (("name: edge", "name: Edge_1"), "Cluster.name"),
        (("kind: Cluster", "kind: Klaster"), "Cluster.kind"),
        (("interval: 6h", "interval: often"), "Cluster.backup.interval"),
        (("  - name: default", "  - name: default\n    colour: red"), "Cluster.workers[0].colour"),
    ],
)
def test_a_bad_template_names_the_field_and_line(change: tuple[str, str], where: str) -> None:
    with pytest.raises(ConfigValidationError) as refused:
        parse_template(TEMPLATE.replace(*change), "edge.yaml")
    rendered = [p.render() for p in refused.value.problems]
    assert any(where in r and r.startswith("edge.yaml:") for r in rendered), rendered


def test_template_refusals_that_are_not_field_errors() -> None:
    with pytest.raises(BasaltError, match="one YAML mapping"):
        parse_template("- a\n- b\n", "x.yaml")
    twice = TEMPLATE.replace("workers:\n", "workers:\n  - {name: default, count: 1}\n")
    with pytest.raises(BasaltError, match="'default' is used twice"):
        parse_template(twice, "x.yaml")
    broken = TEMPLATE.replace('sysctls: {net.core.somaxconn: "1024"}', "sysctls: [unclosed")
    with pytest.raises(BasaltError, match=r"x\.yaml: workers\[0\]\.patches\[2\]"):
        parse_template(broken, "x.yaml")


def _entry(n: int, previous: str) -> AuditEntry:
    entry = AuditEntry(
        id=n,
        at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=n),
        actor="a",
        action="x",
        target=str(n),
        detail={"n": n},
        previous=previous,
        digest="",
    )
    entry.digest = digest_of(entry)
    return entry


def test_the_audit_chain_detects_edits_removals_and_reordering() -> None:
    chain = []
    previous = GENESIS
    for n in range(1, 6):
        chain.append(_entry(n, previous))
        previous = chain[-1].digest
    assert verify(chain) == []
    chain[1].actor = "mallory"
    assert [(b.entry, "edited" in b.reason) for b in verify(chain)] == [(2, True)]
    chain[1].actor = "a"
    assert [b.entry for b in verify(chain[:2] + chain[3:])] == [4, 4]
    assert verify(chain[1:])  # the first entries gone


def test_roles_rank_and_scopes_cover() -> None:
    assert FleetRole.ADMIN.allows(FleetRole.OPERATOR)
    assert not FleetRole.READER.allows(FleetRole.OPERATOR)
    assert Scope().covers("any", {})
    by_name = Scope(("alpha",))
    assert by_name.covers("alpha", {}) and not by_name.covers("beta", {"team": "x"})
    by_label = Scope((), {"team": "x"})
    assert by_label.covers("beta", {"team": "x", "env": "p"}) and not by_label.covers("b", {})
    assert token_digest("bft_x") != token_digest("bft_y") and len(token_digest("t")) == 64


def test_the_client_config_keeps_the_fleet_login(tmp_path: Path) -> None:
    from basalt.machinery.client.config import (
        ClientConfig,
        FleetLogin,
        load_client_config,
        parse_client_config,
        save_client_config,
    )

    config = ClientConfig(fleet=FleetLogin("https://f:8443", "bft_t", "-----CA-----"))
    save_client_config(config, tmp_path / "c")
    assert load_client_config(tmp_path / "c").fleet == config.fleet
    with pytest.raises(ConfigValidationError) as refused:
        parse_client_config("fleet: {url: u, tokn: t, ca: c}\n", "cfg")
    rendered = " ".join(p.render() for p in refused.value.problems)
    assert "fleet.tokn" in rendered and "did you mean 'token'" in rendered


def test_fleet_config_document_checks_its_url() -> None:
    from basalt.machinery.config import FleetConfig

    good = f"https://fleet:8443/?token=bfj_1.x&ca=sha256:{PIN}"
    assert (
        FleetConfig.model_validate(
            {"apiVersion": "basalt.dev/v1alpha1", "kind": "FleetConfig", "url": good}
        ).url
        == good
    )
    with pytest.raises(Exception, match="ca=sha256"):
        FleetConfig.model_validate(
            {
                "apiVersion": "basalt.dev/v1alpha1",
                "kind": "FleetConfig",
                "url": "https://f:1/?token=t",
            }
        )
