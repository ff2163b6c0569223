"""Kubernetes assets: rendered files checked against the official Kubernetes models.

Manifests go through the ``kubernetes`` client's V1Pod model and back (an unknown or
misspelled field would be dropped on the way and fail the round trip); kubeconfigs are
loaded by the client's own kubeconfig loader; certificates are checked against the CAs
in the config; flags, files and hostPath volumes are cross-checked.
"""

from __future__ import annotations

import base64
import functools
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from basalt.cli.kubernetes import default_kubeconfig_path, write_kubeconfig
from basalt.machined.controllers.kubernetes import read_ledger, sync_assets
from basalt.machinery.config import ConfigBundle, bundle_from_raw
from basalt.machinery.errors import OutputExistsError
from basalt.machinery.kubernetes import (
    Asset,
    AssetInputs,
    KubeconfigError,
    KubernetesAssetError,
    build_kubeconfig,
    kubelet_args,
    merge_kubeconfig,
    parse_kubeconfig,
    paths,
    render_assets,
)
from basalt.machinery.pki import (
    generate_ca,
    key_matches_certificate,
    load_certificate,
    load_private_key,
    public_key_pem,
    verify_issued_by,
)
from tests.fakes import inputs

ADDRESS = "192.0.2.21"
HOSTNAME = "cp-1"
ENDPOINT = "https://api.example.com:8443"
CERT_SANS_PATCH = "kind: MachineConfig\ncertSANs: [cp.example.org, 198.51.100.7]\n"
SECRETS = paths.SECRETS_DIR

CONTROLPLANE_PATHS = {
    "/etc/kubernetes/kubelet.yaml",
    "/etc/kubernetes/manifests/kube-apiserver.yaml",
    "/etc/kubernetes/manifests/kube-controller-manager.yaml",
    "/etc/kubernetes/manifests/kube-scheduler.yaml",
    *(
        f"{SECRETS}/{name}"
        for name in (
            "admin.conf",
            "apiserver-etcd-client.crt",
            "apiserver-etcd-client.key",
            "apiserver-kubelet-client.crt",
            "apiserver-kubelet-client.key",
            "apiserver.crt",
            "apiserver.key",
            "bootstrap-kubelet.conf",
            "ca.crt",
            "ca.key",
            "controller-manager.conf",
            "encryption-config.yaml",
            "etcd-ca.crt",
            "front-proxy-ca.crt",
            "front-proxy-client.crt",
            "front-proxy-client.key",
            "sa.key",
            "sa.pub",
            "scheduler.conf",
        )
    ),
}
WORKER_PATHS = {
    "/etc/kubernetes/kubelet.yaml",
    f"{SECRETS}/bootstrap-kubelet.conf",
    f"{SECRETS}/ca.crt",
}

#: KubeletConfiguration (kubelet.config.k8s.io/v1beta1) fields Basalt may set; from the
#: upstream type. The Python client has no model for it, so the names are checked here.
KUBELET_CONFIGURATION_FIELDS = {
    "apiVersion",
    "kind",
    "address",
    "port",
    "readOnlyPort",
    "authentication",
    "authorization",
    "cgroupDriver",
    "containerRuntimeEndpoint",
    "clusterDNS",
    "clusterDomain",
    "rotateCertificates",
    "serverTLSBootstrap",
    "tlsMinVersion",
    "staticPodPath",
}


# -- inputs -----------------------------------------------------------------------------------


@functools.cache
def _configs() -> tuple[ConfigBundle, ConfigBundle]:
    generated = inputs.generate(CERT_SANS_PATCH, endpoint=ENDPOINT)
    return generated.controlplane, generated.worker


@pytest.fixture(scope="module")
def cp_bundle() -> ConfigBundle:
    return _configs()[0]


@pytest.fixture(scope="module")
def worker_bundle() -> ConfigBundle:
    return _configs()[1]


@pytest.fixture(scope="module")
def cp(cp_bundle: ConfigBundle) -> dict[str, Asset]:
    return render_assets(cp_bundle, address=ADDRESS, hostname=HOSTNAME)


