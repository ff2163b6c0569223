"""``basaltctl fleet``: talk to a Basalt Fleet's REST API.

``fleet login`` checks the fleet's CA (a file, or its fingerprint) and an API token, and
stores them in the client config; every other verb uses them. Plain ``urllib`` with the
fleet's CA as the only trust root: no HTTP library is loaded at start-up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ._api import table
from ._common import info, options, read_text

app = typer.Typer(
    help="Basalt Fleet: log in, join tokens, machines, users, the audit log.",
    no_args_is_help=True,
)
token_app = typer.Typer(help="Join tokens: what machines enrol with.", no_args_is_help=True)
user_app = typer.Typer(
    help="Fleet users, their API tokens and web UI passwords (fleet:admin).", no_args_is_help=True
)
app.add_typer(token_app, name="token")
app.add_typer(user_app, name="user")


class FleetAPIError(Exception):
    pass


def _error(message: str, hint: str | None = None) -> Exception:
    from basalt.machinery.errors import BasaltError

    return BasaltError(message, hint=hint)


def _pairs(items: list[str] | None, where: str) -> dict[str, str]:
    """``key=value`` arguments as a mapping; the first malformed one is named."""
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise _error(f"{where} {item!r}: expected key=value")
        pairs[key] = value
    return pairs


def parse_duration(text: str, where: str = "--ttl") -> float | None:
    """``90s``, ``30m``, ``1h``, ``7d``; ``never`` -> None."""
    from basalt.machinery.durations import parse_duration as seconds_of

    if text == "never":
        return None
    seconds = seconds_of(text)
    if seconds is None:
        raise _error(f"{where} {text!r}: expected a number with s, m, h or d (or 'never')")
    return seconds


def _context(ca: str) -> Any:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The fleet's own CA is the only trust root; its certificate may not name the
    # address an operator reaches it by (a tunnel, a load balancer).
    context.check_hostname = False
    context.load_verify_locations(cadata=ca)
    return context


def request(
    url: str,
    token: str,
    ca: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> Any:
    """One call; a refusal raises with the fleet's detail and hint."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60, context=_context(ca)) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read())
        except ValueError:
            payload = {}
        detail = payload.get("detail", exc.reason)
        if isinstance(detail, list):  # request validation: name each field
            detail = "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail
            )
        raise _error(f"fleet: {detail}", payload.get("hint")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _error(
            f"cannot reach the fleet at {url}: {reason}",
            "is basalt-fleet running, and the URL of 'basaltctl fleet login' right?",
        ) from None
    if not raw:
        return None
    if raw[:1] in (b"{", b"["):
        return json.loads(raw)
    return raw.decode()


def _call(ctx: typer.Context, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    config = options(ctx).load_client_config(missing_ok=True)
    if config.fleet is None:
        raise _error(
            "not logged in to a fleet",
            "run 'basaltctl fleet login https://HOST:PORT --token TOKEN --ca CA.crt'",
        )
    fleet = config.fleet
    return request(fleet.url, fleet.token, fleet.ca, method, path, body)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    print()


@app.command()
def login(
    ctx: typer.Context,
    url: Annotated[str, typer.Argument(help="The fleet's REST API: https://HOST:PORT")],
    token: Annotated[str | None, typer.Option(help="An API token.")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="A file holding the API token (e.g. admin-token).")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="The fleet's CA certificate (ca.crt).")] = None,
    ca_fingerprint: Annotated[
        str | None, typer.Option(help="sha256:HEX of the fleet's CA, instead of --ca.")
    ] = None,
) -> None:
    """Check the fleet's CA and the token, and store both in the client config."""

    from basalt.machinery.client.config import FleetLogin, save_client_config

    if (token is None) == (token_file is None):
        raise _error("give the API token with exactly one of --token and --token-file")
    secret = token if token is not None else read_text(token_file, "token file").strip()  # type: ignore[arg-type]
    if not url.startswith("https://"):
        raise _error(f"URL {url!r}: the fleet is reached over https://")
    if ca is not None:
        ca_pem = read_text(ca, "CA file")
    elif ca_fingerprint is not None:
        from urllib.parse import urlsplit

        from basalt.machinery.fleetlink.enrol import fetch_pinned_ca
        from basalt.machinery.fleetlink.url import FleetURL

        parts = urlsplit(url)
        pin = ca_fingerprint.removeprefix("sha256:").lower()
        # The same first contact a machine makes: the CA is taken only if its hash is pinned.
        ca_pem = fetch_pinned_ca(FleetURL(parts.hostname or "", parts.port or 443, "", pin))
    else:
        raise _error("give the fleet's CA with --ca FILE or --ca-fingerprint sha256:HEX")
    me = request(url, secret, ca_pem, "GET", "/v1/whoami")
    state = options(ctx)
    config = state.load_client_config(missing_ok=True)
    config.fleet = FleetLogin(url=url.rstrip("/"), token=secret, ca=ca_pem)
    save_client_config(config, state.client_config_path)
    info(f"logged in to {url} as {me['name']} ({me['role']}); stored in {state.client_config_path}")


