"""The maintenance API's certificate, made by a helper process forked as PID 1 starts.

A first boot is waited on until its maintenance API answers, and that API's self-signed
certificate is the one thing before it that needs ``cryptography``: under emulation,
importing it and making the key take about a second of the boot's one busy CPU. So
machined as PID 1 forks this helper right after its first log line, before it imports
anything else (no thread exists yet, so the fork is safe), and the helper does that work
on another CPU while PID 1 imports the rest: it imports cryptography, makes the key, and
waits for the address to name in the certificate.

- Told the address (:func:`name`, as soon as PID 1 has built its node), it signs;
  asked (:meth:`CertificateHelper.certificate`, when the maintenance API starts), it
  answers the certificate and key as PEM, then exits. Asked for another address than it
  was told, it is discarded and the API makes its own certificate.
- Never asked (the node has a config, so its API is mTLS): :meth:`discard` closes the
  pipe and the helper exits at once; it also gives up by itself after
  :data:`IDLE_TIMEOUT`.
- Failed (fork refused, an import error, a timeout): the caller makes the certificate in
  process, as without the helper.

One helper per process (:func:`start`, :func:`take`): it serves the first maintenance
API of this boot only. Its output goes nowhere (``-X importtime`` lines would otherwise
mix into PID 1's); errors come back through the answer pipe.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import TYPE_CHECKING

from ..sys.pipes import HelperAnswerError, fork_helper, read_all, read_answer

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from basalt.machinery.pki import CertificateAndKey

log = logging.getLogger(__name__)

#: How long the helper waits to be asked before it exits by itself.
IDLE_TIMEOUT = 300.0
#: How long the maintenance API waits for the helper's answer.
ANSWER_TIMEOUT = 60.0


def generate_maintenance_key() -> ec.EllipticCurvePrivateKey:
    from basalt.machinery.pki import generate_private_key

    return generate_private_key()


def self_signed_maintenance_certificate(
    address: str, key: ec.EllipticCurvePrivateKey | None = None
) -> CertificateAndKey:
    """A throw-away certificate for maintenance mode; clients take it on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from basalt.machinery.client.client import MAINTENANCE_SERVER_NAME
    from basalt.machinery.pki import CertificateAndKey, private_key_pem, san_entries, self_signed

    key = key or generate_maintenance_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MAINTENANCE_SERVER_NAME)])
    sans = san_entries([MAINTENANCE_SERVER_NAME, address])
    cert = (
        self_signed(key, name, dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAndKey(
        cert.public_bytes(serialization.Encoding.PEM).decode(), private_key_pem(key)
    )


class CertificateHelper:
    """The parent's end: the helper's pid and the two pipes to it."""

    def __init__(self, pid: int, requests: int, answers: int) -> None:
        self.pid = pid
        self._requests: int | None = requests
        self._answers: int | None = answers
        #: The address the helper was told (:meth:`name`), None before.
        self.named: str | None = None

    @classmethod
    def fork(cls) -> CertificateHelper | None:
        """Start the helper; None when the system refuses (the caller goes without)."""
        try:
            request_read, request_write = os.pipe()
        except OSError as exc:
            log.warning("no certificate helper: %s", exc)
            return None
        started = fork_helper(
            lambda: _serve(request_read), "certificate helper", child_closes=(request_write,)
        )
        os.close(request_read)
        if started is None:
            os.close(request_write)
            return None
        pid, answers = started
        return cls(pid, request_write, answers)

    def name(self, address: str) -> None:
        """Tell the helper the address now, so that the certificate is signed before it
        is asked for (:meth:`certificate` for the same address only reads it)."""
        if self._requests is None or self.named is not None:
            return
        try:
            os.write(self._requests, address.encode() + b"\n")
        except OSError:
            return  # the helper is gone: certificate() says so
        finally:
            os.close(self._requests)
            self._requests = None
        self.named = address

    def certificate(self, address: str, timeout: float = ANSWER_TIMEOUT) -> tuple[str, str]:
        """The certificate and key (PEM) for ``address``; raises HelperError if the
        helper cannot answer, or was told another address (it is discarded either way).
        Blocks: call it in a thread."""
        self.name(address)
        if self.named != address or self._answers is None:
            self.discard()
            raise HelperError(
                "the certificate helper was used already"
                if self.named is None
                else f"the certificate helper signs for {self.named}, not {address}"
            )
        answers, self._answers = self._answers, None
        try:
            reply = read_answer(answers, timeout, "certificate helper")
        except HelperAnswerError as exc:
            raise HelperError(str(exc)) from None
        finally:
            self.discard()
        return str(reply["crt"]), str(reply["key"])

    def discard(self) -> None:
        """Close the pipes: a helper not asked yet exits."""
        for name in ("_requests", "_answers"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)


class HelperError(Exception):
    """The helper could not make the certificate."""


def _serve(requests: int) -> dict[str, object] | None:
    """The helper's work: prepare the key, wait for the address, answer (an error is
    reported to the parent, which makes its own certificate)."""
    key = generate_maintenance_key()  # imports cryptography (basalt.machinery.pki)
    # The certificate's name comes with grpc: imported before waiting, not after.
    import basalt.machinery.client.client  # noqa: F401

    line = _read_line(requests, IDLE_TIMEOUT)
    if not line:
        return None  # not asked: the node has a config, or PID 1 went on without us
    pair = self_signed_maintenance_certificate(line, key)
    assert pair.key is not None
    return {"crt": pair.crt, "key": pair.key}


def _read_line(fd: int, timeout: float) -> str:
    try:
        return read_all(fd, timeout).decode().strip()
    except OSError:
        return ""


#: This process's helper, while nobody took it.
_held: list[CertificateHelper] = []


def start() -> None:
    """Fork this process's helper (machined as PID 1, before its imports)."""
    if not _held and (helper := CertificateHelper.fork()) is not None:
        _held.append(helper)


def name(address: str) -> None:
    """Tell this process's helper (if any, not taken yet) the address to sign for now:
    PID 1 knows it once its node is built, well before its maintenance API starts."""
    if _held:
        _held[0].name(address)


def take() -> CertificateHelper | None:
    """The helper, once: the first maintenance API of the boot asks it."""
    return _held.pop() if _held else None


def discard() -> None:
    """The node has a config: its helper is not needed."""
    helper = take()
    if helper is not None:
        helper.discard()