@pytest.fixture(scope="module")
def worker(worker_bundle: ConfigBundle) -> dict[str, Asset]:
    return render_assets(worker_bundle, address="192.0.2.31", hostname="worker-1")


def text(assets: dict[str, Asset], path: str) -> str:
    return assets[path].data.decode()


def load(assets: dict[str, Asset], path: str) -> Any:
    return yaml.safe_load(assets[path].data)


def deserialize(data: Any, kind: str) -> Any:
    return kubernetes.client.ApiClient()._ApiClient__deserialize(data, kind)  # type: ignore[attr-defined]


def pods(assets: dict[str, Asset]) -> dict[str, dict[str, Any]]:
    return {p: load(assets, p) for p in assets if p.startswith(paths.MANIFESTS_DIR + "/")}


def flags(pod: dict[str, Any]) -> dict[str, str]:
    command = pod["spec"]["containers"][0]["command"]
    return dict(arg.removeprefix("--").split("=", 1) for arg in command[1:])


def subject(crt: str, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in load_certificate(crt).subject.get_attributes_for_oid(oid)]


def usages(crt: str) -> set[x509.ObjectIdentifier]:
    cert = load_certificate(crt)
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# -- what is rendered where -------------------------------------------------------------------


def test_controlplane_renders_pki_manifests_kubeconfigs_and_kubelet_config(
    cp: dict[str, Asset],
) -> None:
    assert set(cp) == CONTROLPLANE_PATHS


def test_secrets_are_owner_only_and_the_rest_world_readable(cp: dict[str, Asset]) -> None:
    for path, asset in cp.items():
        secret = path.startswith("/system/secrets/")
        assert asset.mode == (0o600 if secret else 0o644), path
        assert asset.secret == secret


def test_worker_gets_kubelet_config_bootstrap_kubeconfig_and_ca_only(
    worker: dict[str, Asset], worker_bundle: ConfigBundle
) -> None:
    assert set(worker) == WORKER_PATHS
    assert text(worker, f"{SECRETS}/ca.crt") == worker_bundle.cluster.kubernetes.ca.crt
    for path, asset in worker.items():
        assert b"PRIVATE KEY" not in asset.data, path
    assert "staticPodPath" not in load(worker, paths.KUBELET_CONFIG)


# -- static pods ------------------------------------------------------------------------------


def test_manifests_are_valid_v1_pods_that_round_trip(cp: dict[str, Asset]) -> None:
    client = kubernetes.client.ApiClient()
    found = pods(cp)
    assert len(found) == 3
    for path, data in found.items():
        pod = deserialize(data, "V1Pod")
        assert isinstance(pod, kubernetes.client.V1Pod)
        # Every key survives the model: nothing misspelled or misplaced.
        assert client.sanitize_for_serialization(pod) == data, path
        component = pod.metadata.name
        assert path == f"{paths.MANIFESTS_DIR}/{component}.yaml"
        assert pod.metadata.namespace == "kube-system"
        assert pod.spec.host_network is True
        assert pod.spec.priority_class_name == "system-node-critical"
        (container,) = pod.spec.containers
        assert container.image == f"registry.k8s.io/{component}:v1.34.1"
        assert container.command[0] == component
        probe = container.liveness_probe.http_get
        assert probe.scheme == "HTTPS"


def test_every_flag_file_is_rendered_and_mounted_from_the_host(cp: dict[str, Asset]) -> None:
    for path, pod in pods(cp).items():
        files = {v for v in flags(pod).values() if v.startswith("/")}
        assert files, path
        container = pod["spec"]["containers"][0]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert set(mounts) == files, path  # mounted: exactly what the flags read
        for file in files:
            assert file in cp, f"{path} reads {file}, which is not rendered"
            assert mounts[file]["readOnly"] is True
            volume = volumes[mounts[file]["name"]]
            assert volume["hostPath"] == {"path": file, "type": "File"}


def test_scheduler_cannot_see_the_ca_key(cp: dict[str, Asset]) -> None:
    scheduler = load(cp, paths.manifest_path("kube-scheduler"))
    mounted = {m["mountPath"] for m in scheduler["spec"]["containers"][0]["volumeMounts"]}
    assert mounted == {paths.SCHEDULER_KUBECONFIG}