@app.command()
def whoami(ctx: typer.Context) -> None:
    """The user and role of the stored token."""
    me = _call(ctx, "GET", "/v1/whoami")
    print(f"{me['name']}\t{me['role']}")


# -- web UI passwords ----------------------------------------------------------------------
PasswordFile = Annotated[
    Path | None,
    typer.Option(help="Read the new password from this file's first line ('-': stdin)."),
]
Remove = Annotated[
    bool, typer.Option("--remove", help="Remove the password: log in with an API token only.")
]


def _secret_line(path: Path, what: str) -> str:
    """A password from a file: one line, its line ending not part of it."""
    lines = read_text(path, what).splitlines()
    if len(lines) > 1:
        raise _error(f"{what} {path}: one line expected, found {len(lines)}")
    return lines[0] if lines else ""


def _new_password(password_file: Path | None, remove: bool, whose: str = "") -> str:
    """The new password: '' with --remove, else from the file or typed twice unechoed.
    Nothing is sent when it is empty or the two differ."""
    if remove:
        if password_file is not None:
            raise _error("--remove and --password-file: give one of them")
        return ""
    if password_file is not None:
        password = _secret_line(password_file, "password file")
        where = f"password file {password_file}"
    else:
        import getpass

        prompt = f"New password{' for ' + whose if whose else ''}"
        password = getpass.getpass(f"{prompt}: ")
        if password and getpass.getpass(f"{prompt} (again): ") != password:
            raise _error("password: the two entries differ; nothing changed")
        where = "password"
    if not password:
        raise _error(f"{where}: empty; nothing changed", "--remove removes a password")
    return password


def _password_done(answer: dict[str, str]) -> None:
    if answer["password"] == "set":
        info(f"password of {answer['name']} set; their web UI sessions ended")
    else:
        info(f"password of {answer['name']} removed: they log in with an API token")


@app.command()
def password(
    ctx: typer.Context,
    password_file: PasswordFile = None,
    current_file: Annotated[
        Path | None,
        typer.Option(help="Read your current password from this file ('-': stdin)."),
    ] = None,
    remove: Remove = False,
) -> None:
    """Set your own web UI password (asked twice, not echoed); the current one first."""
    if str(password_file) == str(current_file) == "-":
        raise _error("--password-file and --current-file cannot both be - (stdin)")
    current = ""
    if current_file is not None:
        current = _secret_line(current_file, "current password file")
    elif _call(ctx, "GET", "/v1/whoami").get("password"):
        import getpass

        current = getpass.getpass("Current password: ")
    new = _new_password(password_file, remove)
    body = {"password": new, "current": current}
    _password_done(_call(ctx, "PUT", "/v1/whoami/password", body))


