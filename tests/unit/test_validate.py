"""Whole-config rules: secrets by role, CA validity, install mode, subnets, contracts."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from basalt.machinery.config import Mode, bundle_from_raw, check_bundle, load_bundle
from basalt.machinery.config.validate import RULES, validate_bundle
from basalt.machinery.errors import ConfigValidationError, Problem
from tests.fakes import inputs
from tests.fakes.pki import make_certificate

API = inputs.API


def check_text(text: str, mode: Mode | None = None) -> list[Problem]:
    return validate_bundle(load_bundle(text, "node.yaml"), mode)


def errors_of(problems: list[Problem]) -> list[str]:
    return [p.where for p in problems if p.severity == "error"]


def pair(ca: Any) -> dict[str, str]:
    return {"crt": ca.crt, "key": ca.key}


# -- the generated configs are valid --------------------------------------------------------


@pytest.mark.parametrize("mode", [None, Mode.METAL, Mode.CONTAINER])
def test_generated_controlplane_is_valid(cp_yaml: str, mode: Mode | None) -> None:
    problems = check_bundle(load_bundle(cp_yaml), mode)
    expected = ["MachineConfig.install.disk"] if mode is Mode.CONTAINER else []
    assert [p.where for p in problems] == expected
    assert all(p.severity == "warning" for p in problems)


def test_generated_worker_is_valid(worker_yaml: str) -> None:
    assert check_bundle(load_bundle(worker_yaml), Mode.METAL) == []


def test_mode_capabilities() -> None:
    assert Mode.METAL.requires_install
    assert not Mode.CONTAINER.requires_install
    assert Mode("container") is Mode.CONTAINER


# -- secrets by role ----------------------------------------------------------------------------


def test_worker_holding_ca_keys_is_refused_at_every_slot(secrets: Any) -> None:
    documents = inputs.worker_raw()
    machine = inputs.find(documents, "MachineConfig")
    cluster = inputs.find(documents, "ClusterConfig")
    machine["ca"]["key"] = secrets.certs.os.key
    cluster["etcd"] = {"ca": pair(secrets.certs.etcd)}
    cluster["kubernetes"]["ca"]["key"] = secrets.certs.kubernetes.key
    cluster["kubernetes"]["aggregatorCA"] = pair(secrets.certs.kubernetes_aggregator)
    cluster["kubernetes"]["serviceAccountKey"] = {
        "key": secrets.certs.kubernetes_service_account.key
    }
    cluster["kubernetes"]["secretboxEncryptionSecret"] = secrets.tokens.secretbox_encryption_secret
    text = inputs.dump(documents)
    problems = check_text(text)
    assert errors_of(problems) == [
        "MachineConfig.ca.key",
        "ClusterConfig.etcd.ca.key",
        "ClusterConfig.kubernetes.ca.key",
        "ClusterConfig.kubernetes.aggregatorCA.key",
        "ClusterConfig.kubernetes.serviceAccountKey",
        "ClusterConfig.kubernetes.secretboxEncryptionSecret",
    ]
    ca_key = problems[0]
    assert ca_key.message == "workers must not hold CA private keys"
    assert ca_key.hint is not None and "gen config" in ca_key.hint
    assert ca_key.source == "node.yaml"
    assert ca_key.line == inputs.line_of(text, "  key: |")
    assert problems[4].message == "workers must not hold this secret"
    assert problems[5].line == inputs.line_of(text, "secretboxEncryptionSecret")


def test_worker_with_only_the_service_account_key_is_refused(secrets: Any) -> None:
    documents = inputs.worker_raw()
    cluster = inputs.find(documents, "ClusterConfig")
    cluster["kubernetes"]["serviceAccountKey"] = {
        "key": secrets.certs.kubernetes_service_account.key
    }
    assert errors_of(check_text(inputs.dump(documents))) == [
        "ClusterConfig.kubernetes.serviceAccountKey"
    ]


def test_control_plane_missing_keys_is_refused_at_every_slot() -> None:
    documents = inputs.controlplane_raw()
    machine = inputs.find(documents, "MachineConfig")
    cluster = inputs.find(documents, "ClusterConfig")
    del machine["ca"]["key"]
    del cluster["etcd"]["ca"]
    del cluster["kubernetes"]["ca"]["key"]
    del cluster["kubernetes"]["aggregatorCA"]
    del cluster["kubernetes"]["serviceAccountKey"]
    del cluster["kubernetes"]["secretboxEncryptionSecret"]
    problems = check_text(inputs.dump(documents))
    assert errors_of(problems) == [
        "MachineConfig.ca.key",
        "ClusterConfig.etcd.ca.key",
        "ClusterConfig.kubernetes.ca.key",
        "ClusterConfig.kubernetes.aggregatorCA.key",
        "ClusterConfig.kubernetes.serviceAccountKey",
        "ClusterConfig.kubernetes.secretboxEncryptionSecret",
    ]
    assert problems[0].message == "control planes need this CA's private key"
    assert problems[4].message == "control planes need this secret"
    assert all("--with-secrets" in (p.hint or "") for p in problems)


def test_rules_do_not_crash_without_machine_or_cluster() -> None:
    problems = check_text(f"apiVersion: {API}\nkind: LinkConfig\nname: eth0\n", Mode.METAL)
    assert [(p.where, p.message) for p in problems] == [
        ("MachineConfig", "document is missing"),
        ("ClusterConfig", "document is missing"),
    ]
    assert problems[0].hint is not None and "gen config" in problems[0].hint


def test_only_cluster_config_is_missing(cp_yaml: str) -> None:
    machine_only = cp_yaml[: cp_yaml.index("---\napiVersion: basalt.dev/v1alpha1\nkind: Cluster")]
    assert errors_of(check_text(machine_only, Mode.METAL)) == ["ClusterConfig"]


# -- CA certificates -----------------------------------------------------------------------------


def with_os_ca(ca: Any) -> str:
    documents = inputs.controlplane_raw()
    inputs.find(documents, "MachineConfig")["ca"] = pair(ca)
    return inputs.dump(documents)


def test_expired_ca_is_an_error() -> None:
    now = dt.datetime.now(dt.UTC)
    ca = make_certificate(
        not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=2)
    )
    text = with_os_ca(ca)
    (problem,) = check_text(text)
    assert problem.where == "MachineConfig.ca.crt"
    assert problem.message.startswith("expired on ")
    assert problem.hint is not None and "rotate" in problem.hint
    assert problem.line == inputs.line_of(text, "crt: |")


def test_ca_expiring_soon_is_a_warning() -> None:
    now = dt.datetime.now(dt.UTC)
    text = with_os_ca(make_certificate(not_after=now + dt.timedelta(days=10)))
    (problem,) = check_bundle(load_bundle(text))
    assert problem.severity == "warning"
    assert problem.message.startswith("expires on ")


def test_ca_not_yet_valid_is_an_error() -> None:
    now = dt.datetime.now(dt.UTC)
    text = with_os_ca(make_certificate(not_before=now + dt.timedelta(days=1)))
    (problem,) = check_text(text)
    assert problem.message.startswith("is not valid before ")
    assert problem.hint is not None and "clock" in problem.hint


def test_leaf_certificate_in_a_ca_slot_is_an_error() -> None:
    (problem,) = check_text(with_os_ca(make_certificate(ca=False)))
    assert (problem.where, problem.message) == ("MachineConfig.ca.crt", "is not a CA certificate")


# -- install disk by mode -------------------------------------------------------------------------


def without_disk(machine: dict[str, Any]) -> None:
    del machine["install"]["disk"]


def test_metal_requires_an_install_disk() -> None:
    documents = inputs.controlplane_raw()
    without_disk(inputs.find(documents, "MachineConfig"))
    text = inputs.dump(documents)
    with pytest.raises(ConfigValidationError) as caught:
        check_bundle(load_bundle(text, "cp.yaml"), Mode.METAL)
    (problem,) = caught.value.problems
    assert (problem.where, problem.message) == ("MachineConfig.install.disk", "required on metal")
    assert problem.hint is not None and "--install-disk" in problem.hint
    assert problem.line == inputs.line_of(text, "install:")
    assert check_bundle(load_bundle(text), Mode.CONTAINER) == []
    assert check_bundle(load_bundle(text), None) == []


def test_container_mode_warns_about_an_install_disk(cp_yaml: str) -> None:
    (problem,) = check_bundle(load_bundle(cp_yaml, "cp.yaml"), Mode.CONTAINER)
    assert problem.severity == "warning"
    assert problem.message == "is ignored in container mode (nothing is installed)"
    assert problem.line == inputs.line_of(cp_yaml, "disk: /dev/vda")
    assert problem.render().startswith(f"cp.yaml:{problem.line}: warning: MachineConfig.install")


# -- subnets ------------------------------------------------------------------------------------


def with_subnets(pods: list[str], services: list[str]) -> str:
    documents = inputs.controlplane_raw()
    network = inputs.find(documents, "ClusterConfig")["network"]
    network.update(podSubnets=pods, serviceSubnets=services)
    return inputs.dump(documents)


def test_pod_and_service_subnets_must_not_overlap() -> None:
    text = with_subnets(["10.244.0.0/16"], ["10.96.0.0/12", "10.244.128.0/20"])
    (problem,) = check_text(text)
    assert problem.where == "ClusterConfig.network.serviceSubnets[1]"
    assert problem.message == "10.244.128.0/20 overlaps network.podSubnets[0] (10.244.0.0/16)"
    assert problem.hint == "pod and service subnets must be disjoint"
    assert problem.line == inputs.line_of(text, "10.244.128.0/20")


def test_pod_subnets_must_not_overlap_each_other() -> None:
    (problem,) = check_text(with_subnets(["10.0.0.0/8", "10.1.0.0/16"], ["192.168.0.0/16"]))
    assert problem.where == "ClusterConfig.network.podSubnets[1]"


def test_every_overlapping_pair_is_reported() -> None:
    problems = check_text(with_subnets(["10.0.0.0/8", "10.1.0.0/16"], ["10.2.0.0/16"]))
    assert [p.message for p in problems] == [
        "10.1.0.0/16 overlaps network.podSubnets[0] (10.0.0.0/8)",
        "10.2.0.0/16 overlaps network.podSubnets[0] (10.0.0.0/8)",
    ]


def test_dual_stack_subnets_of_different_families_do_not_overlap() -> None:
    text = with_subnets(["10.244.0.0/16", "fd00:10:244::/56"], ["10.96.0.0/12", "fd00:10:96::/112"])
    assert check_text(text) == []


def test_ipv6_overlap_is_found() -> None:
    (problem,) = check_text(with_subnets(["fd00::/8"], ["fd00:10:96::/112"]))
    assert problem.where == "ClusterConfig.network.serviceSubnets[0]"


# -- version contract ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("contract", "message"),
    [
        ("9.0", "version contract 9.0 is newer than this basaltctl (contract 0.1)"),
        ("0.0", "version contract 0.0 is not supported by this basaltctl"),
        ("latest", "version contract 'latest' is not of the form X.Y"),
    ],
)
def test_version_contract_in_the_config_is_checked(contract: str, message: str) -> None:
    documents = inputs.controlplane_raw()
    inputs.find(documents, "MachineConfig")["versionContract"] = contract
    text = inputs.dump(documents)
    (problem,) = check_text(text)
    assert (problem.where, problem.message) == ("MachineConfig.versionContract", message)
    assert problem.hint
    assert problem.line == inputs.line_of(text, "versionContract")


# -- time sync ---------------------------------------------------------------------------------


def test_time_sync_enabled_without_servers(cp_yaml: str) -> None:
    extra = f"---\napiVersion: {API}\nkind: TimeSyncConfig\n"
    (problem,) = check_text(cp_yaml + extra)
    assert problem.where == "TimeSyncConfig.servers"
    assert problem.message == "time sync is enabled but has no servers"
    assert check_text(cp_yaml + extra + "enabled: false\n") == []
    assert check_text(cp_yaml + extra + "servers: [time.example.com]\n") == []


# -- all at once ---------------------------------------------------------------------------------


def test_every_rule_reports_at_once(secrets: Any) -> None:
    documents = inputs.worker_raw()
    machine = inputs.find(documents, "MachineConfig")
    cluster = inputs.find(documents, "ClusterConfig")
    machine["ca"]["key"] = secrets.certs.os.key
    machine["versionContract"] = "7.3"
    without_disk(machine)
    cluster["network"]["serviceSubnets"] = ["10.244.0.0/24"]
    documents.append({"apiVersion": API, "kind": "TimeSyncConfig"})
    with pytest.raises(ConfigValidationError) as caught:
        check_bundle(load_bundle(inputs.dump(documents), "worker.yaml"), Mode.METAL)
    error = caught.value
    assert errors_of(error.problems) == [
        "MachineConfig.ca.key",
        "MachineConfig.install.disk",
        "ClusterConfig.network.serviceSubnets[0]",
        "MachineConfig.versionContract",
        "TimeSyncConfig.servers",
    ]
    assert error.message == "worker.yaml: 5 errors found"
    assert all(p.line is not None for p in error.problems)


def test_rules_table_lists_every_rule() -> None:
    names = [rule.__name__ for rule in RULES]
    assert names == [
        "required_documents",
        "secrets_by_role",
        "ca_certificates",
        "accepted_cas",
        "install_for_mode",
        "subnets",
        "version_contract",
        "time_sync",
    ]


def test_rules_work_on_bundles_from_data_without_lines() -> None:
    documents = inputs.worker_raw()
    inputs.find(documents, "ClusterConfig")["network"]["serviceSubnets"] = ["10.244.0.0/24"]
    (problem,) = validate_bundle(bundle_from_raw(documents, source="worker.yaml"))
    assert (problem.line, problem.source) == (None, "worker.yaml")