def test_apiserver_flags_point_at_local_etcd_and_match_the_endpoint(cp: dict[str, Asset]) -> None:
    pod = load(cp, paths.manifest_path("kube-apiserver"))
    got = flags(pod)
    assert got["etcd-servers"] == f"https://{ADDRESS}:2379"
    assert got["etcd-cafile"] == paths.ETCD_CA_CRT
    assert got["etcd-certfile"] == paths.APISERVER_ETCD_CLIENT_CRT
    assert got["etcd-keyfile"] == paths.APISERVER_ETCD_CLIENT_KEY
    assert got["secure-port"] == "8443"
    assert got["advertise-address"] == ADDRESS
    assert got["service-account-issuer"] == ENDPOINT
    assert got["service-account-key-file"] == paths.SA_PUB
    assert got["service-account-signing-key-file"] == paths.SA_KEY
    assert got["service-cluster-ip-range"] == "10.96.0.0/12"
    assert got["authorization-mode"] == "Node,RBAC"
    assert got["enable-bootstrap-token-auth"] == "true"
    assert got["encryption-provider-config"] == paths.ENCRYPTION_CONFIG
    assert got["client-ca-file"] == paths.CA_CRT
    assert got["requestheader-client-ca-file"] == paths.FRONT_PROXY_CA_CRT
    assert got["requestheader-allowed-names"] == "front-proxy-client"
    container = pod["spec"]["containers"][0]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == 8443
        assert container[probe]["httpGet"]["host"] == ADDRESS


def test_controller_manager_signs_with_the_kubernetes_ca(cp: dict[str, Asset]) -> None:
    got = flags(load(cp, paths.manifest_path("kube-controller-manager")))
    assert got["cluster-signing-cert-file"] == paths.CA_CRT
    assert got["cluster-signing-key-file"] == paths.CA_KEY
    assert got["root-ca-file"] == paths.CA_CRT
    assert got["service-account-private-key-file"] == paths.SA_KEY
    assert got["cluster-cidr"] == "10.244.0.0/16"
    assert got["use-service-account-credentials"] == "true"
    assert got["kubeconfig"] == paths.CONTROLLER_MANAGER_KUBECONFIG
    scheduler = flags(load(cp, paths.manifest_path("kube-scheduler")))
    assert scheduler["kubeconfig"] == paths.SCHEDULER_KUBECONFIG


def test_in_container_mode_host_paths_carry_the_node_directory(cp_bundle: ConfigBundle) -> None:
    root = "/srv/nodes/cp-1"
    assets = render_assets(cp_bundle, address=ADDRESS, hostname=HOSTNAME, host_root=root)
    for pod in pods(assets).values():
        for mount in pod["spec"]["containers"][0]["volumeMounts"]:
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
            assert volume["hostPath"]["path"] == root + mount["mountPath"]
    kubelet = load(assets, paths.KUBELET_CONFIG)
    assert kubelet["staticPodPath"] == root + paths.MANIFESTS_DIR
    assert kubelet["authentication"]["x509"]["clientCAFile"] == root + paths.CA_CRT


def test_a_changed_certificate_changes_the_manifest(cp_bundle: ConfigBundle) -> None:
    # kubelet restarts a static pod only when its manifest changes.
    again = render_assets(cp_bundle, address=ADDRESS, hostname=HOSTNAME)
    first = render_assets(cp_bundle, address=ADDRESS, hostname=HOSTNAME)
    assert again[paths.APISERVER_KEY] != first[paths.APISERVER_KEY]  # new keys per render
    apiserver = paths.manifest_path("kube-apiserver")
    assert again[apiserver] != first[apiserver]
    assert again[paths.KUBELET_CONFIG] == first[paths.KUBELET_CONFIG]


# -- certificates ------------------------------------------------------------------------------

ISSUERS = {
    paths.APISERVER_CRT: "ca",
    paths.APISERVER_KUBELET_CLIENT_CRT: "ca",
    paths.FRONT_PROXY_CLIENT_CRT: "aggregator",
    paths.APISERVER_ETCD_CLIENT_CRT: "etcd",
}