# -- join tokens ---------------------------------------------------------------------------
@token_app.command("create")
def token_create(
    ctx: typer.Context,
    ttl: Annotated[str, typer.Option(help="How long it is valid: 30m, 1h, 7d, or never.")] = "1h",
    uses: Annotated[int, typer.Option(help="How many machines may enrol with it.")] = 1,
    label: Annotated[
        list[str] | None, typer.Option(help="key=value put on each machine that enrols.")
    ] = None,
) -> None:
    """Make a join token; prints the URL machines enrol with (basalt.fleet=URL)."""
    body = {"ttl": parse_duration(ttl), "uses": uses, "labels": _pairs(label, "--label")}
    made = _call(ctx, "POST", "/v1/join-tokens", body)
    info(f"join token {made['id']}: {uses} use(s), expires {made['expires'] or 'never'}")
    print(made["url"])


@token_app.command("list")
def token_list(ctx: typer.Context) -> None:
    """Join tokens with their uses and expiry (never the secret)."""
    rows = _call(ctx, "GET", "/v1/join-tokens")
    table(
        ["ID", "USED", "USES", "EXPIRES", "REVOKED", "LABELS"],
        (
            [
                r["id"],
                r["used"],
                r["uses"],
                r["expires"] or "never",
                "yes" if r["revoked"] else "",
                ",".join(f"{k}={v}" for k, v in r["labels"].items()),
            ]
            for r in rows
        ),
    )


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, token_id: str) -> None:
    """Refuse further enrolments with a join token."""
    _call(ctx, "DELETE", f"/v1/join-tokens/{token_id}")
    info(f"join token {token_id} revoked")


# -- machines ----------------------------------------------------------------------------
@app.command()
def machines(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="free, allocated or removed")] = None,
    label: Annotated[str | None, typer.Option(help="k=v[,k=v]: only machines with these")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json")] = "table",
) -> None:
    """The fleet's machines: state, cluster, link, labels."""
    query = []
    if state:
        query.append(f"state={state}")
    if label:
        query.append(f"label={label}")
    rows = _call(ctx, "GET", "/v1/machines" + ("?" + "&".join(query) if query else ""))
    if output == "json":
        _print_json(rows)
        return
    table(
        ["UUID", "HOSTNAME", "STATE", "CLUSTER", "LINK", "STAGE", "VERSION", "LABELS"],
        (
            [
                r["uuid"],
                r["hostname"],
                r["state"],
                r["cluster"] or "",
                "up" if r["connected"] else "down",
                r["inventory"].get("stage", ""),
                r["inventory"].get("version", ""),
                ",".join(f"{k}={v}" for k, v in r["labels"].items()),
            ]
            for r in rows
        ),
    )


@app.command()
def machine(ctx: typer.Context, uuid: str) -> None:
    """One machine, with its inventory (JSON)."""
    _print_json(_call(ctx, "GET", f"/v1/machines/{uuid}"))


@app.command()
def label(
    ctx: typer.Context,
    uuid: str,
    labels: Annotated[list[str] | None, typer.Argument(help="key=value to set")] = None,
    remove: Annotated[list[str] | None, typer.Option(help="a label key to remove")] = None,
) -> None:
    """Set or remove a machine's labels."""
    body = {"set": _pairs(labels, "label"), "remove": list(remove or [])}
    done = _call(ctx, "PATCH", f"/v1/machines/{uuid}/labels", body)
    print(",".join(f"{k}={v}" for k, v in done["labels"].items()))


@app.command()
def remove(ctx: typer.Context, uuid: str) -> None:
    """Remove a machine: its link is cut and it cannot reconnect (fleet:admin)."""
    _call(ctx, "DELETE", f"/v1/machines/{uuid}")
    info(f"machine {uuid} removed")


@app.command()
def readmit(ctx: typer.Context, uuid: str) -> None:
    """Let a removed machine enrol again (with a new join token use)."""
    _call(ctx, "POST", f"/v1/machines/{uuid}/readmit")
    info(f"machine {uuid} may enrol again")


@app.command()
def version(ctx: typer.Context, uuid: str) -> None:
    """Ask a machine's own API for its version, through its link."""
    answer = _call(ctx, "GET", f"/v1/machines/{uuid}/version")
    for message in answer.get("messages", []):
        print(f"{message.get('hostname', '')}\t{message.get('tag', '')}\t{message.get('mode', '')}")


