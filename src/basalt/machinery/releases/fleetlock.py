"""A FleetLock client: take a reboot slot before an upgrade, give it back after.

The protocol: ``POST {url}/v1/pre-reboot`` and ``POST {url}/v1/steady-state``, header
``fleet-lock-protocol: true``, body ``{"client_params": {"id": ID, "group": GROUP}}``;
200 means done, anything else carries ``{"kind": ..., "value": reason}``. Both calls are
idempotent on the server, so a node that restarted simply asks again. Blocking.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..errors import BasaltError, ErrorKind

TIMEOUT = 20.0


class CoordinatorError(BasaltError):
    """The reboot coordinator could not be asked, or answered with an error."""

    kind = ErrorKind.UNAVAILABLE


class SlotRefusedError(CoordinatorError):
    """The coordinator is reachable and says no (every slot held, quorum first)."""

    kind = ErrorKind.FAILED_PRECONDITION


@dataclass(frozen=True)
class Coordinator:
    url: str
    group: str = "default"
    token: str = ""
    ca: str = ""

    def _post(self, path: str, client_id: str) -> dict[str, object]:
        body = json.dumps({"client_params": {"id": client_id, "group": self.group}}).encode()
        headers = {"fleet-lock-protocol": "true", "Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.url.rstrip("/") + path, data=body, headers=headers, method="POST"
        )
        context = None
        if self.url.startswith("https:"):
            context = ssl.create_default_context(cadata=self.ca or None)
            if self.ca:
                # A private CA (a fleet's own) names the service, not the address used.
                context.check_hostname = False
        where = f"reboot coordinator {self.url.rstrip('/')}{path}"
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as answer:
                return dict(json.loads(answer.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            try:
                reason = str(json.loads(exc.read()).get("value", exc.reason))
            except ValueError:
                reason = str(exc.reason)
            if exc.code in (401, 403):
                raise CoordinatorError(
                    f"{where}: {exc.code} {reason}",
                    hint="check UpdateConfig.rebootCoordinator.token (a fleet wants the role "
                    "fleet:reboot)",
                ) from None
            error = SlotRefusedError if exc.code in (409, 423, 429, 503) else CoordinatorError
            raise error(f"{where}: {exc.code} {reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise CoordinatorError(f"{where}: cannot ask: {cause}") from None

    def take(self, client_id: str) -> None:
        """Hold a slot (SlotRefusedError: not now; try again later)."""
        self._post("/v1/pre-reboot", client_id)

    def give_back(self, client_id: str) -> None:
        self._post("/v1/steady-state", client_id)
