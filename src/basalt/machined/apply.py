"""apply-config: decide how a new config takes effect, then make it so.

Modes: ``auto`` picks ``no-reboot`` when every change applies live and ``reboot``
otherwise, and says why; ``no-reboot`` refuses changes that need a reboot, listing
them; ``staged`` stores the config for the next boot; ``try`` runs it without
committing and reverts when its timeout passes unless a later apply confirms it.
``dry_run`` reports the diff and the mode and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from basalt.machinery.api.machine_pb2 import ApplyMode
from basalt.machinery.config import ConfigBundle, check_bundle, load_bundle
from basalt.machinery.config.diff import Change, config_changes, unified_diff
from basalt.machinery.config.identity import check_identity
from basalt.machinery.config.validate import Mode
from basalt.machinery.errors import BasaltError, ErrorKind

from .install import install_first_config, install_target

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

MODE_NAMES = {
    ApplyMode.AUTO: "auto",
    ApplyMode.NO_REBOOT: "no-reboot",
    ApplyMode.REBOOT: "reboot",
    ApplyMode.STAGED: "staged",
    ApplyMode.TRY: "try",
}
DEFAULT_TRY_TIMEOUT = 60.0
MAX_CONFIG_BYTES = 1024 * 1024


class RebootRequiredError(BasaltError):
    """The change needs a reboot but the chosen mode applies changes live only."""


class InvalidApplyError(BasaltError):
    """The request cannot be applied as asked (not a config problem)."""

    kind = ErrorKind.INVALID_ARGUMENT


@dataclass
class ApplyRequest:
    data: bytes
    mode: ApplyMode.ValueType
    dry_run: bool
    try_timeout: float
    source: str = "apply-config request"
    #: An admin asked to replace the node's identity (--allow-identity-change).
    allow_identity_change: bool = False


@dataclass
class ApplyResult:
    mode: ApplyMode.ValueType
    details: str
    warnings: list[str] = field(default_factory=list)
    diff: str = ""
    then_reboot: bool = False


def parse_request(node: Node, request: ApplyRequest) -> tuple[ConfigBundle, list[str]]:
    """Validate the new config for this node's platform; every error is reported."""
    if len(request.data) > MAX_CONFIG_BYTES:
        raise InvalidApplyError(
            f"config is {len(request.data)} bytes; the limit is {MAX_CONFIG_BYTES}"
        )
    try:
        text = request.data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidApplyError("config is not UTF-8 text") from None
    bundle = load_bundle(text, request.source)
    mode = Mode.METAL if node.platform.mode.requires_install else Mode.CONTAINER
    warnings = check_bundle(bundle, mode)
    return bundle, [w.render() for w in warnings]


def _listing(changes: list[Change]) -> str:
    return ", ".join(c.where for c in changes)


def decide(
    current: ConfigBundle, new: ConfigBundle, requested: ApplyMode.ValueType
) -> tuple[ApplyMode.ValueType, str, list[Change]]:
    """(mode, why, changes) for applying ``new`` over ``current``."""
    changes = config_changes(current, new)
    reboot = [c for c in changes if c.needs_reboot]
    if not changes:
        return (
            requested if requested != ApplyMode.AUTO else ApplyMode.NO_REBOOT,
            "no changes",
            changes,
        )
    if requested == ApplyMode.AUTO:
        if reboot:
            return ApplyMode.REBOOT, f"chose reboot: {_listing(reboot)} need a reboot", changes
        return (
            ApplyMode.NO_REBOOT,
            f"chose no-reboot: every change applies live ({_listing(changes)})",
            changes,
        )
    if requested in (ApplyMode.NO_REBOOT, ApplyMode.TRY) and reboot:
        raise RebootRequiredError(
            f"{MODE_NAMES[requested]} cannot apply changes that need a reboot: {_listing(reboot)}",
            hint="apply with --mode reboot or --mode staged, or leave those fields unchanged",
        )
    details = {
        ApplyMode.NO_REBOOT: f"applied live: {_listing(changes)}",
        ApplyMode.REBOOT: "committed; rebooting",
        ApplyMode.STAGED: "staged; it takes effect at the next reboot",
        ApplyMode.TRY: "running without committing",
    }[requested]
    return requested, details, changes


async def apply(node: Node, request: ApplyRequest) -> ApplyResult:
    """Apply ``request`` on a configured node (maintenance mode is handled by boot)."""
    new, warnings = parse_request(node, request)
    current = node.config
    assert current is not None
    # Before anything else, dry runs and every mode alike: a config from other secrets.
    forced = check_identity(current, new, allow=request.allow_identity_change)
    if forced is not None:
        warnings.append(forced)
        if not request.dry_run:
            node.events.publish("config", forced, actor="apply-config")
            log.warning("%s", forced)
    if request.mode == ApplyMode.STAGED and node.trial is not None:
        raise InvalidApplyError(
            "a config is under trial; confirm it or let it revert before staging another"
        )
    mode, details, changes = decide(current, new, request.mode)
    if request.dry_run:
        return ApplyResult(
            mode, f"dry run, nothing changed: {details}", warnings, unified_diff(current, new)
        )
    text = new.to_yaml()
    if mode == ApplyMode.TRY:
        if changes:
            start_trial(node, current, new, request.try_timeout or DEFAULT_TRY_TIMEOUT)
            details = (
                f"running without committing; reverts in "
                f"{request.try_timeout or DEFAULT_TRY_TIMEOUT:g}s unless confirmed "
                f"by another apply-config"
            )
        return ApplyResult(mode, details, warnings)
    if mode == ApplyMode.STAGED:
        node.configs.stage(text)
        node.use_config(current, staged=new)
        node.events.publish("config", "config staged for the next boot", actor="apply-config")
        return ApplyResult(mode, details, warnings)
    confirmed = end_trial(node)
    node.configs.commit(text)
    node.use_config(new)
    node.events.publish(
        "config",
        f"config applied ({MODE_NAMES[mode]})",
        actor="apply-config",
        changes=_listing(changes),
    )
    if confirmed and not changes:
        details = "trial config confirmed and committed"
    return ApplyResult(mode, details, warnings, then_reboot=mode == ApplyMode.REBOOT)


