"""The exceptions that Basalt's library raises.

Every error says what was wrong, where, and what to do. Callers catch
:class:`BasaltError`; the CLI prints ``str(error)`` and exits 1.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

Severity = Literal["error", "warning"]


class ErrorKind(enum.Enum):
    """What kind of refusal an error is, whoever reports it: the API turns a kind into a
    gRPC status code (basalt.machined.api.errors), a web form into an HTTP status."""

    INVALID_ARGUMENT = "invalid-argument"  # the request itself is wrong
    FAILED_PRECONDITION = "failed-precondition"  # the request is fine; the state refuses it
    NOT_FOUND = "not-found"
    ALREADY_EXISTS = "already-exists"
    PERMISSION_DENIED = "permission-denied"
    UNAVAILABLE = "unavailable"  # try again later
    RESOURCE_EXHAUSTED = "resource-exhausted"
    ABORTED = "aborted"  # interrupted half-way; nothing was left half-done


#: The HTTP status of each kind of refusal (the fleet's REST API, the image factory).
HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.FAILED_PRECONDITION: 409,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.ALREADY_EXISTS: 409,
    ErrorKind.PERMISSION_DENIED: 403,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.ABORTED: 409,
}


class BasaltError(Exception):
    """The base of every error Basalt raises on purpose.

    ``hint`` says what the user can do about it; it is printed on its own line. ``kind``
    is the class's kind of refusal; a subclass that is not a state problem sets its own.
    """

    kind: ClassVar[ErrorKind] = ErrorKind.FAILED_PRECONDITION

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def render(self) -> str:
        """The error as the CLI prints it: the message, then the hint if any."""
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message

    def one_line(self) -> str:
        """The error as one log line: an expected refusal is logged so, never as a trace."""
        return " ".join(line.strip() for line in self.render().splitlines() if line.strip())


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth a warning) in a config, with where it is.

    ``document`` is the document's display name (``ClusterConfig`` or
    ``LinkConfig(eth0)``); ``path`` is the field path inside it
    (``network.podSubnets[1]``), empty for the document as a whole.
    """

    document: str
    path: str
    message: str
    hint: str | None = None
    severity: Severity = "error"
    source: str | None = None
    line: int | None = None

    @property
    def where(self) -> str:
        """``ClusterConfig.network.podSubnets[1]`` (the document plus field path)."""
        return field_where(self.document, self.path)

    def render(self) -> str:
        location = self.source or ""
        if self.line is not None:
            location = f"{location}:{self.line}" if location else f"line {self.line}"
        prefix = f"{location}: " if location else ""
        text = f"{prefix}{self.severity}: {self.where}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


def field_where(document: str, path: str) -> str:
    """``document`` and the field ``path`` inside it as one name: ``LinkConfig(eth0).mtu``,
    ``ClusterConfig.network.podSubnets[1]``; the document alone when ``path`` is empty."""
    if not path:
        return document
    sep = "" if path.startswith("[") else "."
    return f"{document}{sep}{path}"


_PLAIN_KEY = re.compile(r"^[A-Za-z_$][A-Za-z0-9_]*$")


def format_path(loc: Sequence[str | int]) -> str:
    """Turn ``("network", "podSubnets", 1)`` into ``network.podSubnets[1]``.

    Keys that are not plain names (sysctl names, file paths) are quoted:
    ``sysctls["net.ipv4.ip_forward"]``.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.match(str(part)):
            out += f"[{json.dumps(str(part))}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class ConfigError(BasaltError):
    """A machine config, secrets bundle or patch could not be used."""

    kind = ErrorKind.INVALID_ARGUMENT


class ConfigSyntaxError(ConfigError):
    """A YAML or JSON text could not be parsed; names the source, line and column."""

    def __init__(
        self,
        reason: str,
        *,
        source: str | None,
        line: int | None = None,
        column: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = source or "<input>"
        if line is not None:
            where += f":{line}"
            if column is not None:
                where += f":{column}"
        super().__init__(f"{where}: {reason}", hint=hint)
        self.source = source
        self.line = line
        self.column = column


class ConfigValidationError(ConfigError):
    """A config has one or more errors; ``problems`` lists every one of them."""

    def __init__(self, problems: Iterable[Problem], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        count = len(self.errors)
        noun = "error" if count == 1 else "errors"
        super().__init__(
            f"{source or 'config'}: {count} {noun} found",
            hint="fix every listed field; nothing was written or changed",
        )

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def render(self) -> str:
        lines = [self.message]
        lines.extend(p.render() for p in self.problems)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()

    @classmethod
    def raise_if_errors(cls, problems: Iterable[Problem], *, source: str | None) -> None:
        listed = list(problems)
        if any(p.severity == "error" for p in listed):
            raise cls(listed, source=source)


class PatchError(ConfigError):
    """A config patch could not be read or applied; names the patch and the place in it."""


class ContractError(ConfigError):
    """A version contract is malformed, unknown, or newer than this tool."""


class SecretsError(ConfigError):
    """A secrets bundle could not be read, or is of an unsupported version."""


class ClientConfigError(BasaltError):
    """The client config (basaltconfig) is missing, malformed, or lacks a context."""


class OutputExistsError(BasaltError):
    """A command would overwrite a file that exists; pass --force to allow it."""

    kind = ErrorKind.ALREADY_EXISTS

    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path} already exists; refusing to overwrite it",
            hint="pass --force to overwrite, or choose another output path",
        )
        self.path = path


class InvalidRequestError(BasaltError):
    """The request itself is malformed (a bad argument)."""

    kind = ErrorKind.INVALID_ARGUMENT


class NotFoundError(BasaltError):
    """The thing the request names does not exist here."""

    kind = ErrorKind.NOT_FOUND


class AccessDeniedError(BasaltError):
    """The caller's roles do not allow this (e.g. a sensitive resource)."""

    kind = ErrorKind.PERMISSION_DENIED


class UnavailableError(BasaltError):
    """This cannot be served now (e.g. the kernel log is not readable); try again later."""

    kind = ErrorKind.UNAVAILABLE


class AlreadyExistsError(BasaltError):
    """The request would create something that exists already."""

    kind = ErrorKind.ALREADY_EXISTS
