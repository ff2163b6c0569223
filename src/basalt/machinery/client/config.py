"""The client config file (``basaltconfig``): named contexts with endpoints, nodes and certs.

Default location ``~/.basalt/config``; ``$BASALTCONFIG`` or ``--basaltconfig`` override it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ClientConfigError, ConfigValidationError, Problem, format_path
from ..fileio import write_atomic
from ..roles import Role
from ..yamlio import Loc, dump_document, parse_documents

if TYPE_CHECKING:
    from ..pki import CertificateAndKey

ENV_VAR = "BASALTCONFIG"


def default_client_config_path() -> Path:
    """``$BASALTCONFIG`` if set, else ``~/.basalt/config``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path.home() / ".basalt" / "config"


@dataclass
class Context:
    """How to reach one cluster: API endpoints, default target nodes, and credentials."""

    ca: str
    crt: str
    key: str
    endpoints: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)


# The client config is read by every API command, so it is plain data checked by hand:
# no pydantic on that path (it costs more start-up time than the request itself).
_CONTEXT_FIELDS: dict[str, type] = {
    "endpoints": list,
    "nodes": list,
    "ca": str,
    "crt": str,
    "key": str,
}
_REQUIRED = ("ca", "crt", "key")


@dataclass
class FleetLogin:
    """How ``basaltctl fleet`` reaches a Basalt Fleet: its URL, an API token, its CA."""

    url: str
    token: str
    ca: str


_FLEET_FIELDS = ("url", "token", "ca")


@dataclass
class ClientConfig:
    """The whole file: the current context's name, every context by name, and the fleet
    ``basaltctl fleet login`` stored."""

    context: str | None = None
    contexts: dict[str, Context] = field(default_factory=dict)
    fleet: FleetLogin | None = None

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

    def add(self, name: str, context: Context, *, force: bool = False) -> bool:
        """Store ``context`` as ``name``; the first context becomes the current one.
        Refuses (ClientConfigError) to replace an existing ``name`` unless ``force``.
        Returns whether it replaced one."""
        if not name or any(c.isspace() for c in name):
            raise ClientConfigError(
                f"context name {name!r} is empty or has spaces", hint="e.g. prod or lab-1"
            )
        replaced = name in self.contexts
        if replaced and not force:
            raise ClientConfigError(
                f"context {name!r} exists already; it is not replaced",
                hint="pass --force to replace it, or choose another name",
            )
        self.contexts[name] = context
        if self.context is None:
            self.context = name
        return replaced

    def remove(self, name: str, *, force: bool = False) -> None:
        """Remove context ``name``. The current one only with ``force`` (then none is
        current); an unknown name is a ClientConfigError listing the known ones."""
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise ClientConfigError(
                f"context {name!r} is not in the client config (contexts: {known})",
                hint="list them with 'basaltctl config contexts'",
            )
        if name == self.context and not force:
            others = sorted(n for n in self.contexts if n != name)
            choose = f"'basaltctl config use-context {others[0]}'" if others else "none left"
            raise ClientConfigError(
                f"context {name!r} is the current context; it is not removed",
                hint=f"choose another first ({choose}), or pass --force",
            )
        del self.contexts[name]
        if name == self.context:
            self.context = None

    def to_yaml(self) -> str:
        data: dict[str, Any] = {}
        if self.context is not None:
            data["context"] = self.context
        data["contexts"] = {
            name: {
                "endpoints": list(c.endpoints),
                "nodes": list(c.nodes),
                "ca": c.ca,
                "crt": c.crt,
                "key": c.key,
            }
            for name, c in self.contexts.items()
        }
        if self.fleet is not None:
            data["fleet"] = {"url": self.fleet.url, "token": self.fleet.token, "ca": self.fleet.ca}
        return dump_document(data)


def _unknown(key: str, allowed: Sequence[str]) -> tuple[str, str]:
    import difflib

    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"allowed here: {', '.join(allowed)}"
    return f"unknown field {key!r}", hint


