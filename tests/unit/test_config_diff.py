"""What changed between two configs, whether it needs a reboot, and the apply mode chosen."""

from __future__ import annotations

import functools

import pytest

from basalt.machined.apply import RebootRequiredError, decide
from basalt.machinery.api.machine_pb2 import ApplyMode
from basalt.machinery.config import ConfigBundle, apply_patches, bundle_from_raw
from basalt.machinery.config.diff import Change, config_changes, needs_reboot, unified_diff
from basalt.machinery.errors import BasaltError
from tests.fakes import inputs

LINK = "kind: LinkConfig\nname: eth0\naddresses: [192.0.2.5/24]\n"


@functools.cache
def base() -> ConfigBundle:
    """A generated control plane config with one link, the config every case starts from."""
    return inputs.generate(LINK).controlplane


def patched(*texts: str) -> ConfigBundle:
    """``base()`` with merge patches applied (no cross-document checks, like a live node)."""
    return bundle_from_raw(apply_patches(base().to_raw(), inputs.patches(*texts)))


LIVE_CASES = {
    "hostname added": (
        "kind: HostnameConfig\nhostname: cp-1\n",
        ["HostnameConfig"],
    ),
    "link changed": (
        "kind: LinkConfig\nname: eth0\nmtu: 9000\n",
        ["LinkConfig(eth0).mtu"],
    ),
    "link removed": (
        "kind: LinkConfig\nname: eth0\n$patch: delete\n",
        ["LinkConfig(eth0)"],
    ),
    "certSANs": (
        "kind: MachineConfig\ncertSANs: [cp.example.org, 192.0.2.99]\n",
        ["MachineConfig.certSANs"],
    ),
    "kubelet extraArgs": (
        "kind: MachineConfig\nkubelet:\n  extraArgs:\n    node-labels: a=b\n",
        ["MachineConfig.kubelet.extraArgs"],
    ),
    "etcd extraArgs with a dotted key": (
        "kind: ClusterConfig\netcd:\n  extraArgs:\n    log.level: debug\n",
        ["ClusterConfig.etcd.extraArgs"],
    ),
    "sysctl added": (
        "kind: SysctlConfig\nsysctls:\n  net.ipv4.ip_forward: '1'\n",
        ["SysctlConfig"],
    ),
    "two live changes": (
        "kind: HostnameConfig\nhostname: cp-1\n---\nkind: LinkConfig\nname: eth0\nmtu: 1400\n",
        ["LinkConfig(eth0).mtu", "HostnameConfig"],
    ),
}

REBOOT_CASES = {
    "machine type": ("kind: MachineConfig\ntype: worker\n", ["MachineConfig.type"]),
    "pod subnets": (
        "kind: ClusterConfig\nnetwork:\n  podSubnets: [10.200.0.0/16]\n",
        ["ClusterConfig.network.podSubnets"],
    ),
    "kernel module added": (
        "kind: KernelModuleConfig\nname: br_netfilter\n",
        ["KernelModuleConfig(br_netfilter)"],
    ),
    "kubernetes version": (
        "kind: ClusterConfig\nkubernetes:\n  version: v1.35.0\n",
        ["ClusterConfig.kubernetes.version"],
    ),
}


def test_no_change() -> None:
    same = patched()
    assert config_changes(base(), same) == []
    assert unified_diff(base(), same) == ""
    assert decide(base(), same, ApplyMode.AUTO) == (ApplyMode.NO_REBOOT, "no changes", [])


@pytest.mark.parametrize(
    "mode", [ApplyMode.NO_REBOOT, ApplyMode.REBOOT, ApplyMode.STAGED, ApplyMode.TRY]
)
def test_no_change_keeps_an_explicit_mode(mode: ApplyMode.ValueType) -> None:
    assert decide(base(), patched(), mode) == (mode, "no changes", [])


@pytest.mark.parametrize(("patch", "fields"), LIVE_CASES.values(), ids=LIVE_CASES.keys())
def test_live_changes(patch: str, fields: list[str]) -> None:
    new = patched(patch)
    changes = config_changes(base(), new)
    assert [c.where for c in changes] == fields
    assert not any(c.needs_reboot for c in changes)

    mode, why, decided = decide(base(), new, ApplyMode.AUTO)
    assert mode == ApplyMode.NO_REBOOT
    assert why == f"chose no-reboot: every change applies live ({', '.join(fields)})"
    assert decided == changes

    assert decide(base(), new, ApplyMode.NO_REBOOT)[:2] == (
        ApplyMode.NO_REBOOT,
        f"applied live: {', '.join(fields)}",
    )
    assert decide(base(), new, ApplyMode.TRY)[0] == ApplyMode.TRY


