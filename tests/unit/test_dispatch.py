"""The dispatcher over a real in-process gRPC server: roles, impersonation, maintenance
mode, and BasaltErrors mapped to status codes. Real certificates, real (m)TLS.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from basalt.machined.api.auth import (
    NODE_METADATA,
    ROLES_METADATA,
    authenticate,
    current_principal,
)
from basalt.machined.api.dispatch import Check, Dispatcher, wrap
from basalt.machined.api.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
    status_for,
)
from basalt.machined.api.tls import maintenance_credentials, mtls_credentials
from basalt.machined.runtime.sequencer import SequenceConflictError
from basalt.machinery.api import common_pb2, machine_pb2, machine_pb2_grpc
from basalt.machinery.client.client import Client
from basalt.machinery.errors import (
    BasaltError,
    ConfigSyntaxError,
    ConfigValidationError,
    PatchError,
    Problem,
)
from basalt.machinery.pki import CertificateAndKey, generate_ca, issue_certificate
from basalt.machinery.roles import RPC_ROLES, Role, allowed_roles, is_allowed, parse_roles

T = TypeVar("T")
SERVICE = "/basalt.api.v1alpha1.MachineService/"
Context = grpc.aio.ServicerContext[Any, Any]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


# -- certificates (one CA per module run; ECDSA keys are cheap) -----------------------------


@functools.cache
def os_ca() -> CertificateAndKey:
    return generate_ca("basalt-os")


@functools.cache
def server_cert(address: str) -> CertificateAndKey:
    return issue_certificate(os_ca(), "node", server=True, sans=[address, "localhost"])


@functools.cache
def client_cert(*organizations: str, ca: CertificateAndKey | None = None) -> CertificateAndKey:
    return issue_certificate(
        ca or os_ca(), "test-client", organizations=list(organizations), client=True
    )


# -- a tiny servicer ------------------------------------------------------------------------


class Servicer(machine_pb2_grpc.MachineServiceServicer):
    """Version reports who called; Reboot and Logs raise ``self.error`` when it is set."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    async def Version(self, request: common_pb2.Empty, context: Context) -> Any:
        principal = current_principal.get()
        return machine_pb2.VersionResponse(
            messages=[
                machine_pb2.VersionInfo(
                    metadata=common_pb2.Metadata(node=principal.node_name),
                    tag=",".join(sorted(r.value for r in principal.roles)),
                    hostname=principal.subject,
                    platform=principal.forwarded_by,
                    mode="maintenance" if principal.maintenance else "normal",
                )
            ]
        )

    async def Reboot(self, request: machine_pb2.RebootRequest, context: Context) -> Any:
        if self.error is not None:
            raise self.error
        return common_pb2.ActionResponse(messages=[common_pb2.Action(message="rebooting")])

    async def Logs(self, request: machine_pb2.LogsRequest, context: Context) -> AsyncIterator[Any]:
        yield common_pb2.Data(bytes=b"first\n")
        if self.error is not None:
            raise self.error
        yield common_pb2.Data(bytes=b"second\n")


@dataclass
class Served:
    endpoint: str
    servicer: Servicer
    dispatcher: Dispatcher


async def serve(
    address: str,
    body: Callable[[Served], Awaitable[T]],
    *,
    maintenance: bool = False,
    rbac: bool = True,
    forward: Any = None,
) -> T:
    """Run ``body`` against a real server on ``address`` (a free port), then stop it."""
    servicer = Servicer()
    dispatcher = Dispatcher(maintenance=maintenance, rbac_enabled=lambda: rbac, forward=forward)
    dispatcher.register(machine_pb2_grpc.add_MachineServiceServicer_to_server, servicer)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((dispatcher,))
    if maintenance:
        credentials = maintenance_credentials(address)
    else:
        credentials = mtls_credentials(lambda: (os_ca().crt, server_cert(address)))
    port = server.add_secure_port(f"{address}:0", credentials)
    await server.start()
    try:
        return await body(Served(f"{address}:{port}", servicer, dispatcher))
    finally:
        await server.stop(None)


async def connect(served: Served, cert: CertificateAndKey, ca: str | None = None) -> Client:
    return await Client.connect(served.endpoint, ca=ca or os_ca().crt, crt=cert.crt, key=cert.key)


async def version(client: Client, metadata: tuple[tuple[str, str], ...] = ()) -> Any:
    answer = await client.machine.Version(common_pb2.Empty(), metadata=metadata, timeout=5)
    return answer.messages[0]


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# -- roles from the certificate --------------------------------------------------------------


