"""The fleet's web UI in a real browser: Playwright driving Debian's Chromium against a
real ``basalt-fleet`` process and process nodes (real etcd).

An admin logs in with the bootstrap API token, makes a join token in the UI and boots
two machines with its URL, watches them appear on the machines page without reloading,
applies a cluster from the UI and watches its state reach ready live, opens a service's
logs, starts a rollout and pauses it. Bad input gets its error next to the field and
changes nothing. A reader (logged in with a password set in the UI) sees no buttons, and
the server refuses the reader's form post even with a valid session and CSRF token.

Screenshots of every step: ``_out/ui/*.png``. The fleet on 127.0.0.190, machines on .191
and .192. The tests run in order.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import basalt
from basalt.machinery.images import generate_signing_key, load_signing_key
from basalt.machinery.images.keys import trust_document
from basalt.machinery.releases.repository import Repository
from basalt.provision.bundle_from_tree import bundle_from_tree
from basalt.provision.process import create_machines, destroy
from tests.fakes.fleet import FleetProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

playwright_sync = pytest.importorskip("playwright.sync_api")

SRC = Path(basalt.__file__).resolve().parent
SHOTS = Path(__file__).resolve().parents[2] / "_out" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOST, PORT = "127.0.0.190", 18950
READER_PASSWORD = "a reader's long passphrase"


def in_thread(coroutine: Any) -> Any:
    """Run ``coroutine`` on its own loop in another thread (Playwright's sync API owns
    this thread's loop)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = asyncio.run(coroutine)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make install puts it there)")
    root = tmp_path_factory.mktemp("ui")
    SHOTS.mkdir(parents=True, exist_ok=True)
    private, public = generate_signing_key()
    repo = Repository.init(root / "repo")
    bundle = root / "0.2.0.tar"
    bundle_from_tree(SRC, bundle, "0.2.0", load_signing_key(private))
    repo.publish(bundle, "0.2.0", "x86_64", "stable")
    fleet = FleetProcess(
        root / "fleet", HOST, PORT, root / "fleet.log", extra=("--releases", str(repo.directory))
    )
    fleet.start()
    fleet.login()
    state: dict[str, Any] = {"fleet": fleet, "root": root, "record": None, "console": [],
                             "trust": trust_document(public, "release")}  # fmt: skip
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        state["browser"] = browser
        try:
            yield state
        finally:
            browser.close()
            fleet.stop()
            if state["record"] is not None:
                in_thread(destroy(state["record"]))


def new_page(world: dict[str, Any], **options: Any) -> Any:
    """A page in a context of its own (its own cookies); every console error it logs
    (a script error, a Content-Security-Policy violation) is kept in world["console"]."""
    context = world["browser"].new_context(
        ignore_https_errors=True, **{"viewport": {"width": 1280, "height": 900}, **options}
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on(
        "console",
        lambda message: (
            message.type == "error" and world["console"].append(f"{page.url}: {message.text}")
        ),
    )
    page.on("pageerror", lambda error: world["console"].append(str(error)))
    return page


def shot(page: Any, name: str) -> None:
    # caret="initial": hiding the caret would inject a style the page's CSP refuses.
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True, caret="initial")


def url(path: str) -> str:
    return f"https://{HOST}:{PORT}{path}"


@pytest.fixture(scope="module")
def admin(world: dict[str, Any]) -> Any:
    page = new_page(world)
    page.goto(url("/ui/machines"))
    # No session: the login page, and back to the machines after it.
    page.wait_for_url(re.compile(r"/ui/login\?next="))
    shot(page, "01-login")
    page.get_by_text("Log in with an API token instead").click()
    token = (world["fleet"].data_dir / "admin-token").read_text().strip()
    page.fill("#token", token)
    page.get_by_role("button", name="Log in with the token").click()
    page.wait_for_url(re.compile(r"/ui/machines$"))
    return page


def test_an_admin_enrols_machines_and_watches_them_arrive_live(
    world: dict[str, Any], admin: Any
) -> None:
    page = admin
    page.goto(url("/ui/join-tokens"))
    # Bad input: the error is next to its field and no token is made.
    page.fill("#f-ttl", "2 hours")
    page.get_by_role("button", name="Create").click()
    error = page.locator("#e-ttl")
    error.wait_for()
    assert "ttl" in error.inner_text() and "duration" in error.inner_text()
    assert page.locator("#f-ttl").get_attribute("aria-invalid") == "true"
    assert world["fleet"].get("/v1/join-tokens") == []
    shot(page, "02-token-field-error")
    page.fill("#f-ttl", "1h")
    page.fill("#f-uses", "2")
    page.fill("#f-labels", "zone=a")
    page.get_by_role("button", name="Create").click()
    join_url = page.locator("#new-token-url").inner_text().strip()
    assert join_url.startswith("basalt-fleet://") or "://" in join_url
    shot(page, "03-token-made")

    page.goto(url("/ui/machines"))
    page.locator(".live-state", has_text="live").wait_for()
    page.evaluate("window.__notReloaded = true")
    world["record"] = in_thread(
        create_machines(
            "ui", 2, world["root"] / "pool", lambda *_: None, base_address="127.0.0.191",
            machined_args=("--fleet", join_url, "--stats-interval", "1"),
        )
    )  # fmt: skip
    # The rows arrive over the live stream: no reload.
    page.locator('#machine-rows tr[data-connected="yes"]').nth(1).wait_for(timeout=60_000)
    assert page.evaluate("window.__notReloaded") is True
    assert page.locator("#machine-rows .label", has_text="zone=a").count() == 2
    shot(page, "04-machines-live")

    # Bulk label edit: a bad key is named next to its field and changes nothing; then
    # both machines get the label.
    page.locator("[data-select-all]").check()
    page.fill("input[name=set]", "bad key=1")
    page.get_by_role("button", name="Apply to ticked").click()
    page.locator("#e-set").wait_for()
    assert "bad key" in page.locator("#e-set").inner_text()
    assert all("bad key" not in m["labels"] for m in world["fleet"].machines())
    page.locator("[data-select-all]").check()
    page.fill("input[name=set]", "rack=r1")
    page.get_by_role("button", name="Apply to ticked").click()
    page.get_by_text("labels changed on 2 machines").wait_for()
    assert page.locator("#machine-rows .label", has_text="rack=r1").count() == 2
    # The keyboard: "/" goes to the search; a search filters on the server.
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "f-q"
    page.keyboard.type("machine-2")
    page.locator("#machine-rows tr").filter(has_text="ui-machine-1").wait_for(state="detached")
    assert page.locator("#machine-rows tr").count() == 1
    assert "q=machine-2" in page.url


def test_an_admin_applies_a_cluster_and_watches_it_become_ready(
    world: dict[str, Any], admin: Any
) -> None:
    page = admin
    page.goto(url("/ui/clusters"))
    template = yaml.safe_dump(
        {
            "apiVersion": "fleet.basalt.dev/v1alpha1",
            "kind": "Cluster",
            "name": "web",
            "controlPlane": {"count": 1},
            "workers": [{"name": "default", "count": 1}],
            "updates": {"channel": "stable"},
            "patches": [world["trust"]],
        },
        sort_keys=False,
    )
    # A template error is shown under the text area, naming the field; nothing changes.
    page.fill("#f-template", template.replace("count: 1", "count: one", 1))
    page.get_by_role("button", name="Plan").click()
    error = page.locator("#e-template")
    error.wait_for()
    assert "controlPlane.count" in error.inner_text()
    assert world["fleet"].get("/v1/clusters") == []
    shot(page, "05-template-error")

    page.fill("#f-template", template)
    page.get_by_role("button", name="Plan").click()
    page.locator("#plan").wait_for()
    assert page.locator("#plan tbody tr").count() == 2
    shot(page, "06-plan")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url(re.compile(r"/ui/clusters/web$"))
    page.locator(".live-state", has_text="live").first.wait_for()
    page.evaluate("window.__notReloaded = true")
    shot(page, "07-cluster-applying")
    page.locator('#cluster-status[data-status="ready"]').wait_for(timeout=300_000)
    assert page.evaluate("window.__notReloaded") is True, "the state changed without a reload"
    page.locator("#services table").first.wait_for(timeout=60_000)
    page.locator("#events > div").first.wait_for(timeout=30_000)
    page.locator("#etcd-members .badge", has_text="leader").wait_for(timeout=30_000)
    page.get_by_role("button", name=re.compile("Compare every node")).click()
    page.locator("#diff table").wait_for(timeout=60_000)
    assert page.locator("#diff .badge", has_text="in sync").count() == 2
    shot(page, "08-cluster-ready")

    # A machine's page: CPU and memory from the node's own figures.
    page.locator("#cluster-nodes a").first.click()
    page.wait_for_url(re.compile(r"/ui/machines/[0-9a-f-]{36}$"))
    page.locator("svg.spark").nth(1).wait_for(timeout=60_000)
    shot(page, "08b-machine")
    page.go_back()

    # The basaltconfig, downloaded (and audited).
    with page.expect_download() as download:
        page.get_by_role("button", name="Download", exact=True).click()
    basaltconfig = world["root"] / "web.basaltconfig"
    download.value.save_as(basaltconfig)
    assert "os:admin" in basaltconfig.read_text() or "contexts" in basaltconfig.read_text()
    with page.expect_download() as download:
        page.get_by_text("Download kubeconfig").click()
    kubeconfig = world["root"] / "web.kubeconfig"
    download.value.save_as(kubeconfig)
    assert "kind: Config" in kubeconfig.read_text()
    audit = world["fleet"].get("/v1/audit?limit=1000")
    assert any(e["action"] == "secret.read.basaltconfig" for e in audit)
    assert any(
        e["action"] == "secret.read.kubeconfig" and e["detail"].get("via") == "ui" for e in audit
    )
    assert "PRIVATE KEY" not in json.dumps(audit)

    # etcd's logs, followed live through the machine's link: a defragmentation asked
    # for after the page opened shows up in it.
    row = page.locator("#services tr", has=page.locator("td", has_text=re.compile("^etcd$")))
    row.get_by_role("link", name="logs").click()
    page.wait_for_url(re.compile(r"/ui/machines/.+/logs/etcd$"))
    page.locator("#log > div").first.wait_for(timeout=30_000)
    plane = next(m for m in world["fleet"].machines() if m["role"] == "controlplane")
    subprocess.run(
        [sys.executable, "-m", "basalt.cli.main", "--basaltconfig", str(basaltconfig),
         "etcd", "defrag", "-n", plane["inventory"]["api_address"]],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    page.locator("#log > div", has_text=re.compile("defragment", re.I)).first.wait_for()
    shot(page, "09-service-logs")


def test_an_admin_starts_a_rollout_and_pauses_it(world: dict[str, Any], admin: Any) -> None:
    page = admin
    page.goto(url("/ui/rollouts"))
    # The policy's errors name the field.
    page.select_option("#f-version", "0.2.0")
    page.fill("#f-waves", "50,20")
    page.get_by_role("button", name="Start").click()
    page.locator("#e-waves").wait_for()
    assert "last wave must be 100" in page.locator("#e-waves").inner_text()
    assert world["fleet"].get("/v1/rollouts") == []
    page.fill("#f-waves", "100")
    page.fill("#f-soak", "1h")
    page.get_by_role("button", name="Start").click()
    page.wait_for_url(re.compile(r"/ui/rollouts/\d+$"))
    page.get_by_role("button", name="Pause").click()
    page.locator('#rollout-state[data-state="paused"]').wait_for()
    page.get_by_role("button", name="Resume").wait_for()
    rollout = world["fleet"].get("/v1/rollouts")[0]
    assert rollout["state"] == "paused"
    shot(page, "10-rollout-paused")


def test_a_reader_sees_no_buttons_and_the_server_refuses_their_posts(
    world: dict[str, Any], admin: Any
) -> None:
    page = admin
    page.goto(url("/ui/users"))
    page.fill("#f-name", "rita")
    page.select_option("#f-role", "fleet:reader")
    page.fill("#f-password", READER_PASSWORD)
    page.get_by_role("button", name="Create").click()
    page.get_by_text("User rita made").wait_for()
    shot(page, "11-users")

    reader = new_page(world)
    reader.goto(url("/ui/login"))
    reader.fill("#name", "rita")
    reader.fill("#password", "not the password")
    reader.get_by_role("button", name="Log in", exact=True).click()
    assert "wrong" in reader.locator("#password-error").inner_text()
    reader.fill("#password", READER_PASSWORD)
    reader.get_by_role("button", name="Log in", exact=True).click()
    reader.wait_for_url(re.compile(r"/ui/machines$"))
    assert reader.locator("#machine-rows tr").count() == 2
    assert reader.get_by_role("button", name="Apply to ticked").count() == 0
    assert reader.locator("nav a", has_text="Join tokens").count() == 0
    shot(reader, "12-reader-machines")
    reader.goto(url("/ui/clusters/web"))
    assert reader.get_by_text("Download kubeconfig").count() == 0
    assert reader.locator("#apply-form").count() == 0
    reader.goto(url("/ui/rollouts"))
    assert reader.locator("#rollout-form").count() == 0
    assert reader.get_by_role("button").filter(has_text=re.compile("Pause|Resume")).count() == 0
    rollout = world["fleet"].get("/v1/rollouts")[0]
    reader.goto(url(f"/ui/rollouts/{rollout['id']}"))
    assert reader.get_by_role("button", name="Resume").count() == 0
    shot(reader, "13-reader-rollout")

    # The server refuses what the page does not offer: a form post with the reader's own
    # session and CSRF token.
    headers = json.loads(reader.evaluate("document.body.getAttribute('hx-headers')"))
    csrf = headers["X-CSRF-Token"]
    assert csrf
    before = world["fleet"].get("/v1/join-tokens")
    for path, form in (
        ("/ui/join-tokens", {"ttl": "1h", "uses": "5", "csrf": csrf}),
        (f"/ui/rollouts/{rollout['id']}/resume", {"csrf": csrf}),
    ):
        answer = reader.request.post(url(path), form=form)
        assert answer.status == 403, (path, answer.text())
        assert "needs fleet:operator" in answer.text()
    assert world["fleet"].get("/v1/join-tokens") == before
    assert world["fleet"].get("/v1/rollouts")[0]["state"] == "paused"
    # And an operator's post without the CSRF token is refused too (as the admin).
    answer = admin.request.post(url("/ui/join-tokens"), form={"ttl": "1h", "uses": "5"})
    assert answer.status == 403 and "CSRF" in answer.text()
    assert world["fleet"].get("/v1/join-tokens") == before


def test_pages_read_in_the_dark_theme_and_a_narrow_window(
    world: dict[str, Any], admin: Any
) -> None:
    cookies = admin.context.cookies()
    dark = new_page(world, color_scheme="dark", viewport={"width": 390, "height": 844})
    dark.context.add_cookies(cookies)
    for path, name in (("/ui/machines", "14-dark-narrow-machines"),
                       ("/ui/clusters/web", "15-dark-narrow-cluster"),
                       ("/ui/releases", "16-dark-narrow-releases")):  # fmt: skip
        dark.goto(url(path))
        dark.locator("main h1").wait_for()
        background = dark.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(22, 24, 27)", background  # the dark theme's --bg
        # Nothing wider than the window but the tables, which scroll on their own.
        assert dark.evaluate("document.documentElement.scrollWidth") <= 390
        shot(dark, name)
    problems = [m for m in world["console"] if not re.search(r"status of 40[013]", m)]
    assert problems == [], problems