@pytest.mark.parametrize(("patch", "fields"), REBOOT_CASES.values(), ids=REBOOT_CASES.keys())
def test_reboot_changes(patch: str, fields: list[str]) -> None:
    new = patched(patch)
    changes = config_changes(base(), new)
    assert [c.where for c in changes] == fields
    assert all(c.needs_reboot for c in changes)

    mode, why, _ = decide(base(), new, ApplyMode.AUTO)
    assert mode == ApplyMode.REBOOT
    assert why == f"chose reboot: {', '.join(fields)} need a reboot"

    for refused, name in ((ApplyMode.NO_REBOOT, "no-reboot"), (ApplyMode.TRY, "try")):
        with pytest.raises(RebootRequiredError) as caught:
            decide(base(), new, refused)
        error = caught.value
        assert isinstance(error, BasaltError)
        assert str(error) == (
            f"{name} cannot apply changes that need a reboot: {', '.join(fields)}"
        )
        assert error.hint is not None
        assert "--mode reboot" in error.hint

    assert decide(base(), new, ApplyMode.REBOOT)[:2] == (ApplyMode.REBOOT, "committed; rebooting")
    assert decide(base(), new, ApplyMode.STAGED)[0] == ApplyMode.STAGED


def test_mixed_changes_list_only_the_reboot_ones_as_the_reason() -> None:
    new = patched(
        "kind: HostnameConfig\nhostname: cp-1\n",
        "kind: ClusterConfig\nnetwork:\n  podSubnets: [10.200.0.0/16]\n",
    )
    mode, why, changes = decide(base(), new, ApplyMode.AUTO)
    assert mode == ApplyMode.REBOOT
    assert why == "chose reboot: ClusterConfig.network.podSubnets need a reboot"
    assert [c.where for c in changes] == ["ClusterConfig.network.podSubnets", "HostnameConfig"]
    with pytest.raises(RebootRequiredError) as caught:
        decide(base(), new, ApplyMode.NO_REBOOT)
    assert "HostnameConfig" not in str(caught.value)
    assert "ClusterConfig.network.podSubnets" in str(caught.value)


@pytest.mark.parametrize(
    ("document", "path", "reboot"),
    [
        ("HostnameConfig", "", False),
        ("LinkConfig(eth0)", "addresses[0]", False),
        ("MachineConfig", "", True),  # added or removed whole
        ("MachineConfig", "certSANs", False),
        ("MachineConfig", "certSANs[2]", False),
        ("MachineConfig", "kubelet.extraArgs", False),
        ("MachineConfig", 'kubelet.extraArgs["node-labels"]', False),
        ("MachineConfig", "kubeletImage", True),  # a prefix of a name is not its parent
        ("MachineConfig", "token", True),
        ("MachineConfig", "ca.crt", False),  # rotate-ca: certificates issued again live
        ("ClusterConfig", "etcd.extraArgs", False),
        ("ClusterConfig", 'etcd.extraArgs["log.level"]', False),
        ("ClusterConfig", "etcd.ca", True),
        ("ClusterConfig", "network.podSubnets", True),
        ("KernelModuleConfig(br_netfilter)", "", True),
        ("KernelModuleConfig(br_netfilter)", "parameters", True),
    ],
)
def test_needs_reboot(document: str, path: str, reboot: bool) -> None:
    assert needs_reboot(document, path) is reboot


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (Change("HostnameConfig", "", False), "HostnameConfig"),
        (Change("LinkConfig(eth0)", "mtu", False), "LinkConfig(eth0).mtu"),
        (Change("SysctlConfig", '["a.b"]', False), 'SysctlConfig["a.b"]'),
    ],
)
def test_change_where(change: Change, where: str) -> None:
    assert change.where == where


def test_unified_diff_shows_only_changed_documents_with_headers() -> None:
    new = patched(
        "kind: LinkConfig\nname: eth0\nmtu: 9000\n",
        "kind: HostnameConfig\nhostname: cp-1\n",
    )
    diff = unified_diff(base(), new)
    headers = [line for line in diff.splitlines() if line.startswith(("--- ", "+++ "))]
    assert headers == [
        "--- a/LinkConfig(eth0)",
        "+++ b/LinkConfig(eth0)",
        "--- a/HostnameConfig",
        "+++ b/HostnameConfig",
    ]
    assert "+mtu: 9000\n" in diff
    assert "+hostname: cp-1\n" in diff
    assert "MachineConfig" not in diff
    assert "ClusterConfig" not in diff
    assert "BEGIN PRIVATE KEY" not in diff  # unchanged documents (and their keys) stay out


def test_unified_diff_of_a_removed_document() -> None:
    diff = unified_diff(base(), patched("kind: LinkConfig\nname: eth0\n$patch: delete\n"))
    lines = diff.splitlines()
    assert lines[:2] == ["--- a/LinkConfig(eth0)", "+++ b/LinkConfig(eth0)"]
    assert "-name: eth0" in lines
    assert not any(line.startswith("+") and not line.startswith("+++") for line in lines)


def test_unified_diff_of_a_changed_value_shows_old_and_new() -> None:
    diff = unified_diff(base(), patched("kind: MachineConfig\ntype: worker\n"))
    assert diff.startswith("--- a/MachineConfig\n+++ b/MachineConfig\n")
    assert "-type: controlplane\n" in diff
    assert "+type: worker\n" in diff
