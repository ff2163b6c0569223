"""Static pod manifests for the control plane: kube-apiserver, controller-manager, scheduler.

Each component gets exactly the files its flags name, one read-only ``hostPath`` mount
per file (never a whole directory: the scheduler has no business with the CA key).
Inside the container a file sits at its node-view path, so flags read the same on
metal and in container mode.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import paths
from .inputs import AssetInputs, url_host

REGISTRY = "registry.k8s.io"
ETCD_CLIENT_PORT = 2379
CONTROLLER_MANAGER_PORT = 10257
SCHEDULER_PORT = 10259
APISERVER = "kube-apiserver"
CONTROLLER_MANAGER = "kube-controller-manager"
SCHEDULER = "kube-scheduler"
#: The priority Kubernetes gives the system-node-critical class.
NODE_CRITICAL_PRIORITY = 2000001000
#: Digest of the files a pod mounts: when a certificate changes, so does the manifest,
#: and kubelet restarts the pod (a process reads most of its files at start only).
FILES_ANNOTATION = "basalt.dev/files-sha256"


@dataclass(frozen=True)
class Probe:
    host: str
    port: int
    path: str


def image(component: str, version: str) -> str:
    return f"{REGISTRY}/{component}:{version}"


def flag_files(flags: dict[str, str]) -> list[str]:
    """The files a component's flags name (every flag value that is an absolute path)."""
    return sorted({value for value in flags.values() if value.startswith("/")})


def _volume_name(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", posixpath.basename(path).lower()).strip("-")


def _http_get(probe: Probe, path: str) -> dict[str, Any]:
    return {"host": probe.host, "path": path, "port": probe.port, "scheme": "HTTPS"}


def _probes(probe: Probe, readiness_path: str | None) -> dict[str, Any]:
    """Liveness and startup probes on the secure port (and readiness when it has a path)."""
    probes: dict[str, Any] = {
        "livenessProbe": {
            "httpGet": _http_get(probe, probe.path),
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 15,
            "failureThreshold": 8,
        },
    }
    if readiness_path:
        probes["readinessProbe"] = {
            "httpGet": _http_get(probe, readiness_path),
            "periodSeconds": 1,
            "timeoutSeconds": 15,
            "failureThreshold": 3,
        }
    probes["startupProbe"] = {
        "httpGet": _http_get(probe, probe.path),
        "initialDelaySeconds": 10,
        "periodSeconds": 10,
        "timeoutSeconds": 15,
        "failureThreshold": 24,
    }
    return probes


def files_digest(files: list[str], contents: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path}\0{contents.get(path, '')}\0".encode())
    return digest.hexdigest()


def static_pod(
    inputs: AssetInputs,
    component: str,
    flags: dict[str, str],
    probe: Probe,
    cpu: str,
    *,
    contents: Mapping[str, str],
    readiness_path: str | None = None,
) -> dict[str, Any]:
    """A v1 Pod running ``component`` with ``flags``, its files mounted from the host.

    ``contents`` maps the files' paths to their text, for the pod's files digest.
    """
    files = flag_files(flags)
    container: dict[str, Any] = {
        "name": component,
        "image": image(component, inputs.version),
        "imagePullPolicy": "IfNotPresent",
        "command": [component, *(f"--{name}={value}" for name, value in sorted(flags.items()))],
        **_probes(probe, readiness_path),
        "resources": {"requests": {"cpu": cpu}},
        "volumeMounts": [
            {"name": _volume_name(f), "mountPath": f, "readOnly": True} for f in files
        ],
    }
    volumes = [
        {
            "name": _volume_name(f),
            "hostPath": {"path": paths.host_path(inputs.host_root, f), "type": "File"},
        }
        for f in files
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": component,
            "namespace": "kube-system",
            "labels": {"component": component, "tier": "control-plane"},
            "annotations": {FILES_ANNOTATION: files_digest(files, contents)},
        },
        "spec": {
            "hostNetwork": True,
            "priorityClassName": "system-node-critical",
            "priority": NODE_CRITICAL_PRIORITY,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        },
    }


