"""A fake Kubernetes API server for unit tests of cordon and drain: real HTTPS, nothing else.

No kube-apiserver can be installed here, and integration tests never fake one; unit
tests talk to this one instead. It serves TLS with a certificate from the test's CA,
for its loopback address, and requires a client certificate from ``client_ca``. It
implements only what the drain uses:

- ``GET``/``PATCH`` (JSON merge patch) ``/api/v1/nodes/NAME``;
- ``GET /api/v1/pods?fieldSelector=spec.nodeName=NAME`` (the selector is required);
- ``GET``/``DELETE /api/v1/namespaces/NS/pods/NAME``;
- ``POST /api/v1/namespaces/NS/pods/NAME/eviction`` (policy/v1): answered 429 while the
  pod's disruption budget refuses, then 201; the pod stays listed ``linger`` seconds
  after its eviction (it terminates), then 404.

Every request is logged as (method, path, client certificate CN).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from basalt.machinery.pki import CertificateAndKey, issue_certificate

PDB_MESSAGE = "Cannot evict pod as it would violate the pod's disruption budget."


@dataclass
class FakePod:
    name: str
    namespace: str = "default"
    node: str = "worker-1"
    phase: str = "Running"
    mirror: bool = False
    daemonset: bool = False
    #: Evictions answered 429 before one goes through; -1: a budget that never allows.
    pdb_refusals: int = 0
    #: Answer every eviction with this status instead (e.g. 500), when set.
    eviction_status: int | None = None
    #: Seconds the pod stays listed after its eviction or deletion (it terminates).
    linger: float = 0.0
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    evictions: int = 0
    removed_at: float | None = None

    @property
    def gone(self) -> bool:
        return self.removed_at is not None and time.monotonic() >= self.removed_at + self.linger

    def to_json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace, "uid": self.uid}
        if self.mirror:
            meta["annotations"] = {"kubernetes.io/config.mirror": "abc123"}
        if self.daemonset:
            meta["ownerReferences"] = [
                {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "controller": True}
            ]
        else:
            meta["ownerReferences"] = [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "controller": True}
            ]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {"nodeName": self.node},
            "status": {"phase": self.phase},
        }


def _status(code: int, message: str, reason: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubeApiServer:
    """Serves on ``https://HOST:PORT`` until :meth:`close`."""

    def __init__(
        self,
        ca: CertificateAndKey,
        *,
        host: str = "127.0.0.200",
        port: int = 0,
        client_ca: str | None = None,
    ) -> None:
        self.host = host
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pods: list[FakePod] = []
        self.log: list[tuple[str, str, str]] = []
        #: When set, every request is answered 403 (credentials the server refuses).
        self.forbidden = False
        self.handshake_failures = 0
        self._lock = threading.Lock()
        server_cert = issue_certificate(ca, "kube-apiserver", server=True, sans=[host])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca or ca.crt)
        _load_chain(context, server_cert)
        self._httpd = _TLSServer((host, port), _Handler, context, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self._httpd.server_address[1]
        return port

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def add_node(self, name: str, *, unschedulable: bool = False) -> None:
        self.nodes[name] = {"unschedulable": unschedulable}

    def add_pod(self, name: str, **fields: Any) -> FakePod:
        pod = FakePod(name, **fields)
        self.pods.append(pod)
        return pod

    def unschedulable(self, name: str) -> bool:
        return bool(self.nodes[name]["unschedulable"])

    def requests(self, method: str, fragment: str = "") -> list[str]:
        return [path for m, path, _ in self.log if m == method and fragment in path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeKubeApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API -------------------------------------------------------------------------
    def handle(self, method: str, target: str, body: dict[str, Any], headers: Any) -> Any:
        url = urllib.parse.urlsplit(target)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        query = urllib.parse.parse_qs(url.query)
        if self.forbidden:
            return 403, _status(403, f"{method.lower()} {url.path} is forbidden", "Forbidden")
        with self._lock:
            if parts[:3] == ["api", "v1", "nodes"] and len(parts) == 4:
                return self._node(method, parts[3], body, headers)
            if parts == ["api", "v1", "pods"] and method == "GET":
                return self._list(query)
            if (
                parts[:3] == ["api", "v1", "namespaces"]
                and len(parts) in (6, 7)
                and (parts[4] == "pods")
            ):
                return self._pod(method, parts[3], parts[5], parts[6:], body)
        return 404, _status(404, f"the fake has no {method} {url.path}", "NotFound")

    def _node(self, method: str, name: str, body: dict[str, Any], headers: Any) -> Any:
        node = self.nodes.get(name)
        if node is None:
            return 404, _status(404, f'nodes "{name}" not found', "NotFound")
        if method == "PATCH":
            if headers.get("Content-Type") != "application/merge-patch+json":
                return 415, _status(415, "the fake takes JSON merge patches only")
            spec = body.get("spec") or {}
            if "unschedulable" in spec:
                node["unschedulable"] = bool(spec["unschedulable"])
        elif method != "GET":
            return 405, _status(405, f"{method} on a node")
        spec = {"unschedulable": True} if node["unschedulable"] else {}
        return 200, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": spec}

    def _list(self, query: dict[str, list[str]]) -> Any:
        selector = (query.get("fieldSelector") or [""])[0]
        if not selector.startswith("spec.nodeName="):
            return 400, _status(400, "the fake lists pods by fieldSelector=spec.nodeName= only")
        node = selector.removeprefix("spec.nodeName=")
        items = [p.to_json() for p in self.pods if p.node == node and not p.gone]
        return 200, {"apiVersion": "v1", "kind": "PodList", "items": items}

    def _find(self, namespace: str, name: str) -> FakePod | None:
        for pod in self.pods:
            if (pod.namespace, pod.name) == (namespace, name) and not pod.gone:
                return pod
        return None

    def _pod(
        self, method: str, namespace: str, name: str, sub: list[str], body: dict[str, Any]
    ) -> Any:
        pod = self._find(namespace, name)
        if pod is None:
            return 404, _status(404, f'pods "{name}" not found', "NotFound")
        if sub == ["eviction"] and method == "POST":
            return self._evict(pod, body)
        if sub == [] and method == "GET":
            return 200, pod.to_json()
        if sub == [] and method == "DELETE":
            wanted = (body.get("preconditions") or {}).get("uid")
            if wanted is not None and wanted != pod.uid:
                return 409, _status(409, f"Precondition failed: UID in precondition: {wanted}")
            pod.removed_at = pod.removed_at or time.monotonic()
            return 200, pod.to_json()
        return 405, _status(405, f"{method} on pods/{'/'.join(sub)}")

    def _evict(self, pod: FakePod, body: dict[str, Any]) -> Any:
        meta = body.get("metadata") or {}
        if (body.get("apiVersion"), body.get("kind")) != ("policy/v1", "Eviction") or (
            meta.get("name"),
            meta.get("namespace"),
        ) != (pod.name, pod.namespace):
            return 400, _status(400, f"not a policy/v1 Eviction of {pod.namespace}/{pod.name}")
        pod.evictions += 1
        if pod.eviction_status is not None:
            return pod.eviction_status, _status(pod.eviction_status, "the fake was told to fail")
        if pod.pdb_refusals != 0:
            pod.pdb_refusals -= 1 if pod.pdb_refusals > 0 else 0
            return 429, _status(429, PDB_MESSAGE, "TooManyRequests")
        pod.removed_at = pod.removed_at or time.monotonic()
        return 201, _status(201, "", "")


def _load_chain(context: ssl.SSLContext, cert: CertificateAndKey) -> None:
    import os

    assert cert.key is not None
    fd = os.memfd_create("fake-apiserver", os.MFD_CLOEXEC)
    try:
        os.write(fd, (cert.crt + cert.key).encode())
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        fake: FakeKubeApiServer,
    ) -> None:
        super().__init__(address, handler)
        self.context = context
        self.fake = fake

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake in the request's own thread; a refused one is counted."""
        request.settimeout(5.0)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.fake.handshake_failures += 1
            return
        self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TLSServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        peer: Any = self.connection.getpeercert() or {}
        cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"), "")
        fake = self.server.fake
        fake.log.append((self.command, self.path, cn))
        code, answer = fake.handle(self.command, self.path, body, self.headers)
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_POST = do_DELETE = _serve