def _ca(bundle: ConfigBundle, which: str) -> str:
    cluster = bundle.cluster
    ca = {
        "ca": cluster.kubernetes.ca,
        "aggregator": cluster.kubernetes.aggregator_ca,
        "etcd": cluster.etcd.ca,
    }[which]
    assert ca is not None
    return ca.crt


@pytest.mark.parametrize("crt_path", sorted(ISSUERS))
def test_certificates_chain_to_the_right_ca_and_match_their_keys(
    cp: dict[str, Asset], cp_bundle: ConfigBundle, crt_path: str
) -> None:
    crt = text(cp, crt_path)
    right = _ca(cp_bundle, ISSUERS[crt_path])
    assert verify_issued_by(crt, right)
    for other in {"ca", "aggregator", "etcd"} - {ISSUERS[crt_path]}:
        assert not verify_issued_by(crt, _ca(cp_bundle, other))
    assert key_matches_certificate(crt, text(cp, crt_path.removesuffix(".crt") + ".key"))


def test_certificate_subjects_and_usages(cp: dict[str, Asset]) -> None:
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    expected = {
        paths.APISERVER_CRT: ("kube-apiserver", [], {server}),
        paths.APISERVER_KUBELET_CLIENT_CRT: (
            "apiserver-kubelet-client",
            ["system:masters"],
            {client},
        ),
        paths.FRONT_PROXY_CLIENT_CRT: ("front-proxy-client", [], {client}),
        paths.APISERVER_ETCD_CLIENT_CRT: ("kube-apiserver-etcd-client", [], {client}),
    }
    for path, (cn, orgs, eku) in expected.items():
        crt = text(cp, path)
        assert subject(crt, NameOID.COMMON_NAME) == [cn], path
        assert subject(crt, NameOID.ORGANIZATION_NAME) == orgs, path
        assert usages(crt) == eku, path


def test_apiserver_serves_every_name_it_is_reached_by(cp: dict[str, Asset]) -> None:
    cert = load_certificate(text(cp, paths.APISERVER_CRT))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert names == {
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "api.example.com",  # the endpoint host
        HOSTNAME,
        "localhost",
        "cp.example.org",  # certSANs
    }
    assert ips == {"10.96.0.1", ADDRESS, "127.0.0.1", "198.51.100.7"}


def test_service_account_keys_are_the_configs(
    cp: dict[str, Asset], cp_bundle: ConfigBundle
) -> None:
    sa = cp_bundle.cluster.kubernetes.service_account_key
    assert sa is not None
    assert text(cp, paths.SA_KEY) == sa.key
    assert text(cp, paths.SA_PUB) == public_key_pem(load_private_key(sa.key))


def test_encryption_configuration_uses_the_secretbox_secret(
    cp: dict[str, Asset], cp_bundle: ConfigBundle
) -> None:
    config = load(cp, paths.ENCRYPTION_CONFIG)
    assert config["apiVersion"] == "apiserver.config.k8s.io/v1"
    assert config["kind"] == "EncryptionConfiguration"
    (rule,) = config["resources"]
    assert rule["resources"] == ["secrets"]
    first, last = rule["providers"]
    (key,) = first["secretbox"]["keys"]
    assert key["secret"] == cp_bundle.cluster.kubernetes.secretbox_encryption_secret
    assert len(base64.b64decode(key["secret"])) == 32
    assert last == {"identity": {}}


# -- kubeconfigs -------------------------------------------------------------------------------


def _client_config(assets: dict[str, Asset], path: str) -> Any:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config_from_dict(
        load(assets, path), client_configuration=configuration, temp_file_path=None
    )
    return configuration


