"""A small Kubernetes API client: credentials from a kubeconfig, JSON over HTTPS with mTLS.

Only what cordon and drain need: GET, PATCH (JSON merge patch), POST and DELETE on
paths below the server URL, each answered as a :class:`Response`. The server is always
verified against the kubeconfig's CA, with its host name or IP checked; a kubeconfig
that asks to skip verification, or names no CA, is refused. Requests run in a thread
(``http.client``), one connection each, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http.client
import json
import os
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basalt.machinery.errors import BasaltError
from basalt.machinery.kubernetes import KubeconfigError, parse_kubeconfig

__all__ = [
    "KubeApiError",
    "KubeClient",
    "KubeCredentials",
    "KubeTLSError",
    "KubeUnreachableError",
    "KubeconfigError",
    "Response",
    "load_kubeconfig",
]

#: Every request gives up after this long (connect, TLS, answer).
REQUEST_TIMEOUT = 10.0
MERGE_PATCH = "application/merge-patch+json"
_HINT = "fix the kubeconfig, or upgrade with --no-drain after draining the node yourself"


class KubeApiError(BasaltError):
    """A Kubernetes API request failed; ``status`` is the HTTP status, None without one."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status


class KubeUnreachableError(KubeApiError):
    """The API server could not be reached at all (refused, timed out, no route)."""


class KubeTLSError(KubeApiError):
    """The TLS handshake failed: the server's certificate is not from the kubeconfig's CA,
    or the server refused our client certificate."""


@dataclass(frozen=True)
class KubeCredentials:
    """Where the API server is and how to prove who we are, from one kubeconfig."""

    server: str
    ca_pem: str
    #: The kubeconfig these came from (for messages).
    source: str
    #: Client certificate and key, PEM, in one blob (mTLS).
    client_pem: bytes | None = None
    token: str | None = None