# -- the audit log -------------------------------------------------------------------------
@app.command()
def audit(
    ctx: typer.Context,
    verify: Annotated[bool, typer.Option(help="Check the hash chain; exit 1 if broken.")] = False,
    after: Annotated[int, typer.Option(help="Entries after this id.")] = 0,
    limit: Annotated[int, typer.Option(help="At most this many entries.")] = 200,
) -> None:
    """The fleet's audit log: who changed or read what, hash-chained."""
    if verify:
        result = _call(ctx, "GET", "/v1/audit/verify")
        if result["intact"]:
            print(f"audit log intact: {result['entries']} entries, chain verified")
            return
        for item in result["breaks"]:
            print(f"entry {item['entry']}: {item['reason']}")
        raise typer.Exit(1)
    rows = _call(ctx, "GET", f"/v1/audit?after={after}&limit={limit}")
    table(
        ["ID", "AT", "ACTOR", "ACTION", "TARGET"],
        ([r["id"], r["at"][:19], r["actor"], r["action"], r["target"]] for r in rows),
    )


# -- users ---------------------------------------------------------------------------------
@user_app.command("list")
def user_list(ctx: typer.Context) -> None:
    """Users and roles."""
    rows = _call(ctx, "GET", "/v1/users")
    table(
        ["NAME", "ROLE", "CLUSTERS", "LABELS"],
        (
            [
                r["name"],
                r["role"],
                ",".join(r["scope"].get("clusters", [])),
                ",".join(f"{k}={v}" for k, v in r["scope"].get("labels", {}).items()),
            ]
            for r in rows
        ),
    )


@user_app.command("create")
def user_create(
    ctx: typer.Context,
    name: str,
    role: Annotated[
        str, typer.Option(help="fleet:admin, fleet:operator, fleet:reader or fleet:reboot")
    ],
    cluster: Annotated[list[str] | None, typer.Option(help="limit to this cluster")] = None,
) -> None:
    """Make a user; prints their first API token (shown once)."""
    made = _call(
        ctx,
        "POST",
        "/v1/users",
        {"name": name, "role": role, "clusters": list(cluster or [])},
    )
    info(f"user {made['name']} ({made['role']}) created; their API token (shown once):")
    print(made["token"])


@user_app.command("token")
def user_token(
    ctx: typer.Context,
    name: str,
    description: Annotated[str, typer.Option(help="what the token is for")] = "",
) -> None:
    """A new API token for a user (shown once)."""
    made = _call(ctx, "POST", f"/v1/users/{name}/tokens", {"description": description})
    print(made["token"])


@user_app.command("password")
def user_password(
    ctx: typer.Context, name: str, password_file: PasswordFile = None, remove: Remove = False
) -> None:
    """Set a user's web UI password (asked twice, not echoed); their sessions end."""
    new = _new_password(password_file, remove, name)
    _password_done(_call(ctx, "PUT", f"/v1/users/{name}/password", {"password": new}))


# -- clusters ------------------------------------------------------------------------------
def _print_plan(plan: dict[str, Any]) -> None:
    verb = "create" if plan["create"] else "update"
    print(f"cluster {plan['cluster']}: {verb} (endpoint {plan['endpoint']})")
    for node in plan["nodes"]:
        name = node["hostname"] or node["uuid"]
        role = node["role"] + (f"/{node['set']}" if node["set"] else "")
        line = f"  {node['action']:<8} {name:<24} {role:<22} mode {node['mode']}"
        print(line)
        for change in node["changes"]:
            print(f"             ~ {change}")
    if not plan["changes"]:
        print("  nothing to change")


def _wait_cluster(ctx: typer.Context, name: str, timeout: float, gone_ok: bool = False) -> None:
    import time

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            status = _call(ctx, "GET", f"/v1/clusters/{name}")
        except Exception as exc:
            if gone_ok and "does not exist" in str(exc):
                info(f"cluster {name}: deleted; its machines are free")
                return
            raise
        line = f"{status['status']}: {status['message']}" if status["message"] else status["status"]
        if line != last:
            info(f"cluster {name}: {line}")
            last = line
        if status["status"] == "ready":
            return
        if status["status"] == "failed":
            raise _error(
                f"cluster {name} failed: {status['message']}",
                "fix the cause and apply the template again; finished steps are kept",
            )
        time.sleep(1.0)
    raise _error(f"cluster {name} is still {last} after {timeout:.0f}s", "check 'fleet status'")