def apiserver_flags(inputs: AssetInputs) -> dict[str, str]:
    return {
        "advertise-address": inputs.address,
        "allow-privileged": "true",
        "authorization-mode": "Node,RBAC",
        "client-ca-file": paths.CA_CRT,
        "enable-admission-plugins": "NodeRestriction",
        "enable-bootstrap-token-auth": "true",
        "encryption-provider-config": paths.ENCRYPTION_CONFIG,
        "etcd-cafile": paths.ETCD_CA_CRT,
        "etcd-certfile": paths.APISERVER_ETCD_CLIENT_CRT,
        "etcd-keyfile": paths.APISERVER_ETCD_CLIENT_KEY,
        "etcd-servers": f"https://{url_host(inputs.address)}:{ETCD_CLIENT_PORT}",
        "kubelet-client-certificate": paths.APISERVER_KUBELET_CLIENT_CRT,
        "kubelet-client-key": paths.APISERVER_KUBELET_CLIENT_KEY,
        "kubelet-preferred-address-types": "InternalIP,ExternalIP,Hostname",
        "profiling": "false",
        "proxy-client-cert-file": paths.FRONT_PROXY_CLIENT_CRT,
        "proxy-client-key-file": paths.FRONT_PROXY_CLIENT_KEY,
        "requestheader-allowed-names": "front-proxy-client",
        "requestheader-client-ca-file": paths.FRONT_PROXY_CA_CRT,
        "requestheader-extra-headers-prefix": "X-Remote-Extra-",
        "requestheader-group-headers": "X-Remote-Group",
        "requestheader-username-headers": "X-Remote-User",
        "secure-port": str(inputs.endpoint_port),
        "service-account-issuer": inputs.service_account_issuer,
        "service-account-key-file": paths.SA_PUB,
        "service-account-signing-key-file": paths.SA_KEY,
        "service-cluster-ip-range": ",".join(inputs.service_subnets),
        "tls-cert-file": paths.APISERVER_CRT,
        "tls-min-version": "VersionTLS12",
        "tls-private-key-file": paths.APISERVER_KEY,
    }


def controller_manager_flags(inputs: AssetInputs) -> dict[str, str]:
    kubeconfig = paths.CONTROLLER_MANAGER_KUBECONFIG
    return {
        "allocate-node-cidrs": "true",
        "authentication-kubeconfig": kubeconfig,
        "authorization-kubeconfig": kubeconfig,
        "bind-address": "127.0.0.1",
        "client-ca-file": paths.CA_CRT,
        "cluster-cidr": ",".join(inputs.pod_subnets),
        "cluster-name": inputs.cluster_name,
        "cluster-signing-cert-file": paths.CA_CRT,
        "cluster-signing-key-file": paths.CA_KEY,
        "controllers": "*,bootstrapsigner,tokencleaner",
        "kubeconfig": kubeconfig,
        "leader-elect": "true",
        "profiling": "false",
        "requestheader-client-ca-file": paths.FRONT_PROXY_CA_CRT,
        "root-ca-file": paths.CA_CRT,
        "service-account-private-key-file": paths.SA_KEY,
        "service-cluster-ip-range": ",".join(inputs.service_subnets),
        "use-service-account-credentials": "true",
    }


def scheduler_flags(inputs: AssetInputs) -> dict[str, str]:
    kubeconfig = paths.SCHEDULER_KUBECONFIG
    return {
        "authentication-kubeconfig": kubeconfig,
        "authorization-kubeconfig": kubeconfig,
        "bind-address": "127.0.0.1",
        "kubeconfig": kubeconfig,
        "leader-elect": "true",
        "profiling": "false",
    }


def render_manifests(inputs: AssetInputs, contents: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The control plane's static pods: manifest path -> Pod.

    ``contents`` holds the text of every file the pods mount (path -> text).
    """
    return {
        paths.manifest_path(APISERVER): static_pod(
            inputs,
            APISERVER,
            apiserver_flags(inputs),
            Probe(inputs.address, inputs.endpoint_port, "/livez"),
            "250m",
            contents=contents,
            readiness_path="/readyz",
        ),
        paths.manifest_path(CONTROLLER_MANAGER): static_pod(
            inputs,
            CONTROLLER_MANAGER,
            controller_manager_flags(inputs),
            Probe("127.0.0.1", CONTROLLER_MANAGER_PORT, "/healthz"),
            "200m",
            contents=contents,
        ),
        paths.manifest_path(SCHEDULER): static_pod(
            inputs,
            SCHEDULER,
            scheduler_flags(inputs),
            Probe("127.0.0.1", SCHEDULER_PORT, "/healthz"),
            "100m",
            contents=contents,
        ),
    }