@pytest.mark.parametrize(
    ("path", "server", "cn", "orgs"),
    [
        (paths.ADMIN_KUBECONFIG, ENDPOINT, "admin", ["system:masters"]),
        (
            paths.CONTROLLER_MANAGER_KUBECONFIG,
            f"https://{ADDRESS}:8443",
            "system:kube-controller-manager",
            [],
        ),
        (paths.SCHEDULER_KUBECONFIG, f"https://{ADDRESS}:8443", "system:kube-scheduler", []),
    ],
)
def test_kubeconfigs_load_with_the_official_client(
    cp: dict[str, Asset], path: str, server: str, cn: str, orgs: list[str]
) -> None:
    configuration = _client_config(cp, path)
    assert configuration.host == server
    assert Path(configuration.ssl_ca_cert).read_text() == text(cp, paths.CA_CRT)
    crt = Path(configuration.cert_file).read_text()
    assert verify_issued_by(crt, text(cp, paths.CA_CRT))
    assert key_matches_certificate(crt, Path(configuration.key_file).read_text())
    assert subject(crt, NameOID.COMMON_NAME) == [cn]
    assert subject(crt, NameOID.ORGANIZATION_NAME) == orgs
    assert usages(crt) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_bootstrap_kubeconfig_uses_the_bootstrap_token(
    worker: dict[str, Asset], worker_bundle: ConfigBundle
) -> None:
    configuration = _client_config(worker, paths.BOOTSTRAP_KUBECONFIG)
    assert configuration.host == ENDPOINT
    token = worker_bundle.cluster.kubernetes.bootstrap_token
    assert configuration.api_key["BearerToken"] == f"Bearer {token}"
    assert Path(configuration.ssl_ca_cert).read_text() == text(worker, paths.CA_CRT)


# -- kubelet -----------------------------------------------------------------------------------


def test_kubelet_configuration(cp: dict[str, Asset], worker: dict[str, Asset]) -> None:
    for assets in (cp, worker):
        config = load(assets, paths.KUBELET_CONFIG)
        assert set(config) <= KUBELET_CONFIGURATION_FIELDS
        assert config["apiVersion"] == "kubelet.config.k8s.io/v1beta1"
        assert config["kind"] == "KubeletConfiguration"
        assert config["clusterDNS"] == ["10.96.0.10"]
        assert config["clusterDomain"] == "cluster.local"
        assert config["authentication"]["x509"]["clientCAFile"] == paths.CA_CRT
        assert paths.CA_CRT in assets
        assert config["authentication"]["anonymous"]["enabled"] is False
        assert config["authentication"]["webhook"]["enabled"] is True
        assert config["authorization"]["mode"] == "Webhook"
        assert config["rotateCertificates"] is True
        assert config["cgroupDriver"] == "systemd"
    assert load(cp, paths.KUBELET_CONFIG)["staticPodPath"] == paths.MANIFESTS_DIR


def test_kubelet_args_point_at_the_rendered_files(worker_bundle: ConfigBundle) -> None:
    args = kubelet_args(worker_bundle, address="192.0.2.31", hostname="w1", host_root="/n/w1")
    assert f"--config=/n/w1{paths.KUBELET_CONFIG}" in args
    assert f"--bootstrap-kubeconfig=/n/w1{paths.BOOTSTRAP_KUBECONFIG}" in args
    assert f"--kubeconfig=/n/w1{paths.KUBELET_KUBECONFIG}" in args
    assert f"--cert-dir=/n/w1{paths.KUBELET_CERT_DIR}" in args
    assert "--node-ip=192.0.2.31" in args
    assert "--hostname-override=w1" in args


def test_kubelet_node_ip_and_extra_args_follow_the_config() -> None:
    patched = inputs.generate(
        "kind: MachineConfig\nkubelet:\n  extraArgs: {v: '4', hostname-override: custom}\n"
        "  nodeIP:\n    validSubnets: [198.51.100.0/24]\n"
    ).worker
    outside = kubelet_args(patched, address="192.0.2.31", hostname="w1")
    assert not any(a.startswith("--node-ip=") for a in outside)
    assert "--v=4" in outside
    assert "--hostname-override=custom" in outside and "--hostname-override=w1" not in outside
    inside = kubelet_args(patched, address="198.51.100.9", hostname="w1")
    assert "--node-ip=198.51.100.9" in inside


# -- inputs and errors -------------------------------------------------------------------------


def test_ipv6_addresses_are_bracketed_in_urls(cp_bundle: ConfigBundle) -> None:
    assets = render_assets(cp_bundle, address="2001:db8::21", hostname=HOSTNAME)
    got = flags(load(assets, paths.manifest_path("kube-apiserver")))
    assert got["etcd-servers"] == "https://[2001:db8::21]:2379"
    config = load(assets, paths.SCHEDULER_KUBECONFIG)
    assert config["clusters"][0]["cluster"]["server"] == "https://[2001:db8::21]:8443"