@app.command()
def apply(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("-f", "--file", help="The Cluster template (YAML).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Wait until the cluster is ready.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 600.0,
) -> None:
    """Plan a cluster template and carry it out: allocate machines, apply configs,
    bootstrap etcd, scale, wait for health."""
    text = read_text(file, "cluster template")
    body = {"template": text, "source": str(file)}
    plan = _call(ctx, "POST", "/v1/clusters" + ("?dry_run=true" if dry_run else ""), body)
    _print_plan(plan)
    if dry_run or not wait:
        return
    _wait_cluster(ctx, plan["cluster"], timeout)


@app.command()
def clusters(ctx: typer.Context) -> None:
    """The fleet's clusters."""
    rows = _call(ctx, "GET", "/v1/clusters")
    table(
        ["NAME", "STATUS", "CONTROLPLANES", "WORKERS", "DRIFTED", "ENDPOINT"],
        (
            [r["name"], r["status"], r["controlplanes"], r["workers"], r["drifted"], r["endpoint"]]
            for r in rows
        ),
    )


@app.command()
def status(ctx: typer.Context, name: str) -> None:
    """A cluster's status and its nodes."""
    row = _call(ctx, "GET", f"/v1/clusters/{name}")
    message = f" ({row['message']})" if row["message"] else ""
    print(
        f"cluster {row['name']}: {row['status']}{message}, generation {row['generation']}, "
        f"{row['drifted']} drifted at the last check"
    )
    table(
        ["HOSTNAME", "ROLE", "STATE", "ADDRESS", "STAGE", "LINK", "UUID"],
        (
            [
                n["hostname"],
                n["role"] + (f"/{n['set']}" if n["set"] else ""),
                n["state"],
                n["address"],
                n["stage"],
                "up" if n["linked"] else "down",
                n["uuid"],
            ]
            for n in row["nodes"]
        ),
    )


@app.command()
def delete(
    ctx: typer.Context,
    name: str,
    wait: Annotated[bool, typer.Option(help="Wait until its machines are free.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 600.0,
) -> None:
    """Delete a cluster: its machines are reset back to maintenance and freed."""
    _call(ctx, "DELETE", f"/v1/clusters/{name}")
    info(f"cluster {name}: deleting")
    if wait:
        _wait_cluster(ctx, name, timeout, gone_ok=True)


@app.command()
def diff(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="A cluster (default: every one).")] = None,
) -> None:
    """Where nodes run something else than the fleet intends, per node and field.
    Exits 2 when anything drifted (for CI)."""
    names = [name] if name else [r["name"] for r in _call(ctx, "GET", "/v1/clusters")]
    drifted = 0
    for cluster in names:
        result = _call(ctx, "GET", f"/v1/clusters/{cluster}/diff")
        for node in result["nodes"]:
            label = f"{cluster}/{node['hostname'] or node['uuid']}"
            if node.get("error"):
                print(f"{label}: cannot read its config: {node['error']}")
                drifted += 1
                continue
            for change in node["changes"]:
                print(f"{label}: {change}")
            drifted += bool(node["changes"])
    if drifted:
        info(f"{drifted} node(s) drifted from the fleet's intent")
        raise typer.Exit(2)
    info("no drift: every node runs what the fleet intends")


@app.command()
def export(
    ctx: typer.Context,
    name: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write.")],
    force: Annotated[bool, typer.Option(help="Write into an existing directory.")] = False,
) -> None:
    """Write the cluster's secrets, patches, contract, a basaltconfig and the script that
    regenerates each node's config with 'basaltctl gen config'."""
    import os

    from basalt.machinery.fileio import write_atomic

    if output.exists() and any(output.iterdir()) and not force:
        raise _error(f"{output} exists and is not empty", "pick a new directory or add --force")
    result = _call(ctx, "GET", f"/v1/clusters/{name}/export")
    for relative, content in sorted(result["files"].items()):
        target = output / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o755 if relative.endswith(".sh") else 0o600
        write_atomic(target, content, mode=mode)
    os.chmod(output, 0o700)
    info(
        f"cluster {name} exported to {output} ({len(result['files'])} files); "
        f"'sh {output}/regenerate.sh' rebuilds each node's config"
    )


@app.command()
def kubeconfig(
    ctx: typer.Context,
    name: str,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File (default: stdout).")
    ] = None,
) -> None:
    """The cluster's admin kubeconfig (from a control plane, through its link)."""
    from basalt.machinery.fileio import write_atomic

    text = _call(ctx, "GET", f"/v1/clusters/{name}/kubeconfig")["kubeconfig"]
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomic(output, text, mode=0o600)