def start_trial(node: Node, previous: ConfigBundle, new: ConfigBundle, timeout: float) -> None:
    from .node import TrialState

    end_trial(node)
    trial = TrialState(previous=previous, deadline=time.time() + timeout)
    node.trial = trial
    node.use_config(new)
    node.events.publish("config", f"trying a config for {timeout:g}s", actor="apply-config")

    async def revert() -> None:
        await asyncio.sleep(timeout)
        if node.trial is trial:
            node.trial = None
            node.use_config(trial.previous)
            node.events.publish(
                "config", "trial timed out; reverted to the committed config", actor="apply-config"
            )
            log.warning("trial config reverted after %.0fs", timeout)

    trial.task = asyncio.create_task(revert(), name="config-trial")


def end_trial(node: Node) -> bool:
    """Stop a pending revert (the config was confirmed or replaced). True if one was pending."""
    trial = node.trial
    if trial is None:
        return False
    node.trial = None
    if trial.task is not None:
        trial.task.cancel()
    return True


async def apply_maintenance(node: Node, request: ApplyRequest) -> ApplyResult:
    """The first config: validate, commit to STATE, and let boot continue."""
    if request.mode in (ApplyMode.TRY, ApplyMode.STAGED):
        raise InvalidApplyError(
            f"--mode {MODE_NAMES[request.mode]} needs a running config to come back to; "
            "a node in maintenance mode has none",
            hint="apply with --mode auto (the default)",
        )
    new, warnings = parse_request(node, request)
    if request.dry_run:
        empty = ConfigBundle([])
        return ApplyResult(
            request.mode,
            "dry run, nothing changed: the node would install "
            "this config and leave maintenance mode",
            warnings,
            unified_diff(empty, new),
        )
    if node.config_arrived.is_set():
        raise InvalidApplyError(
            "a config was applied already; this node is leaving maintenance mode",
            hint="once it is up, change its config with apply-config over mTLS",
        )
    details = "config applied; the node leaves maintenance mode and boots with it"
    source = install_target(node) if node.platform.mode.requires_install else None
    if source is not None:
        # Validated first (nothing changes on a bad install.disk), then installed with
        # the config on STATE; the boot's install phase reboots into the installed disk.
        plan = await install_first_config(node, new, source)
        details = f"installed to {plan.target} with this config; the node reboots into it"
    node.configs.commit(new.to_yaml())
    node.use_config(new)
    node.config_arrived.set()
    node.events.publish("config", "config applied in maintenance mode", actor="apply-config")
    return ApplyResult(ApplyMode.REBOOT, details, warnings)


# -- basalt.config=URL --------------------------------------------------------------------------

#: How long to wait between attempts to fetch ``basalt.config=`` (the network may be
#: coming up, the server not there yet).
FETCH_RETRY = 3.0
FETCH_TIMEOUT = 10.0


def fetch_url(url: str, timeout: float = FETCH_TIMEOUT) -> bytes:
    """The body of ``url`` (http or https), at most MAX_CONFIG_BYTES + 1 bytes."""
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise InvalidApplyError(
            f"kernel argument basalt.config={url}: only http:// and https:// URLs are fetched"
        )
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        body: bytes = answer.read(MAX_CONFIG_BYTES + 1)
        return body


async def apply_from_url(node: Node, url: str, retry: float = FETCH_RETRY) -> None:
    """Fetch the config at ``url`` until it answers, then apply it as maintenance
    mode's apply-config would (validate, install, boot). A config that does not
    validate is reported (event, log) and not fetched again: apply one through the API."""
    attempt = 0
    while not node.config_arrived.is_set():
        attempt += 1
        try:
            data = await asyncio.to_thread(fetch_url, url)
        except BasaltError as exc:
            node.events.publish("config", str(exc), actor="boot")
            log.error("%s", exc)
            return
        except OSError as exc:
            if attempt == 1 or attempt % 20 == 0:
                log.warning("basalt.config=%s: %s; retrying every %gs", url, exc, retry)
            await asyncio.sleep(retry)
            continue
        request = ApplyRequest(data, ApplyMode.AUTO, False, 0.0, source=url)
        try:
            result = await apply_maintenance(node, request)
        except BasaltError as exc:
            message = f"config from basalt.config={url} not applied: {exc.render()}"
            node.events.publish("config", message, actor="boot")
            log.error("%s", message)
            return
        node.events.publish("config", f"config fetched from {url}: {result.details}", actor="boot")
        log.info("config fetched from %s: %s", url, result.details)
        return