def _decode(value: Any, what: str, source: str) -> str:
    try:
        return base64.b64decode(str(value), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise KubeconfigError(f"{source}: {what} is not base64 PEM", hint=_HINT) from None


def _inline_or_file(
    section: dict[str, Any], key: str, base: Path, source: str, *, required: bool
) -> str | None:
    """``key-data`` (base64) or ``key`` (a file, relative to the kubeconfig's directory)."""
    if section.get(f"{key}-data"):
        return _decode(section[f"{key}-data"], f"{key}-data", source)
    if section.get(key):
        path = base / str(section[key])
        try:
            return path.read_text()
        except OSError as exc:
            raise KubeconfigError(
                f"{source}: {key} {path}: {exc.strerror or exc}", hint=_HINT
            ) from None
    if required:
        raise KubeconfigError(f"{source}: the cluster has no {key}(-data)", hint=_HINT)
    return None


def _entry(data: dict[str, Any], section: str, name: str, source: str) -> dict[str, Any]:
    body = section[:-1]  # clusters -> cluster
    for entry in data.get(section) or []:
        if entry.get("name") == name and isinstance(entry.get(body), dict):
            return dict(entry[body])
    raise KubeconfigError(f"{source}: no {body} named {name!r}", hint=_HINT)


def credentials_from(data: dict[str, Any], source: str, base: Path) -> KubeCredentials:
    """The current context's server, CA and client credentials."""
    contexts = data.get("contexts") or []
    current = data.get("current-context")
    if not current and len(contexts) == 1:
        current = contexts[0].get("name")
    if not current:
        raise KubeconfigError(f"{source}: no current-context", hint=_HINT)
    context = _entry(data, "contexts", str(current), source)
    cluster = _entry(data, "clusters", str(context.get("cluster", "")), source)
    user = _entry(data, "users", str(context.get("user", "")), source)
    server = str(cluster.get("server") or "")
    parsed = urllib.parse.urlsplit(server)
    if parsed.scheme != "https" or not parsed.hostname:
        raise KubeconfigError(
            f"{source}: server {server!r} is not an https:// URL with a host", hint=_HINT
        )
    if cluster.get("insecure-skip-tls-verify"):
        raise KubeconfigError(
            f"{source}: insecure-skip-tls-verify is set; machined always verifies the API "
            "server against the kubeconfig's CA",
            hint="put the cluster CA in certificate-authority-data",
        )
    if cluster.get("tls-server-name"):
        raise KubeconfigError(f"{source}: tls-server-name is not supported", hint=_HINT)
    ca_pem = _inline_or_file(cluster, "certificate-authority", base, source, required=True)
    assert ca_pem is not None
    crt = _inline_or_file(user, "client-certificate", base, source, required=False)
    key = _inline_or_file(user, "client-key", base, source, required=False)
    token = user.get("token")
    if user.get("tokenFile") and not token:
        token = _inline_or_file({"t": user["tokenFile"]}, "t", base, source, required=True)
    if (crt is None) != (key is None):
        raise KubeconfigError(
            f"{source}: the user has a client certificate or a key, not both", hint=_HINT
        )
    if crt is None and not token:
        raise KubeconfigError(
            f"{source}: the user has neither a client certificate nor a token "
            "(exec and auth-provider plugins are not supported)",
            hint=_HINT,
        )
    client_pem = None
    if crt is not None:
        # The kubelet's rotating pem holds both, and is named as certificate and as key.
        client_pem = (crt if crt == key else crt.rstrip("\n") + "\n" + (key or "")).encode()
    return KubeCredentials(
        server=server.rstrip("/"),
        ca_pem=ca_pem,
        source=source,
        client_pem=client_pem,
        token=str(token).strip() if token else None,
    )


def load_kubeconfig(path: Path, source: str | None = None) -> KubeCredentials:
    """Read ``path`` (blocking): KubeconfigError when it is missing or unusable."""
    label = source or str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise KubeconfigError(f"cannot read {label}: {exc.strerror or exc}", hint=_HINT) from None
    return credentials_from(parse_kubeconfig(text, label), label, path.parent)


def _load_client_pem(context: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` wants a path: hand it an in-memory file, never one on disk."""
    fd = os.memfd_create("kube-client", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def tls_context(credentials: KubeCredentials) -> ssl.SSLContext:
    """A client context that trusts only the kubeconfig's CA and checks the host name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=credentials.ca_pem)
    except (ssl.SSLError, ValueError) as exc:
        raise KubeconfigError(
            f"{credentials.source}: the certificate authority is not a usable PEM "
            f"certificate ({exc})",
            hint=_HINT,
        ) from None
    if credentials.client_pem is not None:
        try:
            _load_client_pem(context, credentials.client_pem)
        except ssl.SSLError as exc:
            raise KubeconfigError(
                f"{credentials.source}: the client certificate and key do not load ({exc})",
                hint=_HINT,
            ) from None
    return context


@dataclass(frozen=True)
class Response:
    status: int
    body: dict[str, Any]
    #: The server's Retry-After (seconds), if it sent one.
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        """The Status object's message, else the HTTP status."""
        text = self.body.get("message") if isinstance(self.body, dict) else None
        return str(text) if text else f"HTTP {self.status}"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class KubeClient:
    """Requests to one API server with one set of credentials."""

    def __init__(self, credentials: KubeCredentials, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.credentials = credentials
        self.server = credentials.server
        self.timeout = timeout
        parsed = urllib.parse.urlsplit(credentials.server)
        assert parsed.hostname is not None
        self._host = parsed.hostname
        self._port = parsed.port or 443
        self._prefix = parsed.path.rstrip("/")
        self._context = tls_context(credentials)

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    async def patch(self, path: str, body: dict[str, Any]) -> Response:
        return await self.request("PATCH", path, body, content_type=MERGE_PATCH)

    async def post(self, path: str, body: dict[str, Any]) -> Response:
        return await self.request("POST", path, body)

    async def delete(self, path: str, body: dict[str, Any] | None = None) -> Response:
        return await self.request("DELETE", path, body)

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        content_type: str = "application/json",
    ) -> Response:
        """One request; raises KubeUnreachableError / KubeTLSError when there is no answer."""
        return await asyncio.to_thread(self._request, method, path, body, content_type)

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, content_type: str
    ) -> Response:
        headers = {"Accept": "application/json", "User-Agent": "basalt-machined"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        if self.credentials.token:
            headers["Authorization"] = f"Bearer {self.credentials.token}"
        connection = http.client.HTTPSConnection(
            self._host, self._port, context=self._context, timeout=self.timeout
        )
        try:
            connection.request(method, self._prefix + path, body=data, headers=headers)
            answer = connection.getresponse()
            raw = answer.read()
            status, retry = answer.status, answer.getheader("Retry-After")
        except ssl.SSLCertVerificationError as exc:
            raise KubeTLSError(
                f"the Kubernetes API server at {self.server} is not trusted: "
                f"{exc.verify_message or exc.reason} (checked against the CA in "
                f"{self.credentials.source})",
                hint="the kubeconfig names another cluster's CA, or the server presents a "
                "certificate for another name",
            ) from None
        except ssl.SSLError as exc:
            raise KubeTLSError(
                f"TLS with the Kubernetes API server at {self.server} failed: "
                f"{exc.reason or exc} (credentials from {self.credentials.source})",
                hint="the server may not accept this client certificate",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = str(exc) or type(exc).__name__
            raise KubeUnreachableError(
                f"cannot reach the Kubernetes API server at {self.server}: {reason}",
                hint="check that kube-apiserver runs and this node can reach it",
            ) from None
        finally:
            connection.close()
        return Response(status, _json(raw), _retry_after(retry))


def _json(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    with contextlib.suppress(ValueError):
        value = json.loads(raw)
        if isinstance(value, dict):
            return value
    return {"message": raw[:200].decode(errors="replace").strip()}
