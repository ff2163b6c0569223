"""``basaltctl image build --factory URL``: have an image factory build the image.

The schematic is posted (its field errors come back by line and are printed as a local
build prints them), the build is started and followed (a progress bar on stderr: the
queue, then the stage being built), and each artefact is downloaded into ``--out`` and
checked against the sha256 the factory sends (``X-Content-Sha256``, the ETag). A file
already there with that sha256 is not downloaded again (``If-None-Match``).

Who may ask: a factory mounted in a fleet (``https://FLEET/factory``) is reached with the
token and CA of ``basaltctl fleet login``; a standalone one with the token in
``BASALT_FACTORY_TOKEN`` when it has one. Plain ``urllib``: nothing else is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from basalt.machinery.errors import BasaltError

from ._common import info, read_text

TOKEN_ENV = "BASALT_FACTORY_TOKEN"
DEFAULT_OUT = Path("_out/image")
#: Seconds between two looks at the build when the factory names none.
POLL = 1.0
#: A build that shows no progress for this long is given up on (the factory goes on).
STALLED = 3600.0
CHUNK = 1 << 20


class FactoryClientError(BasaltError):
    """The factory refused, failed a build, or could not be reached."""


@dataclass(frozen=True)
class Factory:
    """How to reach one factory: its base URL, a token and TLS trust (or none)."""

    base: str
    token: str | None = None
    ca: str | None = None

    def url(self, target: str) -> str:
        """``target`` as a URL: one already (a link the factory answered, made absolute by
        :meth:`link`), or a path below the base (``/schematics``)."""
        if target.startswith(("http://", "https://")):
            return target
        return self.base + target

    def link(self, path: str) -> str:
        """A link the factory answered (from its server's root: ``/factory/image/...``)."""
        return urljoin(self.base + "/", path)

    def open(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> Any:
        """The response (a file-like object with ``status`` and ``headers``); an HTTP
        error is returned too (callers read its status), a network error raises."""
        sent = dict(headers or {})
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url(path), data=body, headers=sent, method=method)
        try:
            return urllib.request.urlopen(request, timeout=timeout, context=self._context())
        except urllib.error.HTTPError as exc:
            return exc
        except (urllib.error.URLError, OSError) as exc:
            raise FactoryClientError(
                f"cannot reach the factory at {self.base}: {getattr(exc, 'reason', exc)}",
                hint="is basalt-factory (or basalt-fleet) running, and is --factory its URL?",
            ) from None

    def _context(self) -> Any:
        if not self.base.startswith("https://"):
            return None
        import ssl

        if self.ca is None:
            return ssl.create_default_context()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # the fleet's own CA is the only trust root
        context.load_verify_locations(cadata=self.ca)
        return context

    def json(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Any:
        with self.open(method, path, body, headers) as answer:
            raw = answer.read()
            status = answer.status
        data = (
            json.loads(raw) if raw[:1] in (b"{", b"[") else {"detail": raw.decode(errors="replace")}
        )
        if status >= 400:
            raise _refusal(status, data)
        return data


def _refusal(status: int, data: Any) -> FactoryClientError:
    detail = data.get("detail", f"HTTP {status}") if isinstance(data, dict) else str(data)
    hint = data.get("hint") if isinstance(data, dict) else None
    if status == 401:
        hint = hint or f"set {TOKEN_ENV}, or 'basaltctl fleet login' for a fleet's factory"
    return FactoryClientError(f"factory: {detail}", hint=hint)


def connect(url: str) -> Factory:
    """The factory at ``url``, with the fleet login's token and CA when ``url`` is below
    the fleet's, else ``$BASALT_FACTORY_TOKEN`` (if set)."""
    if not url.startswith(("http://", "https://")):
        raise FactoryClientError(
            f"--factory {url!r}: expected http://HOST:PORT or https://FLEET:PORT/factory"
        )
    login = _fleet_login()
    if login is not None and url.rstrip("/").startswith(login.url.rstrip("/") + "/"):
        return Factory(url.rstrip("/"), login.token, login.ca)
    return Factory(url.rstrip("/"), os.environ.get(TOKEN_ENV) or None)


def _fleet_login() -> Any:
    import click

    from ._common import GlobalOptions

    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    opts = root.obj if root is not None and isinstance(root.obj, GlobalOptions) else GlobalOptions()
    try:
        return opts.load_client_config(missing_ok=True).fleet
    except BasaltError:
        return None


def post_schematic(factory: Factory, text: str, source: str) -> dict[str, Any]:
    """Post the schematic; its id and links. Field errors are raised by line."""
    with factory.open(
        "POST", "/schematics", text.encode(), {"Content-Type": "application/yaml"}
    ) as answer:
        raw, status = answer.read(), answer.status
    data = json.loads(raw) if raw[:1] == b"{" else {"detail": raw.decode(errors="replace")}
    if status == 422 and isinstance(data.get("problems"), list):
        lines = [f"{source}: the factory refused the schematic"]
        for problem in data["problems"]:
            where = f"{source}:{problem['line']}" if problem.get("line") else source
            field = f" {problem['path']}:" if problem.get("path") else ""
            lines.append(f"{where}:{field} {problem['message']}")
            if problem.get("hint"):
                lines.append(f"    hint: {problem['hint']}")
        raise FactoryClientError("\n".join(lines), hint="fix every listed field; nothing was built")
    if status >= 400:
        raise _refusal(status, data)
    result: dict[str, Any] = data
    return result


def follow(factory: Factory, build_path: str, stream: Any = None) -> dict[str, Any]:
    """Start the build (unless it is built) and wait for it, showing its progress."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    status: dict[str, Any] = factory.json("POST", build_path)
    console = Console(file=stream or sys.stderr)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    last_change, last_seen = time.monotonic(), ""
    with bar:
        task = bar.add_task("asking", total=None)
        while status["state"] not in ("done", "failed"):
            described = _describe(status)
            if described != last_seen:
                last_change, last_seen = time.monotonic(), described
                if not console.is_terminal:
                    info(f"factory: {described}")
            total = status.get("stagesTotal") or None
            bar.update(
                task, description=described, total=total, completed=status.get("stagesDone", 0)
            )
            if time.monotonic() - last_change > STALLED:
                raise FactoryClientError(
                    f"the build shows no progress for {STALLED:.0f} s ({described})",
                    hint=f"look at the factory's log; its status is at {factory.url(build_path)}",
                )
            time.sleep(POLL)
            status = factory.json("GET", build_path)
    if status["state"] == "failed":
        raise FactoryClientError(
            f"the factory's build failed:\n{status.get('error') or '(no error text)'}",
            hint=f"fix the cause, then run this again (it starts a new build: POST {build_path})",
        )
    return status


def _describe(status: dict[str, Any]) -> str:
    if status["state"] == "queued":
        return f"queued (#{status.get('position') or '?'})"
    if status["state"] == "building":
        if status.get("stage"):
            return f"building {status['stage']}"
        total = status.get("stagesTotal") or 0
        return (
            "finishing (bundle, checksums)"
            if total and status.get("stagesDone") == total
            else "starting"
        )
    return str(status["state"])


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(factory: Factory, link: str, target: Path) -> tuple[str, bool]:
    """Fetch ``link`` into ``target`` (through a temporary file, renamed: a file that
    the stage cache hard-links is never written into); (sha256, whether downloaded)."""
    have = _sha256(target)
    headers = {"If-None-Match": f'"{have}"'} if have else {}
    with factory.open("GET", link, headers=headers, timeout=600) as answer:
        if answer.status == 304 and have:
            return have, False
        if answer.status == 202:
            raise FactoryClientError(
                f"{target.name}: the factory is building the image again",
                hint="run this again when its build is done",
            )
        if answer.status >= 400:
            raw = answer.read()
            raise _refusal(answer.status, json.loads(raw) if raw[:1] == b"{" else {})
        wanted = (answer.headers.get("X-Content-Sha256") or "").lower()
        tag = (answer.headers.get("ETag") or "").strip('"').lower()
        if not wanted or (tag and tag != wanted):
            raise FactoryClientError(
                f"{target.name}: the factory sent no sha256 to check it against",
                hint="is --factory the URL of a Basalt image factory?",
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as sink:
                while block := answer.read(CHUNK):
                    digest.update(block)
                    sink.write(block)
            if digest.hexdigest() != wanted:
                raise FactoryClientError(
                    f"{target.name}: downloaded sha256 {digest.hexdigest()}, the factory "
                    f"says {wanted}: the download was damaged",
                    hint="run this again",
                )
            os.chmod(temp, 0o644)
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    return wanted, True


def upload_extensions(factory: Factory, schematic: Path, text: str) -> None:
    """Upload the custom extensions ``schematic`` gives by path (relative to its
    directory) to the factory's registry, after checking each against its pin. The
    factory verifies the signature; one it already has answers 200."""
    from basalt.machinery.schematic import parse_schematic

    parsed = parse_schematic(text, str(schematic))
    for ref in parsed.custom_extensions:
        if not ref.path:
            continue  # the factory's registry must have it already
        path = Path(ref.path)
        path = path if path.is_absolute() else schematic.resolve().parent / path
        digest = _sha256(path)
        if digest is None:
            raise FactoryClientError(
                f"{schematic}: custom extension {ref.path} cannot be read",
                hint="paths are relative to the schematic's directory",
            )
        if digest != ref.sha256:
            raise FactoryClientError(
                f"{schematic}: {path} has sha256 {digest}, the schematic pins {ref.sha256}",
                hint="pin the sha256 that 'basaltctl extension build' printed for the file",
            )
        described = factory.json(
            "POST",
            "/extensions",
            path.read_bytes(),
            **{"Content-Type": "application/octet-stream"},
        )
        info(f"extension {described.get('name')} {described.get('version')}: on the factory")


def build_with_factory(
    url: str, schematic: Path | None, out: Path | None, local: dict[str, Any] | None = None
) -> None:
    """``basaltctl image build --factory URL [--schematic FILE] [--out DIR]``."""
    given = [name for name, value in (local or {}).items() if value]
    if given:
        raise FactoryClientError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for a local build; with "
            "--factory the factory uses its own",
            hint="drop them, or build locally without --factory",
        )
    factory = connect(url)
    text = read_text(schematic, "schematic") if schematic else ""
    if schematic is not None:
        upload_extensions(factory, schematic, text)
    posted = post_schematic(factory, text, str(schematic) if schematic else "(no schematic)")
    target = out or DEFAULT_OUT
    info(f"schematic {posted['id']} on {url}: Basalt {posted['version']}")
    follow(factory, factory.link(posted["build"]))
    rows = []
    for name, link in posted["artefacts"].items():
        digest, fetched = download(factory, factory.link(link), target / name)
        size = (target / name).stat().st_size
        rows.append((target / name, size, digest, fetched))
    for path, size, digest, fetched in rows:
        note = "" if fetched else " (already there)"
        print(f"{path!s:<40} {size / 2**20:>9.1f} MiB  sha256 {digest}{note}")
    info(f"image of schematic {posted['id']} in {target}")


__all__ = ["Factory", "FactoryClientError", "build_with_factory", "connect", "download", "follow"]
