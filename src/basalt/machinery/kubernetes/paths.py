"""Where Kubernetes assets live on a node, as paths inside the node's filesystem view.

Secrets (certificates, keys, kubeconfigs, the encryption config) live under
``/system/secrets/kubernetes``, which the API serves to os:admin only; static pod
manifests and the kubelet config live under ``/etc/kubernetes``. On metal the node view
is ``/``; in container mode it is the node's directory on the host, and paths that a
host process reads (kubelet's config, static pods' hostPath volumes) are prefixed with
that directory through :func:`host_path`.
"""

from __future__ import annotations

import posixpath

SECRETS_ROOT = "/system/secrets"
SECRETS_DIR = f"{SECRETS_ROOT}/kubernetes"
MANIFESTS_DIR = "/etc/kubernetes/manifests"
KUBELET_CONFIG = "/etc/kubernetes/kubelet.yaml"

# -- certificate authorities (certificates only, except the Kubernetes CA key) --------------
CA_CRT = f"{SECRETS_DIR}/ca.crt"
#: The Kubernetes CA key: kube-controller-manager signs kubelet certificates with it.
CA_KEY = f"{SECRETS_DIR}/ca.key"
FRONT_PROXY_CA_CRT = f"{SECRETS_DIR}/front-proxy-ca.crt"
ETCD_CA_CRT = f"{SECRETS_DIR}/etcd-ca.crt"

# -- leaf certificates ----------------------------------------------------------------------
APISERVER_CRT = f"{SECRETS_DIR}/apiserver.crt"
APISERVER_KEY = f"{SECRETS_DIR}/apiserver.key"
APISERVER_KUBELET_CLIENT_CRT = f"{SECRETS_DIR}/apiserver-kubelet-client.crt"
APISERVER_KUBELET_CLIENT_KEY = f"{SECRETS_DIR}/apiserver-kubelet-client.key"
APISERVER_ETCD_CLIENT_CRT = f"{SECRETS_DIR}/apiserver-etcd-client.crt"
APISERVER_ETCD_CLIENT_KEY = f"{SECRETS_DIR}/apiserver-etcd-client.key"
FRONT_PROXY_CLIENT_CRT = f"{SECRETS_DIR}/front-proxy-client.crt"
FRONT_PROXY_CLIENT_KEY = f"{SECRETS_DIR}/front-proxy-client.key"

# -- service accounts and encryption at rest ----------------------------------------------
SA_KEY = f"{SECRETS_DIR}/sa.key"
SA_PUB = f"{SECRETS_DIR}/sa.pub"
ENCRYPTION_CONFIG = f"{SECRETS_DIR}/encryption-config.yaml"

# -- kubeconfigs ------------------------------------------------------------------------------
ADMIN_KUBECONFIG = f"{SECRETS_DIR}/admin.conf"
CONTROLLER_MANAGER_KUBECONFIG = f"{SECRETS_DIR}/controller-manager.conf"
SCHEDULER_KUBECONFIG = f"{SECRETS_DIR}/scheduler.conf"
BOOTSTRAP_KUBECONFIG = f"{SECRETS_DIR}/bootstrap-kubelet.conf"

# -- written by kubelet itself after TLS bootstrap (never rendered) --------------------------
KUBELET_KUBECONFIG = f"{SECRETS_DIR}/kubelet.conf"
KUBELET_CERT_DIR = f"{SECRETS_DIR}/kubelet-pki"

#: Record of what the node last rendered (fingerprint, paths, digests); machined's own.
LEDGER = f"{SECRETS_DIR}/.rendered.json"


def manifest_path(component: str) -> str:
    return f"{MANIFESTS_DIR}/{component}.yaml"


def is_secret(path: str) -> bool:
    """Whether ``path`` (in the node view) is a secret: written 0600, hashes never published."""
    return path == SECRETS_ROOT or path.startswith(SECRETS_ROOT + "/")


def mode_for(path: str) -> int:
    return 0o600 if is_secret(path) else 0o644


def host_path(host_root: str, path: str) -> str:
    """``path`` in the node view as the host sees it (``host_root`` is ``/`` on metal)."""
    return posixpath.join(host_root, path.lstrip("/"))