@pytest.mark.parametrize(
    ("organizations", "roles"),
    [
        (("os:admin",), "os:admin"),
        (("os:reader",), "os:reader"),
        (("os:operator", "os:etcd:backup"), "os:etcd:backup,os:operator"),
        (("os:reader", "cluster-admins"), "os:reader"),
    ],
)
def test_roles_come_from_the_certificate(organizations: tuple[str, ...], roles: str) -> None:
    async def body(served: Served) -> Any:
        async with await connect(served, client_cert(*organizations)) as client:
            return await version(client)

    info = run(serve("127.0.0.221", body))
    assert info.tag == roles
    assert "CN=test-client" in info.hostname
    assert info.platform == ""  # not forwarded
    assert info.mode == "normal"


def test_unknown_organizations_carry_no_rights() -> None:
    async def body(served: Served) -> grpc.aio.AioRpcError:
        async with await connect(served, client_cert("cluster-admins", "system:masters")) as c:
            return await failure(version(c))

    error = run(serve("127.0.0.221", body))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == (
        "Version needs one of the roles os:admin, os:etcd:backup, os:operator, os:reader; "
        "the client has no role"
    )


@pytest.mark.parametrize(
    ("organization", "allowed"),
    [("os:admin", True), ("os:operator", True), ("os:reader", False), ("os:etcd:backup", False)],
)
def test_reboot_needs_an_operating_role(organization: str, allowed: bool) -> None:
    async def body(served: Served) -> grpc.StatusCode:
        async with await connect(served, client_cert(organization)) as client:
            try:
                await client.machine.Reboot(machine_pb2.RebootRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    code = run(serve("127.0.0.222", body))
    assert code == (grpc.StatusCode.OK if allowed else grpc.StatusCode.PERMISSION_DENIED)


def test_rbac_disabled_makes_every_client_admin() -> None:
    async def body(served: Served) -> Any:
        async with await connect(served, client_cert("os:reader")) as client:
            await client.machine.Reboot(machine_pb2.RebootRequest(), timeout=5)
            return await version(client)

    assert run(serve("127.0.0.222", body, rbac=False)).tag == "os:admin"


def test_a_certificate_from_another_ca_is_refused() -> None:
    other = generate_ca("other-os")

    async def body(served: Served) -> grpc.aio.AioRpcError:
        async with await connect(served, client_cert("os:admin", ca=other)) as client:
            return await failure(version(client))

    assert run(serve("127.0.0.223", body)).code() == grpc.StatusCode.UNAVAILABLE


def test_no_client_certificate_is_refused() -> None:
    async def body(served: Served) -> grpc.aio.AioRpcError:
        credentials = grpc.ssl_channel_credentials(root_certificates=os_ca().crt.encode())
        async with grpc.aio.secure_channel(served.endpoint, credentials) as channel:
            stub = machine_pb2_grpc.MachineServiceStub(channel)
            return await failure(stub.Version(common_pb2.Empty(), timeout=5))

    assert run(serve("127.0.0.223", body)).code() == grpc.StatusCode.UNAVAILABLE


def test_authenticate_without_a_client_certificate() -> None:
    from basalt.machined.api.auth import AuthenticationError

    with pytest.raises(AuthenticationError, match="no client certificate"):
        authenticate({}, {})


# -- impersonation ---------------------------------------------------------------------------


def test_an_impersonators_forwarded_roles_are_honoured() -> None:
    metadata = (
        (ROLES_METADATA, "os:reader,os:impersonator,bogus"),
        ("basalt-subject", "CN=alice,O=os:reader"),
        (NODE_METADATA, "w-1"),
    )

    async def body(served: Served) -> Any:
        async with await connect(served, client_cert(Role.IMPERSONATOR.value)) as client:
            return await version(client, metadata)

    info = run(serve("127.0.0.224", body))
    assert info.tag == "os:reader"  # the impersonator role itself is never passed on
    assert info.hostname == "CN=alice,O=os:reader"
    assert "CN=test-client" in info.platform  # forwarded_by: the control plane's cert
    assert info.metadata.node == "w-1"


def test_an_impersonator_without_forwarded_roles_has_none() -> None:
    async def body(served: Served) -> grpc.aio.AioRpcError:
        async with await connect(served, client_cert(Role.IMPERSONATOR.value)) as client:
            return await failure(version(client))

    assert run(serve("127.0.0.224", body)).code() == grpc.StatusCode.PERMISSION_DENIED


def test_roles_metadata_from_a_normal_client_is_ignored() -> None:
    forged = ((ROLES_METADATA, "os:admin"), ("basalt-subject", "CN=root"), (NODE_METADATA, "x"))

    async def body(served: Served) -> tuple[Any, grpc.aio.AioRpcError]:
        async with await connect(served, client_cert("os:reader")) as client:
            info = await version(client, forged)
            refused = await failure(
                client.machine.Reboot(machine_pb2.RebootRequest(), metadata=forged, timeout=5)
            )
            return info, refused

    info, refused = run(serve("127.0.0.224", body))
    assert info.tag == "os:reader"
    assert info.hostname != "CN=root"
    assert info.metadata.node == ""
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "the client has os:reader" in refused.details()


# -- forwarding ------------------------------------------------------------------------------


def test_requests_naming_nodes_go_to_the_forwarder() -> None:
    seen: list[tuple[str, list[str]]] = []

    def forward(method: str, handler: Any, nodes: list[str], check: Check) -> Any:
        seen.append((method, nodes))
        return wrap(handler, check)

    async def body(served: Served) -> Any:
        async with await connect(served, client_cert("os:reader")) as client:
            first = await version(client, (("nodes", " w-1, w-2 ,"),))
            await version(client)
            return first

    info = run(serve("127.0.0.225", body, forward=forward))
    assert info.tag == "os:reader"  # the forwarder still gets the role check
    assert seen == [(SERVICE + "Version", ["w-1", "w-2"])]


# -- maintenance mode ------------------------------------------------------------------------


def test_maintenance_serves_version_without_a_client_certificate() -> None:
    async def body(served: Served) -> Any:
        async with await Client.connect(served.endpoint, insecure=True) as client:
            return await version(client)

    info = run(serve("127.0.0.226", body, maintenance=True))
    assert info.mode == "maintenance"
    assert info.tag == ""


def test_maintenance_refuses_other_rpcs() -> None:
    async def body(served: Served) -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        async with await Client.connect(served.endpoint, insecure=True) as client:
            reboot = await failure(client.machine.Reboot(machine_pb2.RebootRequest(), timeout=5))
            logs = await failure(
                _drain(client.machine.Logs(machine_pb2.LogsRequest(id="machined"), timeout=5))
            )
            return reboot, logs

    reboot, logs = run(serve("127.0.0.226", body, maintenance=True))
    for error, name in ((reboot, "Reboot"), (logs, "Logs")):
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "maintenance mode" in error.details()
        assert f"({name} is not)" in error.details()


def test_maintenance_refuses_to_forward() -> None:
    async def body(served: Served) -> grpc.aio.AioRpcError:
        async with await Client.connect(
            served.endpoint, insecure=True, nodes=["192.0.2.5"]
        ) as client:
            return await failure(version(client, client.metadata()))

    error = run(serve("127.0.0.227", body, maintenance=True))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "maintenance mode" in error.details()
    assert "does not forward" in error.details()


def test_maintenance_grants_no_roles() -> None:
    """Nothing grants roles before a config exists, not even forwarded-role metadata."""

    async def body(served: Served) -> Any:
        async with await Client.connect(served.endpoint, insecure=True) as client:
            return await version(client, ((ROLES_METADATA, "os:admin"),))

    assert run(serve("127.0.0.227", body, maintenance=True)).tag == ""


def test_a_deferred_servicer_is_built_only_when_a_call_is_let_through() -> None:
    """Refusals need only a method's shape; the servicer is built for the first call that
    reaches it, once, and answers as a registered one would."""
    built: list[Servicer] = []

    def make() -> Servicer:
        built.append(Servicer())
        return built[-1]

    async def body() -> tuple[int, grpc.aio.AioRpcError, int, Any, Any]:
        dispatcher = Dispatcher(maintenance=True)
        deferred = dispatcher.register_deferred(
            machine_pb2_grpc.add_MachineServiceServicer_to_server,
            machine_pb2_grpc.MachineServiceServicer(),  # type: ignore[abstract]
            make,
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((dispatcher,))
        port = server.add_secure_port("127.0.0.228:0", maintenance_credentials("127.0.0.228"))
        await server.start()
        try:
            async with await Client.connect(f"127.0.0.228:{port}", insecure=True) as client:
                refused = await failure(
                    client.machine.Reboot(machine_pb2.RebootRequest(), timeout=5)
                )
                before = len(built)
                first = await version(client)
                second = await version(client)
        finally:
            await server.stop(None)
        assert deferred.built
        return before, refused, len(built), first, second

    before, refused, after, first, second = run(body())
    assert before == 0 and refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert after == 1
    assert first.mode == second.mode == "maintenance"


# -- the role table --------------------------------------------------------------------------


def test_an_rpc_missing_from_the_role_table_is_admin_only() -> None:
    missing = SERVICE + "SomethingNew"
    assert missing not in RPC_ROLES
    assert allowed_roles(missing) == {Role.ADMIN}
    assert is_allowed(missing, {Role.ADMIN})
    for role in (Role.OPERATOR, Role.READER, Role.ETCD_BACKUP, Role.IMPERSONATOR):
        assert not is_allowed(missing, {role})


def test_every_served_rpc_is_in_the_role_table() -> None:
    dispatcher = Dispatcher(maintenance=False)
    dispatcher.register(machine_pb2_grpc.add_MachineServiceServicer_to_server, Servicer())
    assert set(dispatcher.methods) <= set(RPC_ROLES)
    assert SERVICE + "Version" in dispatcher.methods


def test_parse_roles_keeps_only_known_roles() -> None:
    assert parse_roles(["os:reader", "admins", "", "OS:ADMIN"]) == {Role.READER}


# -- errors -> status codes ------------------------------------------------------------------

PROBLEMS = [
    Problem("ClusterConfig", "network.podSubnets[0]", "not a CIDR", hint="e.g. 10.244.0.0/16"),
    Problem("LinkConfig(eth0)", "mtu", "must be at least 68"),
]

ERRORS: dict[str, tuple[BasaltError, grpc.StatusCode, list[str]]] = {
    "sequence conflict": (
        SequenceConflictError("boot", "reboot"),
        grpc.StatusCode.FAILED_PRECONDITION,
        ["sequence 'boot' is running", "hint: wait for it to finish"],
    ),
    "config validation": (
        ConfigValidationError(PROBLEMS, source="config.yaml"),
        grpc.StatusCode.INVALID_ARGUMENT,
        [
            "config.yaml: 2 errors found",
            "ClusterConfig.network.podSubnets[0]: not a CIDR",
            "hint: e.g. 10.244.0.0/16",
            "LinkConfig(eth0).mtu: must be at least 68",
        ],
    ),
    "config syntax": (
        ConfigSyntaxError("bad indent", source="c.yaml", line=3, column=1),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["c.yaml:3:1: bad indent"],
    ),
    "patch": (PatchError("p.yaml: no kind"), grpc.StatusCode.INVALID_ARGUMENT, ["no kind"]),
    "not found": (NotFoundError("no service 'x'"), grpc.StatusCode.NOT_FOUND, ["no service"]),
    "invalid request": (
        InvalidRequestError("tail must be positive"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["tail must be positive"],
    ),
    "access denied": (
        AccessDeniedError("MachineConfigs is sensitive"),
        grpc.StatusCode.PERMISSION_DENIED,
        ["sensitive"],
    ),
    "unavailable": (UnavailableError("no kmsg"), grpc.StatusCode.UNAVAILABLE, ["no kmsg"]),
    "already exists": (AlreadyExistsError("there"), grpc.StatusCode.ALREADY_EXISTS, ["there"]),
    "plain BasaltError": (
        BasaltError("cannot now", hint="later"),
        grpc.StatusCode.FAILED_PRECONDITION,
        ["cannot now", "hint: later"],
    ),
}


@pytest.mark.parametrize(("error", "code", "details"), ERRORS.values(), ids=ERRORS.keys())
def test_basalt_errors_become_status_codes(
    error: BasaltError, code: grpc.StatusCode, details: list[str]
) -> None:
    async def body(served: Served) -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
        served.servicer.error = error
        async with await connect(served, client_cert("os:admin")) as client:
            unary = await failure(client.machine.Reboot(machine_pb2.RebootRequest(), timeout=5))
            stream = await failure(
                _drain(client.machine.Logs(machine_pb2.LogsRequest(id="x"), timeout=5))
            )
            return unary, stream

    unary, stream = run(serve("127.0.0.228", body))
    assert status_for(error) == code
    for answer in (unary, stream):
        assert answer.code() == code
        for part in details:
            assert part in answer.details()


def test_a_stream_keeps_what_it_sent_before_failing() -> None:
    async def body(served: Served) -> tuple[list[bytes], grpc.StatusCode]:
        served.servicer.error = NotFoundError("log 'x' ended")
        received: list[bytes] = []
        async with await connect(served, client_cert("os:reader")) as client:
            try:
                async for chunk in client.machine.Logs(machine_pb2.LogsRequest(id="x"), timeout=5):
                    received.append(chunk.bytes)
            except grpc.aio.AioRpcError as exc:
                return received, exc.code()
        return received, grpc.StatusCode.OK

    assert run(serve("127.0.0.228", body)) == ([b"first\n"], grpc.StatusCode.NOT_FOUND)


def test_other_exceptions_are_not_dressed_up() -> None:
    async def body(served: Served) -> grpc.aio.AioRpcError:
        served.servicer.error = RuntimeError("internal detail")
        async with await connect(served, client_cert("os:admin")) as client:
            return await failure(client.machine.Reboot(machine_pb2.RebootRequest(), timeout=5))

    assert run(serve("127.0.0.228", body)).code() == grpc.StatusCode.UNKNOWN


async def _drain(stream: Any) -> list[Any]:
    return [item async for item in stream]
