"""``basaltctl fleet user password`` and ``basaltctl fleet password`` against a real fleet.

The fleet runs as its own process on 127.0.0.185; basaltctl runs as a subprocess, typed
at through a pseudo-terminal when it asks (so the test sees what a terminal would show)
or given files and stdin as a script would. Whether a password took is checked the way a
browser does: the web UI's login form.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.fleet import FleetProcess

pytestmark = pytest.mark.integration

HOST = "127.0.0.185"
SECRET = "correct horse battery staple"
_PROMPT = re.compile(rb"[Pp]assword[^:\n]*: ")


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str
    #: What a terminal would have shown of the typed input (typed runs only).
    echoed: str = ""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    root = tmp_path_factory.mktemp("fleet-passwords")
    process = FleetProcess(root / "fleet", HOST, 18785, root / "fleet.log")
    process.start()
    try:
        process.login()
        yield process
    finally:
        process.stop()


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "basalt.cli.main", *args]


def _env(fleet: FleetProcess, config: Path | None) -> dict[str, str]:
    return {**os.environ, "BASALTCONFIG": str(config or fleet.client_config)}


def scripted(fleet: FleetProcess, *args: str, stdin: str = "", config: Path | None = None) -> Ran:
    """basaltctl with ``stdin`` as its standard input and no terminal to ask on."""
    done = subprocess.run(
        _command(*args), input=stdin, capture_output=True, text=True, timeout=120,
        env=_env(fleet, config), start_new_session=True, check=False,
    )  # fmt: skip
    return Ran(done.returncode, done.stdout, done.stderr)


def typed(fleet: FleetProcess, *args: str, answers: list[str], config: Path | None = None) -> Ran:
    """basaltctl on a pseudo-terminal: each answer is typed after the next prompt shows."""
    master, terminal = os.openpty()
    process = subprocess.Popen(
        _command(*args), stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_env(fleet, config), start_new_session=True,
    )  # fmt: skip
    os.close(terminal)
    assert process.stderr is not None and process.stdout is not None
    err, echoed = b"", b""
    deadline = time.monotonic() + 120
    pending = list(answers)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr, master], [], [], 0.2)
        if process.stderr in ready:
            chunk = os.read(process.stderr.fileno(), 4096)
            err += chunk
            if not chunk:
                break
        if master in ready:
            with contextlib.suppress(OSError):  # the terminal's other side closed
                echoed += os.read(master, 4096)
        if pending and len(_PROMPT.findall(err)) > len(answers) - len(pending):
            os.write(master, pending.pop(0).encode() + b"\n")
    out = process.stdout.read()
    code = process.wait(30)
    os.close(master)
    return Ran(code, out.decode(), err.decode(), echoed.decode(errors="replace"))


def web_login(fleet: FleetProcess, name: str, password: str) -> int:
    """The web UI's login form: 303 with a session cookie, or the refusal's status."""
    context = ssl.create_default_context(cafile=str(fleet.data_dir / "ca.crt"))
    context.check_hostname = False

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=context))
    form = urllib.parse.urlencode({"name": name, "password": password}).encode()
    try:
        with opener.open(f"{fleet.url}/ui/login", data=form, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        if exc.code == 303:
            assert "basalt_session=" in exc.headers.get("set-cookie", "")
        return exc.code


def new_user(fleet: FleetProcess, name: str, tmp_path: Path) -> Path:
    """A fleet:reader ``name``, logged in with its own client config (returned)."""
    token = fleet.ctl("fleet", "user", "create", name, "--role", "fleet:reader").stdout.strip()
    config = tmp_path / f"{name}.basaltconfig"
    ca = str(fleet.data_dir / "ca.crt")
    login = scripted(fleet, "fleet", "login", fleet.url, "--token", token, "--ca", ca,
                     config=config)  # fmt: skip
    assert login.code == 0, login.stderr
    return config


def error_line(ran: Ran) -> str:
    """The one line a refusal prints (a hint may follow it)."""
    assert ran.code == 1, (ran.stdout, ran.stderr)
    lines = [line for line in ran.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, ran.stderr
    return lines[0]


def test_an_admin_sets_a_password_at_the_prompt_unechoed(
    fleet: FleetProcess, tmp_path: Path
) -> None:
    new_user(fleet, "dana", tmp_path)
    assert web_login(fleet, "dana", SECRET) == 401
    mismatch = typed(fleet, "fleet", "user", "password", "dana", answers=[SECRET, SECRET + "x"])
    assert "the two entries differ; nothing changed" in error_line(mismatch)
    assert web_login(fleet, "dana", SECRET) == 401
    done = typed(fleet, "fleet", "user", "password", "dana", answers=[SECRET, SECRET])
    assert done.code == 0, done.stderr
    assert "New password for dana: " in done.stderr and "(again): " in done.stderr
    assert "password of dana set" in done.stderr
    assert SECRET not in done.echoed + done.stderr + done.stdout
    assert web_login(fleet, "dana", SECRET) == 303


def test_bad_input_is_named_and_changes_nothing(fleet: FleetProcess, tmp_path: Path) -> None:
    new_user(fleet, "erin", tmp_path)
    good = tmp_path / "good"
    good.write_text(SECRET + "\n")
    assert (
        scripted(fleet, "fleet", "user", "password", "erin", "--password-file", str(good)).code == 0
    )
    before = fleet.get("/v1/audit?limit=10000")
    short = scripted(fleet, "fleet", "user", "password", "erin", "--password-file", "-",
                     stdin="short\n")  # fmt: skip
    assert "password: a password has at least 12 characters" in error_line(short)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    refused = scripted(fleet, "fleet", "user", "password", "erin", "--password-file", str(empty))
    assert f"password file {empty}: empty; nothing changed" in error_line(refused)
    assert "--remove" in refused.stderr
    two = tmp_path / "two"
    two.write_text(f"{SECRET}\nmore\n")
    refused = scripted(fleet, "fleet", "user", "password", "erin", "--password-file", str(two))
    assert "one line expected" in error_line(refused)
    both = scripted(fleet, "fleet", "user", "password", "erin", "--remove",
                    "--password-file", str(good))  # fmt: skip
    assert "--remove and --password-file" in error_line(both)
    unknown = scripted(fleet, "fleet", "user", "password", "nobody", "--password-file", str(good))
    assert "user 'nobody' does not exist" in error_line(unknown)
    assert fleet.get("/v1/audit?limit=10000") == before
    assert web_login(fleet, "erin", SECRET) == 303
    removed = scripted(fleet, "fleet", "user", "password", "erin", "--remove")
    assert removed.code == 0 and "password of erin removed" in removed.stderr
    assert web_login(fleet, "erin", SECRET) == 401


def test_a_user_sets_their_own_password_after_the_current_one(
    fleet: FleetProcess, tmp_path: Path
) -> None:
    config = new_user(fleet, "frank", tmp_path)
    # No password yet: nothing asked but the new one.
    first = typed(fleet, "fleet", "password", answers=[SECRET, SECRET], config=config)
    assert first.code == 0, first.stderr
    assert "Current password" not in first.stderr
    assert web_login(fleet, "frank", SECRET) == 303
    new = "a different passphrase"
    wrong = typed(fleet, "fleet", "password", answers=["not it at all", new, new], config=config)
    assert "current: the current password is wrong" in error_line(wrong)
    assert web_login(fleet, "frank", SECRET) == 303
    changed = typed(fleet, "fleet", "password", answers=[SECRET, new, new], config=config)
    assert changed.code == 0, changed.stderr
    assert "Current password: " in changed.stderr
    assert SECRET not in changed.echoed and new not in changed.echoed
    assert web_login(fleet, "frank", SECRET) == 401
    assert web_login(fleet, "frank", new) == 303
    # A script: the current one from a file, the new one from stdin.
    current = tmp_path / "current"
    current.write_text(new + "\n")
    by_script = scripted(fleet, "fleet", "password", "--current-file", str(current),
                         "--password-file", "-", stdin=SECRET + "\n", config=config)  # fmt: skip
    assert by_script.code == 0, by_script.stderr
    assert web_login(fleet, "frank", SECRET) == 303
    stdin_twice = scripted(fleet, "fleet", "password", "--current-file", "-",
                           "--password-file", "-", config=config)  # fmt: skip
    assert "cannot both be -" in error_line(stdin_twice)