def test_a_control_plane_without_a_ca_key_is_refused_naming_the_field() -> None:
    raw = inputs.controlplane_raw()
    cluster = inputs.find(raw, "ClusterConfig")
    del cluster["kubernetes"]["aggregatorCA"]
    del cluster["etcd"]["ca"]["key"]
    bundle = bundle_from_raw(raw)
    with pytest.raises(KubernetesAssetError) as raised:
        render_assets(bundle, address=ADDRESS, hostname=HOSTNAME)
    message = str(raised.value)
    assert "ClusterConfig.kubernetes.aggregatorCA" in message
    assert "ClusterConfig.etcd.ca" in message
    assert raised.value.hint and "gen config" in raised.value.hint


def test_a_service_subnet_without_a_dns_address_is_refused() -> None:
    small = inputs.generate("kind: ClusterConfig\nnetwork:\n  serviceSubnets: [10.96.0.0/29]\n")
    with pytest.raises(KubernetesAssetError, match=r"10\.96\.0\.0/29 is too small"):
        render_assets(small.worker, address=ADDRESS, hostname=HOSTNAME)


def test_fingerprint_follows_what_rendering_reads(cp_bundle: ConfigBundle) -> None:
    def fingerprint(bundle: ConfigBundle, **changes: str) -> str:
        values = {"address": ADDRESS, "hostname": HOSTNAME, **changes}
        return AssetInputs.from_bundle(bundle, **values).fingerprint()

    base = fingerprint(cp_bundle)
    assert fingerprint(cp_bundle) == base
    assert fingerprint(cp_bundle, hostname="other") != base
    assert fingerprint(cp_bundle, host_root="/srv/x") != base
    assert fingerprint(_configs()[1]) != base


# -- kubeconfig merging ------------------------------------------------------------------------


def _admin(cluster: str = "demo", server: str = ENDPOINT) -> dict[str, Any]:
    """An admin kubeconfig of a fresh cluster: its own CA and credentials."""
    ca = generate_ca("kubernetes")
    token = secrets.token_hex(8)
    return build_kubeconfig(
        cluster=cluster, server=server, ca_crt=ca.crt, user="admin", token=token
    )


def test_merge_adds_entries_keeps_the_others_and_switches_context() -> None:
    existing = _admin("other", "https://other:6443")
    existing["preferences"] = {"colors": True}
    new = _admin()
    result = merge_kubeconfig(existing, new)
    merged = result.config
    assert [c["name"] for c in merged["clusters"]] == ["other", "demo"]
    assert [u["name"] for u in merged["users"]] == ["admin", "admin-1"]  # other credentials
    assert [c["name"] for c in merged["contexts"]] == ["admin@other", "admin@demo"]
    assert merged["contexts"][1]["context"] == {"cluster": "demo", "user": "admin-1"}
    assert merged["current-context"] == result.current_context == "admin@demo"
    assert merged["preferences"] == {"colors": True}
    assert ("users", "admin", "admin-1") in result.renamed
    assert existing["current-context"] == "admin@other"  # the input is not changed


def test_merge_renames_every_clash_and_reuses_identical_entries() -> None:
    first = _admin()
    second = _admin()  # same names, another CA and server
    merged = merge_kubeconfig(first, second).config
    assert [c["name"] for c in merged["clusters"]] == ["demo", "demo-1"]
    assert [c["name"] for c in merged["contexts"]] == ["admin@demo", "admin@demo-1"]
    assert merged["contexts"][1]["context"] == {"cluster": "demo-1", "user": "admin-1"}
    assert merged["current-context"] == "admin@demo-1"
    again = merge_kubeconfig(merged, second)
    assert again.config == merged and again.renamed == []  # identical: nothing added
    third = merge_kubeconfig(merged, _admin()).config
    assert [c["name"] for c in third["clusters"]] == ["demo", "demo-1", "demo-2"]