@app.command()
def basaltconfig(
    ctx: typer.Context,
    name: str,
    roles: Annotated[str, typer.Option(help="Comma-separated node API roles.")] = "os:admin",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File (default: stdout).")
    ] = None,
) -> None:
    """A basaltconfig for the cluster with a new client certificate of these roles."""
    from basalt.machinery.fileio import write_atomic

    wanted = [r.strip() for r in roles.split(",") if r.strip()]
    text = _call(ctx, "POST", f"/v1/clusters/{name}/basaltconfig", {"roles": wanted})[
        "basaltconfig"
    ]
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomic(output, text, mode=0o600)


# -- etcd backups --------------------------------------------------------------------------
@app.command()
def backup(ctx: typer.Context, name: str) -> None:
    """Take an etcd snapshot of the cluster now (through a control plane's link)."""
    item = _call(ctx, "POST", f"/v1/clusters/{name}/backups")
    print(f"{item['id']}\t{item['size']} bytes\tfrom {item['node']}\tsha256 {item['sha256']}")


@app.command()
def backups(ctx: typer.Context, name: str) -> None:
    """The cluster's etcd snapshots, oldest first."""
    rows = _call(ctx, "GET", f"/v1/clusters/{name}/backups")
    table(
        ["ID", "TAKEN", "SIZE", "NODE", "SHA256"],
        ([r["id"], r["taken"][:19], r["size"], r["node"], r["sha256"][:16]] for r in rows),
    )


