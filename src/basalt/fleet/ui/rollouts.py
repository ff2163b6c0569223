"""Rollouts (start, follow, pause, resume, abort; progress over time) and releases
(channels, what each release did on the fleet's machines, promotion)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from basalt.machinery.errors import BasaltError

from .. import rollouts as ro
from .. import service
from ..access import in_scope
from ..auth import FleetRole
from ..core import Fleet
from ..db import Rollout, RolloutMachine, aware
from .admin import ui_route
from .plots import outcome_bars, progress_over_time
from .web import (
    LIVE_INTERVAL,
    FormErrors,
    Route,
    View,
    event_stream,
    form_errors,
    fragment,
    live_parts,
    render,
    view,
)

#: Form fields and the policy fields their errors name.
POLICY_FIELDS = {
    "version": "version",
    "channel": "channel",
    "clusters": "clusters",
    "policy.canary.count": "canary",
    "policy.canary": "canary",
    "policy.waves": "waves",
    "policy.soak": "soak",
    "policy.maxFailures": "max_failures",
    "policy.max_failures": "max_failures",
    "policy.timeout": "timeout",
}


def _releases(fleet: Fleet) -> list[Any]:
    from basalt.machinery.releases.repository import Repository

    if fleet.options.releases is None:
        return []
    return list(Repository(fleet.options.releases).releases())


def rollout_data(fleet: Fleet, rollout_id: int) -> dict[str, Any]:
    with fleet.database.session() as session:
        row = ro.get(session, rollout_id)
        data = ro.detail(session, row)
        machines = ro.machines_of(session, rollout_id)
        started = [s for m in machines if (s := aware(m.started)) is not None]
        healthy = [s for m in machines if (s := aware(m.healthy)) is not None]
        paused_all = ro.all_paused(session)
    policy = row.policy
    budget = int(policy.get("maxFailures", policy.get("max_failures", 1)))
    fraction = policy.get("maxFailureFraction") or policy.get("max_failure_fraction")
    if fraction:
        budget = max(budget, int(fraction * len(machines)))
    waves: list[dict[str, Any]] = []
    for index in range(data["waves"]):
        members = [m for m in data["machineStates"] if m["wave"] == index]
        done = sum(1 for m in members if m["state"] in ("done", "soaking"))
        waves.append({"index": index, "name": "canary" if index == 0 else f"wave {index}",
                      "machines": members, "done": done,
                      "open": index <= data["wave"]})  # fmt: skip
    return {**data, "budget": budget, "used": data["failed"], "waves_detail": waves,
            "plot": progress_over_time(started, healthy, len(machines)),
            "paused_all": paused_all}  # fmt: skip


def install(app: FastAPI, fleet: Fleet, route: Route) -> None:
    def list_data() -> dict[str, Any]:
        with fleet.database.session() as session:
            rows = session.execute(select(Rollout).order_by(Rollout.id.desc()).limit(100))
            rollouts = [ro.summary(session, r) for r in rows.scalars()]
            paused = ro.all_paused(session)
        return {"rollouts": rollouts, "paused_all": paused}

    def list_page(v: View, errors: FormErrors, status: int = 200,
                  values: dict[str, str] | None = None) -> HTMLResponse:  # fmt: skip
        releases = _releases(fleet)
        name = "rollouts_body.html" if v.htmx else "rollouts.html"
        defaults = {"version": "", "channel": "stable", "clusters": "", "canary": "1",
                    "waves": "25,50,100", "soak": "5m", "max_failures": "1",
                    "timeout": "15m"}  # fmt: skip
        return render(v, name, status=status, errors=errors, releases=releases,
                      values={**defaults, **(values or {})}, **list_data())  # fmt: skip

    @ui_route(route, "GET", "/ui/rollouts", FleetRole.READER)
    def rollouts(request: Request) -> HTMLResponse:
        return list_page(view(request), FormErrors())

    @ui_route(route, "POST", "/ui/rollouts", FleetRole.OPERATOR)
    async def start(request: Request) -> Response:
        form = await request.form()
        v = view(request)
        fields = ("version", "channel", "clusters", "canary", "waves", "soak", "max_failures",
                  "timeout")  # fmt: skip
        values = {k: str(form.get(k, "")).strip() for k in fields}
        try:
            if not values["version"]:
                raise service.FleetError("version: choose the release to roll out")
            channel = values["channel"] or "stable"
            clusters = [c.strip() for c in values["clusters"].split(",") if c.strip()]
            policy: dict[str, Any] = {}
            for key, field, kind in (("canary", "count", int), ("max_failures", "maxFailures",
                                     int)):  # fmt: skip
                if values[key]:
                    try:
                        number = kind(values[key])
                    except ValueError:
                        raise service.FleetError(
                            f"{key}: {values[key]!r} is not a whole number"
                        ) from None
                    if key == "canary":
                        policy["canary"] = {"count": number}
                    else:
                        policy[field] = number
            if values["waves"]:
                try:
                    policy["waves"] = [int(w) for w in values["waves"].split(",") if w.strip()]
                except ValueError:
                    raise service.FleetError(
                        f"waves: {values['waves']!r} is not a list of percentages like 25,50,100"
                    ) from None
            for key in ("soak", "timeout"):
                if values[key]:
                    policy[key] = values[key]
            parsed = ro.parse_policy(policy)
            offered = [r for r in _releases(fleet) if r.channel == channel]
            if fleet.options.releases is None:
                raise service.FleetError(
                    "version: this fleet serves no release repository",
                    hint="start basalt-fleet with --releases DIR",
                )
            for name in clusters:
                in_scope(v.caller, name, fleet)

            def make() -> int:
                with fleet.database.session() as session:
                    made = ro.create(session, v.caller.name, values["version"], channel, offered,
                                     clusters, parsed)  # fmt: skip
                    for name in made.clusters.get("names", []):
                        in_scope(v.caller, name, fleet)
                    return made.id

            made_id = await asyncio.to_thread(make)
        except service.Refused:  # a role or scope refusal: 403, not a field error
            raise
        except BasaltError as exc:
            return list_page(v, form_errors(exc, POLICY_FIELDS), 400, values)
        return Response(status_code=204, headers={"HX-Redirect": f"/ui/rollouts/{made_id}"})

    @ui_route(route, "POST", "/ui/rollouts/pause-all", FleetRole.OPERATOR)
    async def pause_all(request: Request) -> HTMLResponse:
        form = await request.form()
        v = view(request)
        paused = str(form.get("paused", "true")) == "true"
        with fleet.database.session() as session:
            ro.pause_all(session, v.caller.name, paused)
        return list_page(v, FormErrors())

    @ui_route(route, "GET", "/ui/rollouts/{rollout_id}", FleetRole.READER)
    def rollout_page(request: Request, rollout_id: int) -> HTMLResponse:
        v = view(request)
        return render(v, "rollout.html", r=rollout_data(fleet, rollout_id))

    @ui_route(route, "GET", "/ui/rollouts/{rollout_id}/live", FleetRole.READER,
              response_class=Response)  # fmt: skip
    async def rollout_live(request: Request, rollout_id: int) -> Response:
        v = view(request)
        rollout_data(fleet, rollout_id)  # 404 first

        def look() -> dict[str, str]:
            return {"body": fragment("rollout_body.html", v=v, r=rollout_data(fleet, rollout_id))}

        return event_stream(live_parts(request, look, LIVE_INTERVAL * 3))

    @ui_route(route, "POST", "/ui/rollouts/{rollout_id}/{action}", FleetRole.OPERATOR)
    def rollout_action(request: Request, rollout_id: int, action: str) -> HTMLResponse:
        v = view(request)
        if action not in ("pause", "resume", "abort"):
            raise service.NotFound(f"no rollout action {action!r} (pause, resume, abort)")
        with fleet.database.session() as session:
            row = ro.get(session, rollout_id)
            for name in row.clusters.get("names", []):
                in_scope(v.caller, name, fleet)
            ro.set_state(session, v.caller.name, rollout_id, action)
        return render(v, "rollout_body.html", r=rollout_data(fleet, rollout_id))

    _releases_page(fleet, route)


def _outcomes(fleet: Fleet) -> list[tuple[str, int, int, int]]:
    """Per release version: machines that ended good, fell back, were rolled back."""
    from basalt.machinery.images.versions import version_key

    counts: dict[str, list[int]] = {}
    with fleet.database.session() as session:
        rows = session.execute(
            select(Rollout.version, RolloutMachine.state).join(
                RolloutMachine, RolloutMachine.rollout == Rollout.id
            )
        )
        for version, state in rows:
            slot = counts.setdefault(str(version), [0, 0, 0])
            if state in ("done", "soaking"):
                slot[0] += 1
            elif state == "failed":
                slot[1] += 1
            elif state == "rolled-back":
                slot[2] += 1
    ordered = sorted(counts, key=version_key, reverse=True)[:20]
    return [(v, *counts[v]) for v in ordered]  # type: ignore[misc]


def _releases_page(fleet: Fleet, route: Route) -> None:
    def page(v: View, errors: FormErrors, status: int = 200, note: str = "") -> HTMLResponse:
        releases = _releases(fleet)
        channels: dict[str, list[Any]] = {}
        for release in releases:
            channels.setdefault(release.channel, []).append(release)
        with fleet.database.session() as session:
            now = dt.datetime.now(dt.UTC)
            seen = {
                r.version: ro.evidence(session, r.version, now) for r in releases if not r.yanked
            }
        order = ["alpha", "beta", "stable"]
        present = {(r.version, r.channel) for r in releases}
        promotable = {
            (r.version, r.channel): order[order.index(r.channel) + 1]
            for r in releases
            if r.channel in order[:-1]
            and not r.yanked
            and (r.version, order[order.index(r.channel) + 1]) not in present
        }
        rule = (fleet.options.promote_min_machines, fleet.options.promote_min_seconds)
        short = {k: ro.shortfalls(e, *rule) for k, e in seen.items()}
        name = "releases_body.html" if v.htmx else "releases.html"
        return render(v, name, status=status, channels=channels, seen=seen, short=short,
                      bars=outcome_bars(_outcomes(fleet)), errors=errors, note=note,
                      promotable=promotable,
                      serving=fleet.options.releases is not None)  # fmt: skip

    @ui_route(route, "GET", "/ui/releases", FleetRole.READER)
    def releases(request: Request) -> HTMLResponse:
        return page(view(request), FormErrors())

    @ui_route(route, "POST", "/ui/releases/promote", FleetRole.OPERATOR)
    async def promote(request: Request) -> HTMLResponse:
        """Promote a release to the next channel when the fleet's evidence meets the
        rule (forcing stays with the CLI: an admin's deliberate act)."""
        from basalt.machinery.releases.repository import Repository

        form = await request.form()
        v = view(request)
        version = str(form.get("version", ""))
        source = str(form.get("from", ""))
        destination = str(form.get("to", ""))
        try:
            if fleet.options.releases is None:
                raise service.FleetError("this fleet serves no release repository")
            rule = (fleet.options.promote_min_machines, fleet.options.promote_min_seconds)
            with fleet.database.session() as session:  # never forced from here
                ro.promote(session, v.caller, Repository(fleet.options.releases), version,
                           source, destination, rule)  # fmt: skip
        except BasaltError as exc:
            return page(v, FormErrors({f"promote-{version}": str(exc)}), 409)
        return page(v, FormErrors(), note=f"{version} promoted from {source} to {destination}")