def _validate(data: dict[str, Any]) -> tuple[ClientConfig, list[tuple[Loc, str, str | None]]]:
    errors: list[tuple[Loc, str, str | None]] = []
    for key in data:
        if key not in ("context", "contexts", "fleet"):
            errors.append(((str(key),), *_unknown(str(key), ["context", "contexts", "fleet"])))
    fleet = _validate_fleet(data.get("fleet"), errors)
    current = data.get("context")
    if current is not None and not isinstance(current, str):
        errors.append((("context",), "must be a string", None))
    raw_contexts = data.get("contexts") or {}
    if not isinstance(raw_contexts, dict):
        errors.append((("contexts",), "must be a mapping", "contexts: {NAME: {...}}"))
        raw_contexts = {}
    contexts: dict[str, Context] = {}
    for name, raw in raw_contexts.items():
        loc: Loc = ("contexts", str(name))
        if not isinstance(raw, dict):
            errors.append((loc, "must be a mapping of fields", None))
            continue
        values: dict[str, Any] = {}
        for key, value in raw.items():
            kind = _CONTEXT_FIELDS.get(str(key))
            if kind is None:
                errors.append(((*loc, str(key)), *_unknown(str(key), list(_CONTEXT_FIELDS))))
            elif kind is list and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                errors.append(((*loc, str(key)), "must be a list of strings", None))
            elif kind is str and not isinstance(value, str):
                errors.append(((*loc, str(key)), "must be a string", None))
            else:
                values[str(key)] = value
        missing = [k for k in _REQUIRED if k not in raw]
        errors.extend(((*loc, k), "required field is missing", None) for k in missing)
        if not missing and len(values) == len(raw):
            contexts[str(name)] = Context(**values)
    return ClientConfig(current if isinstance(current, str) else None, contexts, fleet), errors


def _validate_fleet(raw: Any, errors: list[tuple[Loc, str, str | None]]) -> FleetLogin | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        errors.append((("fleet",), "must be a mapping", "fleet: {url: ..., token: ..., ca: ...}"))
        return None
    bad = len(errors)
    for key, value in raw.items():
        if key not in _FLEET_FIELDS:
            errors.append((("fleet", str(key)), *_unknown(str(key), list(_FLEET_FIELDS))))
        elif not isinstance(value, str):
            errors.append((("fleet", str(key)), "must be a string", None))
    errors.extend(
        (("fleet", k), "required field is missing", None) for k in _FLEET_FIELDS if k not in raw
    )
    if len(errors) != bad:
        return None
    return FleetLogin(str(raw["url"]), str(raw["token"]), str(raw["ca"]))


def parse_client_config(text: str, source: str) -> ClientConfig:
    documents = parse_documents(text, source)
    if not documents:
        return ClientConfig()
    if len(documents) != 1 or not isinstance(documents[0].data, dict):
        raise ClientConfigError(f"{source}: a client config is one YAML mapping")
    raw = documents[0]
    config, errors = _validate(raw.data)
    if errors:
        problems = [
            Problem(
                "basaltconfig",
                format_path(loc),
                message,
                hint,
                source=source,
                line=raw.line_of(loc),
            )
            for loc, message, hint in errors
        ]
        raise ConfigValidationError(problems, source=source)
    return config


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


def context_from_files(
    ca: Path,
    crt: Path,
    key: Path,
    *,
    endpoints: Sequence[str] = (),
    nodes: Sequence[str] = (),
) -> Context:
    """A context from PEM files: the OS CA, a client certificate and its key, each
    checked (a PEM of the right kind; the key the certificate's). Raises
    ClientConfigError naming the file."""
    from ..pki import PKIError, key_matches_certificate, load_certificate, load_private_key

    texts: dict[str, str] = {}
    for flag, path in (("--ca", ca), ("--crt", crt), ("--key", key)):
        try:
            texts[flag] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ClientConfigError(
                f"{flag} {path}: cannot be read: {reason}", hint="name a PEM file"
            ) from None
    checks = (("--ca", ca, load_certificate), ("--crt", crt, load_certificate))
    try:
        for flag, path, load in checks:
            current = (flag, path)
            load(texts[flag])
        current = ("--key", key)
        load_private_key(texts["--key"])
    except PKIError as exc:
        raise ClientConfigError(
            f"{current[0]} {current[1]}: {exc}", hint="name a PEM file of the right kind"
        ) from None
    if not key_matches_certificate(texts["--crt"], texts["--key"]):
        raise ClientConfigError(
            f"--key {key} is not the key of the certificate --crt {crt}",
            hint="pass the key that was issued with that certificate",
        )
    if not endpoints:
        raise ClientConfigError(
            "a context needs at least one endpoint", hint="pass --endpoints ADDRESS[,ADDRESS]"
        )
    return Context(
        ca=texts["--ca"],
        crt=texts["--crt"],
        key=texts["--key"],
        endpoints=list(endpoints),
        nodes=list(nodes),
    )


def issue_client_context(
    os_ca: CertificateAndKey,
    *,
    endpoints: Sequence[str],
    nodes: Sequence[str] = (),
    roles: Sequence[Role] = (Role.ADMIN,),
    common_name: str = "basaltctl",
    validity: dt.timedelta | None = None,
) -> Context:
    """A context with a new client certificate, signed by the OS CA, carrying ``roles``."""
    from ..pki import LEAF_VALIDITY, issue_certificate

    issued = issue_certificate(
        os_ca,
        common_name,
        organizations=[r.value for r in roles],
        client=True,
        validity=validity or LEAF_VALIDITY,
    )
    assert issued.key is not None
    return Context(
        endpoints=list(endpoints), nodes=list(nodes), ca=os_ca.crt, crt=issued.crt, key=issued.key
    )
