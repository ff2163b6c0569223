"""One fleet process's state: its database, secrets key, CA, links and metrics.

Built once by ``server.serve`` (and by tests); the REST app and the link service hold it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from basalt.machinery.fileio import write_atomic
from basalt.machinery.fleetlink.url import FleetURL, ca_fingerprint
from basalt.machinery.pki import CertificateAndKey

from . import service
from .auth import ADMIN_TOKEN_FILE
from .db import Database, Machine
from .link import LinkService
from .metrics import Metrics
from .migrations import upgrade
from .pki import load_or_create_ca, server_certificate
from .secretbox import SecretBox

if TYPE_CHECKING:
    from basalt.factory.builds import BuildStatus
    from basalt.factory.core import Factory
    from basalt.machinery.schematic import Schematic

log = logging.getLogger("basalt.fleet")

DEFAULT_PORT = 8443


def default_data_dir() -> Path:
    return Path.home() / ".basalt" / "fleet"


def _factory(options: FleetOptions) -> Factory:
    """The image factory the fleet serves at /factory/ (nothing is built until asked)."""
    from basalt.factory.core import Factory, FactoryOptions
    from basalt.imager.lock import DEFAULT_LOCK

    return Factory(
        FactoryOptions(
            state=options.factory_state or options.data_dir / "factory",
            lock=options.factory_lock or DEFAULT_LOCK,
            signing_key=options.factory_signing_key,
            extension_keys=options.factory_extension_keys,
        )
    )


@dataclass
class FleetOptions:
    data_dir: Path = field(default_factory=default_data_dir)
    database: str = ""
    secrets_key: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: The machines' gRPC link port (0: port + 1).
    link_port: int = 0
    #: Where other replicas forward calls to machines linked here (0: port + 2).
    forward_port: int = 0
    #: Where etcd snapshots are kept (default: DATA_DIR/backups).
    backups: Path | None = None
    #: Extra names and addresses for the server certificate (what machines dial).
    advertise: tuple[str, ...] = ()
    replica: str = ""
    #: The release repository (basaltctl release init) the fleet serves and rolls out.
    releases: Path | None = None
    #: Promotion rule: a release moves on only after this many machines ran it healthy
    #: for this long with no fallback (``--force`` overrides, audited).
    promote_min_machines: int = 3
    promote_min_seconds: float = 86400.0
    #: The image factory served at /factory/: its state directory (default
    #: DATA_DIR/factory), the image.lock it builds from (default: the repository's), the
    #: key that signs its bundle.tar, and the keys trusted to sign custom extensions.
    factory_state: Path | None = None
    factory_lock: Path | None = None
    factory_signing_key: Path | None = None
    factory_extension_keys: tuple[Path, ...] = ()
    #: The discovery service (docs/discovery.md) on its own port with the fleet's server
    #: certificate; 0: off. Its snapshot lives in DATA_DIR/discovery.
    discovery_port: int = 0

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def secrets_key_path(self) -> Path:
        return self.secrets_key or self.data_dir / "secrets.key"

    @property
    def effective_link_port(self) -> int:
        return self.link_port or self.port + 1

    @property
    def backup_dir(self) -> Path:
        return self.backups or self.data_dir / "backups"

    @property
    def effective_forward_port(self) -> int:
        return self.forward_port or self.port + 2


class Fleet:
    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        options.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(options.data_dir, 0o700)
        self.replica = options.replica or f"{socket.gethostname()}-{os.getpid()}"
        self.box = SecretBox.from_file(options.secrets_key_path, create=options.secrets_key is None)
        self.database = Database(options.database_url)
        upgrade(self.database.engine)
        with self.database.session() as session:
            self.ca: CertificateAndKey = load_or_create_ca(session, self.box)
            admin_token = service.bootstrap_admin(session)
        write_atomic(options.data_dir / "ca.crt", self.ca.crt)
        if admin_token is not None:
            write_atomic(options.data_dir / ADMIN_TOKEN_FILE, admin_token + "\n", mode=0o600)
            log.info("first start: the admin's API token is in %s", self.admin_token_path)
        hosts = [options.host, *options.advertise]
        self.server_cert = server_certificate(self.ca, [h for h in hosts if h != "0.0.0.0"])
        self.ca_sha256 = ca_fingerprint(self.ca.crt)
        self.metrics = Metrics()
        # Tunnel sockets live in a short private directory of this process (a Unix
        # socket's path has at most 107 bytes; a data directory can be longer).
        self.links = LinkService(self.database, self.metrics, self.replica)
        self.factory = _factory(options)

    @property
    def admin_token_path(self) -> Path:
        return self.options.data_dir / ADMIN_TOKEN_FILE

    def fleet_url(self, token: str, host: str | None = None) -> str:
        chosen = host or (
            self.options.advertise[0] if self.options.advertise else self.options.host
        )
        return str(FleetURL(chosen, self.options.port, token, self.ca_sha256))

    def join_token_image(
        self, caller: str, token_id: str, token: str, customization: str = ""
    ) -> tuple[Schematic, BuildStatus]:
        """The installation image of a join token: a schematic whose kernel arguments end
        with ``basalt.fleet=<this fleet's URL with the token>`` (after ``customization``'s
        own: extensions, other arguments), posted to the factory and its build started.

        The fleet keeps only the token's hash, so the caller gives the token (it was shown
        to them once); it must be the one of ``token_id``, usable. Raises
        :class:`~basalt.machinery.schematic.SchematicError` for a customization that does
        not validate. Audited without the token."""
        from basalt.machinery.schematic import EMPTY, Schematic, parse_schematic

        from .auth import token_digest
        from .db import JoinToken, aware, utcnow

        with self.database.session() as session:
            row = session.get(JoinToken, token_id)
            if row is None:
                raise service.NotFound(f"join token {token_id!r} does not exist")
            if row.digest != token_digest(token):
                raise service.Refused(
                    f"token: not the secret of join token {token_id}",
                    hint="give the token shown when it was made (bfj_...)",
                )
            expires = aware(row.expires)
            if row.revoked or (expires is not None and expires < utcnow()):
                raise service.FleetError(
                    f"join token {token_id} is revoked or expired", hint="make a new join token"
                )
            if row.used >= row.uses:
                raise service.FleetError(
                    f"join token {token_id} is used up", hint="make a new join token"
                )
        base = parse_schematic(customization, "customization") if customization else EMPTY
        if any(arg.partition("=")[0] == "basalt.fleet" for arg in base.extra_kernel_args):
            raise service.FleetError(
                "customization: basalt.fleet is the fleet's own argument",
                hint="leave it out: the image gets the join token's URL",
            )
        host = self.options.advertise[0] if self.options.advertise else self.options.host
        if host in ("0.0.0.0", "::"):
            raise service.FleetError(
                "the fleet listens on every address and advertises none: an image could not "
                "say where the fleet is",
                hint="start basalt-fleet with --advertise NAME (a name machines reach it by)",
            )
        arg = f"basalt.fleet={self.fleet_url(token)}"
        wanted = Schematic((*base.extra_kernel_args, arg), base.extensions, base.custom_extensions)
        schematic, _created = self.factory.add_schematic(wanted.to_yaml(), "join-token schematic")
        status = self.factory.start_build(schematic.id, self.factory.version)
        with self.database.session() as session:
            from . import audit

            audit.record(
                session,
                caller,
                "join-token.image",
                token_id,
                {"schematic": schematic.id, "version": self.factory.version},
            )
        return schematic, status

    def write_tls(self, directory: Path) -> tuple[str, str, str]:
        """The server certificate chain, its key (0600) and the CA as files in
        ``directory`` (ssl reads them only from files): (chain, key, ca)."""
        assert self.server_cert.key is not None
        chain, key, ca = directory / "server.crt", directory / "server.key", directory / "ca.crt"
        chain.write_text(self.server_cert.crt + self.ca.crt)
        key.touch(mode=0o600)
        key.write_text(self.server_cert.key)
        ca.write_text(self.ca.crt)
        return str(chain), str(key), str(ca)

    def machine_counts(self) -> dict[str, int]:
        with self.database.session() as session:
            rows = session.execute(select(Machine.state, func.count()).group_by(Machine.state))
            counts = {"free": 0, "allocated": 0, "removed": 0}
            counts.update({str(row[0]): int(row[1]) for row in rows})
        counts["connected"] = len(self.links.links)
        return counts

    def close(self) -> None:
        import shutil

        self.factory.close()
        self.links.close_all()
        self.database.dispose()
        shutil.rmtree(self.links.socket_dir, ignore_errors=True)