@app.command()
def restore(
    ctx: typer.Context,
    name: str,
    snapshot: Annotated[str, typer.Option("--snapshot", help="The snapshot id to restore.")],
    wait: Annotated[bool, typer.Option(help="Wait until the cluster is ready again.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 600.0,
) -> None:
    """Recover the cluster's etcd from a snapshot: control planes are reset with their
    etcd data wiped (configs stay), the first bootstraps from the snapshot, the others
    join it. Everything written after the snapshot is gone."""
    _call(ctx, "POST", f"/v1/clusters/{name}/restore", {"snapshot": snapshot})
    info(f"cluster {name}: restoring etcd from {snapshot}")
    if wait:
        _wait_cluster(ctx, name, timeout)


# -- reboot coordination (FleetLock) -------------------------------------------------------
@app.command("reboot-groups")
def reboot_groups(ctx: typer.Context) -> None:
    """FleetLock groups: their slots and who holds them."""
    rows = _call(ctx, "GET", "/v1/reboot-groups")
    table(
        ["GROUP", "SLOTS", "HOLDERS"],
        ([r["group"], r["slots"], ",".join(r["holders"])] for r in rows),
    )


@app.command("reboot-group")
def reboot_group(
    ctx: typer.Context,
    group: str,
    slots: Annotated[int, typer.Option("--slots", help="How many may reboot at once.")],
) -> None:
    """Set how many machines of a FleetLock group may reboot at once (control planes of
    a fleet cluster always go one at a time)."""
    _call(ctx, "PUT", f"/v1/reboot-groups/{group}", {"slots": slots})
    info(f"group {group}: {slots} reboot slot(s)")


# -- releases and rollouts -----------------------------------------------------------------
rollout_app = typer.Typer(
    help="Rollouts: a release taken to a channel's clusters in waves that open on health.",
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def _rollout_rows(rows: list[dict[str, Any]]) -> None:
    table(
        ["ID", "VERSION", "CHANNEL", "STATE", "WAVE", "PROGRESS", "FAILED", "CLUSTERS"],
        (
            [
                r["id"],
                r["version"],
                r["channel"],
                r["state"],
                f"{r['wave']}/{r['waves'] - 1}",
                _bar(r["healthy"], r["machines"]),
                r["failed"],
                ",".join(r["clusters"]),
            ]
            for r in rows
        ),
    )


@app.command("releases")
def releases(ctx: typer.Context) -> None:
    """The releases of the repository the fleet serves, by channel."""
    rows = _call(ctx, "GET", "/v1/releases")
    table(
        ["CHANNEL", "VERSION", "ARCH", "YANKED", "VIA"],
        ([r["channel"], r["version"], r["arch"], r["yanked"], r["via"] or "-"] for r in rows),
    )


@app.command("promote")
def promote(
    ctx: typer.Context,
    version: str,
    source: Annotated[str, typer.Option("--from", help="The channel it runs in.")] = "beta",
    destination: Annotated[str, typer.Option("--to", help="The channel to add it to.")] = (
        "stable"
    ),
    force: Annotated[
        bool, typer.Option(help="Skip the promotion rule (fleet:admin; audited).")
    ] = False,
) -> None:
    """Promote a release once the fleet saw it run healthy on enough machines for long
    enough with no fallback (the fleet's promotion rule)."""
    done = _call(
        ctx,
        "POST",
        "/v1/releases/promote",
        {"version": version, "from": source, "to": destination, "force": force},
    )
    seen = done["evidence"]
    note = " (forced: the rule did not hold)" if done["forced"] else ""
    info(
        f"{version} promoted from {source} to {destination}{note}: ran healthy on "
        f"{seen['machines']} machine(s) for {seen['seconds'] / 3600:.1f} h, "
        f"{seen['fallbacks']} fallback(s)"
    )


@rollout_app.command("list")
def rollout_list(ctx: typer.Context) -> None:
    """Rollouts, newest first, with their progress."""
    _rollout_rows(_call(ctx, "GET", "/v1/rollouts"))


def _show(ctx: typer.Context, rollout_id: int) -> dict[str, Any]:
    found: dict[str, Any] = _call(ctx, "GET", f"/v1/rollouts/{rollout_id}")
    _rollout_rows([found])
    if found["reason"]:
        print(f"reason: {found['reason']}")
    print()
    table(
        ["WAVE", "MACHINE", "CLUSTER", "ROLE", "STATE", "FROM", "TARGET", "MESSAGE"],
        (
            [m["wave"], m["uuid"], m["cluster"], m["role"], m["state"], m["from"] or "-",
             m["target"] or "-", m["message"]]
            for m in found["machineStates"]
        ),
    )  # fmt: skip
    return found


@rollout_app.command("show")
def rollout_show(
    ctx: typer.Context,
    rollout_id: int,
    watch: Annotated[
        bool, typer.Option("-w", "--watch", help="Redraw every 2 s until it stops.")
    ] = False,
) -> None:
    """One rollout: waves, each machine's state, the reason it stopped."""
    import time

    while True:
        if watch and sys.stdout.isatty():
            print("\033[H\033[2J", end="")
        found = _show(ctx, rollout_id)
        if not watch or found["state"] not in ("running", "paused"):
            return
        time.sleep(2)
        print()


def _window(text: str) -> dict[str, str]:
    cron, sep, rest = text.partition("|")
    duration, _, zone = rest.partition("|")
    if not sep or not duration:
        raise _error(f"--window {text!r}: expected 'CRON|DURATION[|TIME ZONE]'",
                     hint="e.g. --window '0 2 * * sat|4h|Europe/Berlin'")  # fmt: skip
    return {"cron": cron.strip(), "duration": duration.strip(), "timezone": zone.strip() or "UTC"}


@rollout_app.command("start")
def rollout_start(
    ctx: typer.Context,
    version: str,
    channel: Annotated[str, typer.Option(help="The channel it is taken from.")] = "stable",
    cluster: Annotated[
        list[str] | None, typer.Option(help="Only these clusters (default: those following it).")
    ] = None,
    canary_count: Annotated[int, typer.Option(help="Canary: this many machines.")] = 1,
    canary_machine: Annotated[
        list[str] | None, typer.Option(help="Canary: these machines (UUIDs).")
    ] = None,
    canary_label: Annotated[
        list[str] | None, typer.Option(help="Canary: machines with this label (k=v).")
    ] = None,
    waves: Annotated[str, typer.Option(help="Cumulative percentages after the canary.")] = (
        "25,50,100"
    ),
    soak: Annotated[
        str, typer.Option(help="How long a machine runs healthy before its wave is done.")
    ] = "5m",
    max_failures: Annotated[int, typer.Option(help="Error budget: failures allowed.")] = 0,
    max_failure_fraction: Annotated[
        float | None, typer.Option(help="Error budget as a fraction of machines started.")
    ] = None,
    timeout: Annotated[str, typer.Option(help="A machine not back healthy by then failed.")] = (
        "15m"
    ),
    window: Annotated[
        list[str] | None, typer.Option(help="'CRON|DURATION[|TZ]': starts only inside one.")
    ] = None,
    webhook: Annotated[str, typer.Option(help="POSTed to when it halts or finishes.")] = "",
) -> None:
    """Take VERSION to the channel's clusters in waves."""
    try:
        percentages = [int(p) for p in waves.split(",") if p.strip()]
    except ValueError:
        raise _error(f"--waves {waves!r}: comma-separated percentages, e.g. 10,50,100") from None
    policy: dict[str, Any] = {
        "canary": {
            "count": canary_count,
            "machines": list(canary_machine or []),
            "labels": _pairs(canary_label, "--canary-label"),
        },
        "waves": percentages,
        "soak": soak,
        "maxFailures": max_failures,
        "timeout": timeout,
        "windows": [_window(w) for w in window or []],
        "webhook": webhook,
    }
    if max_failure_fraction is not None:
        policy["maxFailureFraction"] = max_failure_fraction
    made = _call(
        ctx,
        "POST",
        "/v1/rollouts",
        {"version": version, "channel": channel, "clusters": list(cluster or []), "policy": policy},
    )
    info(
        f"rollout {made['id']}: {version} from {channel} to {', '.join(made['clusters'])} "
        f"({made['machines']} machines, {made['waves'] - 1} wave(s) after the canary)"
    )
    print(made["id"])


def _rollout_action(ctx: typer.Context, rollout_id: int, action: str) -> None:
    done = _call(ctx, "POST", f"/v1/rollouts/{rollout_id}/{action}")
    info(f"rollout {rollout_id}: {done['state']}")


@rollout_app.command("pause")
def rollout_pause(
    ctx: typer.Context,
    rollout_id: Annotated[int | None, typer.Argument(help="Omit with --all.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Pause every rollout.")] = False,
) -> None:
    """No new machine starts (one already upgrading finishes)."""
    if every:
        _call(ctx, "PUT", "/v1/rollout-pause", {"paused": True})
        info("every rollout paused: no machine starts an upgrade until resume --all")
        return
    if rollout_id is None:
        raise _error("name a rollout, or pass --all")
    _rollout_action(ctx, rollout_id, "pause")


@rollout_app.command("resume")
def rollout_resume(
    ctx: typer.Context,
    rollout_id: Annotated[int | None, typer.Argument(help="Omit with --all.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Lift the global pause.")] = False,
) -> None:
    """Let a paused rollout (or, with --all, every rollout) start machines again."""
    if every:
        _call(ctx, "PUT", "/v1/rollout-pause", {"paused": False})
        info("rollouts may start machines again")
        return
    if rollout_id is None:
        raise _error("name a rollout, or pass --all")
    _rollout_action(ctx, rollout_id, "resume")


@rollout_app.command("abort")
def rollout_abort(ctx: typer.Context, rollout_id: int) -> None:
    """Stop a rollout for good: machines not started are skipped (none is rolled back)."""
    _rollout_action(ctx, rollout_id, "abort")