def test_merge_into_an_empty_file() -> None:
    new = _admin()
    merged = merge_kubeconfig(parse_kubeconfig("", "empty"), new).config
    for section in ("clusters", "users", "contexts"):
        assert merged[section] == new[section]
    assert merged["current-context"] == "admin@demo"


@pytest.mark.parametrize(
    "bad", ["clusters: [1, 2]\n", "- a list\n", "clusters: {a: b}\n", "a: [unclosed\n"]
)
def test_a_malformed_kubeconfig_is_refused(bad: str) -> None:
    with pytest.raises(KubeconfigError, match=r"/home/u/\.kube/config"):
        parse_kubeconfig(bad, "/home/u/.kube/config")


# -- writing on the node (the controller's file work) and on the client -----------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        "/" + str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != ".rendered.json"
    }


def test_sync_writes_files_with_modes_and_keeps_them_while_inputs_are_unchanged(
    tmp_path: Path, cp_bundle: ConfigBundle
) -> None:
    node = AssetInputs.from_bundle(
        cp_bundle, address=ADDRESS, hostname=HOSTNAME, host_root=str(tmp_path)
    )
    files, rendered = sync_assets(tmp_path, node)
    assert rendered and set(files) == CONTROLPLANE_PATHS
    for path in files:
        mode = stat.S_IMODE(os.stat(tmp_path / path.lstrip("/")).st_mode)
        assert mode == paths.mode_for(path), path
    assert stat.S_IMODE(os.stat(tmp_path / "system" / "secrets").st_mode) == 0o700
    before = _tree(tmp_path)
    again, rendered = sync_assets(tmp_path, node)
    assert not rendered and again == files
    assert _tree(tmp_path) == before  # no new certificates
    assert read_ledger(tmp_path).fingerprint == node.fingerprint()


def test_sync_rerenders_damaged_files_and_removes_what_is_no_longer_wanted(
    tmp_path: Path, cp_bundle: ConfigBundle, worker_bundle: ConfigBundle
) -> None:
    def node(bundle: ConfigBundle) -> AssetInputs:
        return AssetInputs.from_bundle(
            bundle, address=ADDRESS, hostname=HOSTNAME, host_root=str(tmp_path)
        )

    sync_assets(tmp_path, node(cp_bundle))
    unrelated = tmp_path / "system" / "secrets" / "kubernetes" / "kubelet-pki" / "kubelet.crt"
    unrelated.parent.mkdir()
    unrelated.write_text("kubelet's own")
    key = tmp_path / paths.APISERVER_KEY.lstrip("/")
    key.write_text("damaged")
    _, rendered = sync_assets(tmp_path, node(cp_bundle))
    assert rendered and key.read_text() != "damaged"
    files, rendered = sync_assets(tmp_path, node(worker_bundle))
    assert rendered and set(files) == WORKER_PATHS
    left = set(_tree(tmp_path))
    assert left == WORKER_PATHS | {"/" + str(unrelated.relative_to(tmp_path))}


def test_kubeconfig_cli_writes_owner_only_and_refuses_to_overwrite(tmp_path: Path) -> None:
    data = yaml.safe_dump(_admin()).encode()
    target = tmp_path / "kube" / "config"
    write_kubeconfig(data, target, merge=False, force=False)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(OutputExistsError):
        write_kubeconfig(data, target, merge=False, force=False)
    write_kubeconfig(data, target, merge=False, force=True)
    assert target.read_bytes() == data


def test_kubeconfig_cli_merges_into_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.write_text(yaml.safe_dump(_admin("other", "https://other:6443")))
    target.chmod(0o644)
    write_kubeconfig(yaml.safe_dump(_admin()).encode(), target, merge=True, force=False)
    merged = yaml.safe_load(target.read_text())
    assert [c["name"] for c in merged["clusters"]] == ["other", "demo"]
    assert merged["current-context"] == "admin@demo"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_default_kubeconfig_path_follows_kubectl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join(["", "/a/first", "/b/second"]))
    assert default_kubeconfig_path() == Path("/a/first")
    monkeypatch.delenv("KUBECONFIG")
    assert default_kubeconfig_path() == Path.home() / ".kube" / "config"
