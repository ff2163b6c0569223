"""The client config file (``basaltconfig``): named contexts with endpoints, nodes and certs.

Default location ``~/.basalt/config``; ``$BASALTCONFIG`` or ``--basaltconfig`` override it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, ValidationError

from ..config._base import Model
from ..config._yaml import dump_document, parse_documents
from ..errors import ClientConfigError, ConfigValidationError, Problem, format_path
from ..fileio import write_atomic
from ..pki import LEAF_VALIDITY, CertificateAndKey, issue_certificate
from ..roles import Role

ENV_VAR = "BASALTCONFIG"


def default_client_config_path() -> Path:
    """``$BASALTCONFIG`` if set, else ``~/.basalt/config``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path.home() / ".basalt" / "config"


class Context(Model):
    """How to reach one cluster: API endpoints, default target nodes, and credentials."""

    endpoints: list[str] = Field(default_factory=list, description="API endpoints to dial.")
    nodes: list[str] = Field(default_factory=list, description="Default target nodes.")
    ca: str = Field(description="PEM CA certificate that signs the nodes' API certificates.")
    crt: str = Field(description="PEM client certificate; roles in its Organization.")
    key: str = Field(description="PEM client private key.")


class ClientConfig(Model):
    """The whole file: the current context's name and every context by name."""

    context: str | None = Field(default=None, description="The current context.")
    contexts: dict[str, Context] = Field(default_factory=dict, description="Contexts by name.")

    def current(self, name: str | None = None) -> tuple[str, Context]:
        """The context called ``name``, or the current one; raises when there is none."""
        chosen = name or self.context
        if not chosen:
            raise ClientConfigError(
                "no context selected in the client config",
                hint="run 'basaltctl config use-context NAME' or pass --context",
            )
        if chosen not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise ClientConfigError(
                f"context {chosen!r} is not in the client config (contexts: {known})",
                hint="list them with 'basaltctl config contexts'",
            )
        return chosen, self.contexts[chosen]

    def merge(self, other: ClientConfig) -> list[tuple[str, str]]:
        """Add ``other``'s contexts; a name that exists gets a ``-1``, ``-2`` ... suffix.

        Returns ``(original, stored_as)`` for each renamed context. The merged
        file's current context becomes ``other``'s current one (as stored).
        """
        renamed: list[tuple[str, str]] = []
        stored_names: dict[str, str] = {}
        for name, context in other.contexts.items():
            stored = name
            n = 0
            while stored in self.contexts and self.contexts[stored] != context:
                n += 1
                stored = f"{name}-{n}"
            if stored != name:
                renamed.append((name, stored))
            self.contexts[stored] = context
            stored_names[name] = stored
        if other.context:
            self.context = stored_names.get(other.context, self.context)
        return renamed

    def to_yaml(self) -> str:
        return dump_document(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def parse_client_config(text: str, source: str) -> ClientConfig:
    from ..config.bundle import translate_error

    documents = parse_documents(text, source)
    if not documents:
        return ClientConfig()
    if len(documents) != 1 or not isinstance(documents[0].data, dict):
        raise ClientConfigError(f"{source}: a client config is one YAML mapping")
    raw = documents[0]
    try:
        return ClientConfig.model_validate(raw.data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc, message, hint = translate_error(ClientConfig, error)
            problems.append(
                Problem(
                    "basaltconfig",
                    format_path(loc),
                    message,
                    hint,
                    source=source,
                    line=raw.line_of(loc),
                )
            )
        raise ConfigValidationError(problems, source=source) from None


def load_client_config(path: Path, *, missing_ok: bool = False) -> ClientConfig:
    """Read the client config at ``path``. A missing file is an error unless ``missing_ok``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return ClientConfig()
        raise ClientConfigError(
            f"client config {path} does not exist",
            hint="create one with 'basaltctl gen config' and pass --basaltconfig, "
            "or merge it with 'basaltctl config merge FILE'",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientConfigError(f"client config {path} cannot be read: {exc}") from None
    return parse_client_config(text, str(path))


def save_client_config(config: ClientConfig, path: Path) -> None:
    """Write atomically, readable by the owner only (it holds a private key)."""
    write_atomic(path, config.to_yaml(), mode=0o600)


def issue_client_context(
    os_ca: CertificateAndKey,
    *,
    endpoints: Sequence[str],
    nodes: Sequence[str] = (),
    roles: Sequence[Role] = (Role.ADMIN,),
    common_name: str = "basaltctl",
    validity: dt.timedelta = LEAF_VALIDITY,
) -> Context:
    """A context with a new client certificate, signed by the OS CA, carrying ``roles``."""
    issued = issue_certificate(
        os_ca,
        common_name,
        organizations=[r.value for r in roles],
        client=True,
        validity=validity,
    )
    assert issued.key is not None
    return Context(
        endpoints=list(endpoints), nodes=list(nodes), ca=os_ca.crt, crt=issued.crt, key=issued.key
    )
