"""``gen config``: deterministic output, role-appropriate secrets, contracts and patches."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from basalt.machinery.config import (
    GenerateOptions,
    Mode,
    check_bundle,
    generate_configs,
    load_bundle,
    parse_patch,
)
from basalt.machinery.config.secrets import SecretsBundle, load_secrets
from basalt.machinery.errors import ConfigValidationError, ContractError, PatchError
from tests.fakes import inputs
from tests.fakes.pki import make_certificate

LINK_PATCH = "kind: LinkConfig\nname: eth0\naddresses: [192.0.2.5/24]\n"
SANS_PATCH = "kind: MachineConfig\ncertSANs: [cp.example.com]\n"


def test_same_inputs_give_byte_identical_configs(secrets: SecretsBundle) -> None:
    def run() -> tuple[str, str]:
        # reload the secrets from text too: generation depends on their content only
        reloaded = load_secrets(secrets.to_yaml())
        configs = generate_configs(
            reloaded,
            inputs.options(
                additional_sans=("10.0.0.1", "cp.example.com"), kubernetes_version="v1.33.0"
            ),
            patches=inputs.patches(LINK_PATCH, SANS_PATCH),
            controlplane_patches=inputs.patches("kind: ClusterConfig\netcd: {extraArgs: {a: b}}\n"),
        )
        return configs.controlplane.to_yaml(), configs.worker.to_yaml()

    first, second = run(), run()
    assert first == second
    assert first[0] != first[1]


def test_generated_configs_validate_in_both_modes(secrets: SecretsBundle) -> None:
    configs = generate_configs(secrets, inputs.options())
    for bundle in (configs.controlplane, configs.worker):
        check_bundle(load_bundle(bundle.to_yaml()), Mode.METAL)
    assert configs.for_type("controlplane") is configs.controlplane
    assert configs.for_type("worker") is configs.worker
    assert (configs.controlplane.source, configs.worker.source) == (
        "controlplane.yaml",
        "worker.yaml",
    )


def test_workers_hold_no_private_keys_or_cluster_secrets(secrets: SecretsBundle) -> None:
    configs = generate_configs(secrets, inputs.options(), patches=inputs.patches(LINK_PATCH))
    worker = configs.worker.to_yaml()
    assert "PRIVATE KEY" not in worker
    assert "serviceAccountKey" not in worker
    assert "secretbox" not in worker
    assert "aggregatorCA" not in worker
    assert secrets.tokens.secretbox_encryption_secret not in worker
    cluster = inputs.doc(configs.worker, "ClusterConfig")
    assert "etcd" not in cluster
    assert set(cluster["kubernetes"]["ca"]) == {"crt"}
    assert set(inputs.doc(configs.worker, "MachineConfig")["ca"]) == {"crt"}


def test_control_planes_hold_every_key(secrets: SecretsBundle) -> None:
    controlplane = generate_configs(secrets, inputs.options()).controlplane.to_yaml()
    assert controlplane.count("PRIVATE KEY-----\n") == 2 * 5
    assert "serviceAccountKey" in controlplane
    assert secrets.tokens.secretbox_encryption_secret in controlplane


def test_shared_values_come_from_the_secrets(secrets: SecretsBundle) -> None:
    configs = generate_configs(secrets, inputs.options())
    for bundle in (configs.controlplane, configs.worker):
        assert bundle.machine.token == secrets.tokens.join_token
        assert bundle.machine.ca.crt == secrets.certs.os.crt
        assert bundle.cluster.id == secrets.cluster.id
        assert bundle.cluster.kubernetes.bootstrap_token == secrets.tokens.bootstrap_token


def test_contract_is_recorded_as_version_contract(secrets: SecretsBundle) -> None:
    configs = generate_configs(secrets, inputs.options(version_contract="v0.1"))
    assert str(configs.contract) == "0.1"
    for bundle in (configs.controlplane, configs.worker):
        assert "versionContract: '0.1'\n" in bundle.to_yaml()
        assert bundle.machine.version_contract == "0.1"
    assert configs.warnings == []


def test_no_contract_gives_a_warning(secrets: SecretsBundle) -> None:
    configs = generate_configs(secrets, inputs.options(version_contract=None))
    assert configs.controlplane.machine.version_contract == "0.1"
    assert len(configs.warnings) == 1
    assert "no --version-contract given" in configs.warnings[0]


@pytest.mark.parametrize(
    ("contract", "message"),
    [
        ("0.2", "is newer than this basaltctl"),
        ("99.0", "is newer than this basaltctl"),
        ("0.0", "is not supported"),
        ("zero", "is not of the form X.Y"),
    ],
)
def test_bad_contracts_are_refused(secrets: SecretsBundle, contract: str, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        generate_configs(secrets, inputs.options(version_contract=contract))


def test_contract_defaults_are_applied(secrets: SecretsBundle) -> None:
    configs = generate_configs(secrets, inputs.options())
    cluster = inputs.doc(configs.controlplane, "ClusterConfig")
    assert cluster["network"] == {
        "podSubnets": ["10.244.0.0/16"],
        "serviceSubnets": ["10.96.0.0/12"],
        "dnsDomain": "cluster.local",
    }
    assert cluster["kubernetes"]["version"] == "v1.34.1"
    machine = inputs.doc(configs.controlplane, "MachineConfig")
    assert machine["kubelet"] == {"image": "basalt/kubelet:v1.34.1"}
    assert machine["features"] == {"rbac": True, "stableHostname": True}


def test_options_override_defaults(secrets: SecretsBundle) -> None:
    configs = generate_configs(
        secrets,
        inputs.options(
            kubernetes_version="1.33.2",
            install_image="mine/installer:1",
            install_disk="/dev/nvme0n1",
            dns_domain="k8s.example",
            additional_sans=("10.0.0.1", "cp.example.com"),
        ),
    )
    machine = inputs.doc(configs.worker, "MachineConfig")
    assert machine["install"] == {
        "disk": "/dev/nvme0n1",
        "image": "mine/installer:1",
        "wipe": False,
    }
    assert machine["kubelet"]["image"] == "basalt/kubelet:1.33.2"
    assert machine["certSANs"] == ["10.0.0.1", "cp.example.com"]
    cluster = inputs.doc(configs.worker, "ClusterConfig")
    assert cluster["kubernetes"]["version"] == "v1.33.2"
    assert cluster["network"]["dnsDomain"] == "k8s.example"


def test_without_install_disk_no_disk_is_written(secrets: SecretsBundle) -> None:
    configs = generate_configs(secrets, inputs.options(install_disk=None))
    assert "disk" not in inputs.doc(configs.controlplane, "MachineConfig")["install"]


def test_patches_per_machine_type(secrets: SecretsBundle) -> None:
    configs = generate_configs(
        secrets,
        inputs.options(),
        patches=inputs.patches(LINK_PATCH),
        controlplane_patches=inputs.patches("kind: ClusterConfig\netcd: {extraArgs: {a: b}}\n"),
        worker_patches=inputs.patches("kind: MachineConfig\nkubelet: {extraArgs: {w: '1'}}\n"),
    )
    for bundle in (configs.controlplane, configs.worker):
        assert inputs.doc(bundle, "LinkConfig", "eth0")["addresses"] == ["192.0.2.5/24"]
    assert inputs.doc(configs.controlplane, "ClusterConfig")["etcd"]["extraArgs"] == {"a": "b"}
    assert "extraArgs" not in inputs.doc(configs.controlplane, "MachineConfig")["kubelet"]
    assert inputs.doc(configs.worker, "MachineConfig")["kubelet"]["extraArgs"] == {"w": "1"}


def test_bad_option_is_reported_against_the_target_file(secrets: SecretsBundle) -> None:
    with pytest.raises(ConfigValidationError) as caught:
        generate_configs(
            secrets,
            GenerateOptions(
                cluster_name="Bad Name", endpoint="http://cp:6443", version_contract="0.1"
            ),
        )
    error = caught.value
    assert error.source == "controlplane.yaml"
    assert {p.where for p in error.problems} == {
        "ClusterConfig.name",
        "ClusterConfig.controlPlane.endpoint",
    }


def test_patch_with_a_bad_value_fails_validation(secrets: SecretsBundle) -> None:
    with pytest.raises(ConfigValidationError) as caught:
        generate_configs(
            secrets,
            inputs.options(),
            patches=inputs.patches(
                "kind: ClusterConfig\nnetwork: {podSubnets: [10.244.0.0/16, 10.300.0.0/16]}\n"
            ),
        )
    (problem,) = caught.value.problems
    assert problem.where == "ClusterConfig.network.podSubnets[1]"
    # the error points into the patch that set the value, not at the generated file
    assert (problem.source, problem.line) == ("patch-1.yaml", 2)
    assert caught.value.source == "controlplane.yaml"


def test_patch_giving_workers_a_key_fails_validation(secrets: SecretsBundle) -> None:
    key = yaml.safe_dump({"kind": "MachineConfig", "ca": {"key": secrets.certs.os.key}})
    with pytest.raises(ConfigValidationError) as caught:
        generate_configs(secrets, inputs.options(), worker_patches=[parse_patch(key, "k.yaml")])
    assert caught.value.source == "worker.yaml"
    assert [p.where for p in caught.value.errors] == ["MachineConfig.ca.key"]


def test_json_patch_is_refused_for_generated_configs(secrets: SecretsBundle) -> None:
    patch = parse_patch("- {op: add, path: /x, value: 1}\n", "ops.yaml")
    with pytest.raises(PatchError, match=r"controlplane\.yaml has 2 documents"):
        generate_configs(secrets, inputs.options(), patches=[patch])


def test_warnings_from_validation_are_passed_on(secrets: SecretsBundle) -> None:
    now = dt.datetime.now(dt.UTC)
    expiring = make_certificate(not_after=now + dt.timedelta(days=7))
    data = secrets.model_dump(by_alias=True)
    data["certs"]["os"] = {"crt": expiring.crt, "key": expiring.key}
    configs = generate_configs(SecretsBundle.model_validate(data), inputs.options())
    assert len(configs.warnings) == 2
    assert configs.warnings[0].startswith(
        "controlplane.yaml: warning: MachineConfig.ca.crt: expires on "
    )
    assert configs.warnings[1].startswith("worker.yaml: warning: MachineConfig.ca.crt: ")
