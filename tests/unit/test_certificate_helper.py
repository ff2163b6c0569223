"""The maintenance certificate's helper process (machined.api.certificate_helper): forked
before PID 1's imports, asked once for the certificate, gone when not needed. Each case
runs in a fresh interpreter, as PID 1 forks it: before any thread exists."""

from __future__ import annotations

import json
import subprocess
import sys

from basalt.machinery.pki import load_certificate

PRELUDE = """
import json, os, sys, time
from basalt.machined.api import certificate_helper as ch
"""


def run(script: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + script],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return answer


def test_the_helper_answers_the_certificate_for_the_address_then_exits() -> None:
    answer = run(
        """
ch.start()
early = [m for m in sys.modules if m.startswith(("cryptography", "grpc"))]
helper = ch.take()
assert ch.take() is None  # once
crt, key = helper.certificate("127.0.0.9")
_, status = os.waitpid(helper.pid, 0)
print(json.dumps({"early": early, "crt": crt, "key": key, "exit": os.waitstatus_to_exitcode(status),
                  "parent_imported": "cryptography" in sys.modules}))
"""
    )
    assert answer["early"] == []  # PID 1 did not import them to start the helper
    assert answer["parent_imported"] is False
    assert answer["exit"] == 0
    assert "PRIVATE KEY" in str(answer["key"])
    cert = load_certificate(str(answer["crt"]))
    from cryptography import x509

    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "basalt-maintenance" in sans.get_values_for_type(x509.DNSName)
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.9"]


def test_a_helper_not_needed_exits_when_discarded() -> None:
    answer = run(
        """
ch.start()
pid = ch._held[0].pid
ch.discard()
assert ch.take() is None
started = time.monotonic()
_, status = os.waitpid(pid, 0)
seconds = time.monotonic() - started
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "seconds": seconds}))
"""
    )
    assert answer["exit"] == 0
    assert float(str(answer["seconds"])) < 30


def test_a_failing_helper_is_reported_and_the_api_makes_its_own() -> None:
    answer = run(
        """
import asyncio
def broken():
    raise RuntimeError("no entropy")
working, ch.generate_maintenance_key = ch.generate_maintenance_key, broken  # forked with it
ch.start()
helper = ch.take()
try:
    helper.certificate("127.0.0.9")
    error = ""
except ch.HelperError as exc:
    error = str(exc)
os.waitpid(helper.pid, 0)
ch.generate_maintenance_key = working
# The API's path: no helper left, so it makes the certificate in process.
ch.start()
ch._held[0].discard()
from basalt.machined.api.tls import prepared_maintenance_credentials
ch._held.clear()
credentials = asyncio.run(prepared_maintenance_credentials("127.0.0.9"))
print(json.dumps({"error": error, "credentials": type(credentials).__name__}))
"""
    )
    assert answer["error"] == "the certificate helper failed: RuntimeError: no entropy"
    assert answer["credentials"] == "ServerCredentials"


def test_a_helper_that_does_not_answer_in_time_is_given_up() -> None:
    answer = run(
        """
def slow(requests):
    time.sleep(30)
ch._serve = slow
ch.start()
helper = ch.take()
try:
    helper.certificate("127.0.0.9", timeout=0.5)
    error = ""
except ch.HelperError as exc:
    error = str(exc)
os.kill(helper.pid, 9)
os.waitpid(helper.pid, 0)
print(json.dumps({"error": error}))
"""
    )
    assert answer["error"] == "the certificate helper did not answer: no answer within 0.5 s"


def test_a_helper_told_the_address_early_signs_before_it_is_asked() -> None:
    """PID 1 names the address once its node is built; the maintenance API then only reads
    the answer. Asked for another address, the helper is given up (the API makes its own)."""
    answer = run(
        """
ch.start()
ch.name("127.0.0.9")
helper = ch.take()
assert helper.named == "127.0.0.9"
_, status = os.waitpid(helper.pid, 0)  # it signed and answered without being asked
crt, key = helper.certificate("127.0.0.9")
ch.start()
ch.name("127.0.0.9")
other = ch.take()
try:
    other.certificate("127.0.0.10")
    error = ""
except ch.HelperError as exc:
    error = str(exc)
os.waitpid(other.pid, 0)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "crt": crt, "error": error}))
"""
    )
    assert answer["exit"] == 0 and "CERTIFICATE" in str(answer["crt"])
    assert answer["error"] == "the certificate helper signs for 127.0.0.9, not 127.0.0.10"
