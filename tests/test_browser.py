"""The dashboard in a real browser: Debian's Chromium driven by Playwright, through a real
runsupervisor (tests/browser.py). One deployment and one browser serve the whole module.

TENEMENT_SCREENSHOTS=DIR saves full-page PNGs of the main pages there (`make screenshots`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, Dialog, Locator, Page, expect

from routing.releases import bucket
from tests.browser import (
    WAIT_MS,
    Dashboard,
    chromium,
    live_dashboard,
    log_in,
    logged_in_context,
    mark_document,
    no_leftover_processes,
    page_scroll_width,
    same_document,
    screenshot,
    seen_sleeping,
    seen_states,
    track,
    wait_seen,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
PHONE = {"width": 390, "height": 844}


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Overrides conftest's per-test check: the module's deployment and browser outlive each
    test; `module_processes` makes the same check once they are gone."""
    yield


@pytest.fixture(scope="module", autouse=True)
def module_processes() -> Iterator[None]:
    with no_leftover_processes():
        yield


@pytest.fixture(scope="module")
def dash(module_processes: None) -> Iterator[Dashboard]:
    with live_dashboard() as d:
        yield d


@pytest.fixture(scope="module")
def browser(module_processes: None) -> Iterator[Browser]:
    with chromium() as b:
        yield b


@pytest.fixture
def context(browser: Browser, dash: Dashboard) -> Iterator[BrowserContext]:
    """A logged-in staff session, 1280x800."""
    ctx = logged_in_context(browser, dash.url, viewport={"width": 1280, "height": 800})
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.pages[0]


def open_overview(page: Page, dash: Dashboard, query: str = "") -> None:
    """The overview, with its WebSocket connected (so no state change can slip past it)."""
    page.goto(f"{dash.url}/{query}")
    expect(page.locator("#live-status")).to_have_text("live", timeout=WAIT_MS)


def row(page: Page, key: str) -> Locator:
    return page.locator(f'tr[data-key="{key}"]')


def count(page: Page, name: str) -> int:
    return int(page.locator(f'li[data-count="{name}"] strong').inner_text())


# ---- login ------------------------------------------------------------------------------


def test_log_in(browser: Browser, dash: Dashboard) -> None:
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        # Logged out, every page sends the visitor to the login page, and back after it.
        for path in ["/", "/tenants/add/", "/instances/steady:carol/", "/logs/", "/tokens/"]:
            page.goto(dash.url + path, timeout=WAIT_MS)
            assert page.url.startswith(f"{dash.url}/accounts/login/?next="), (path, page.url)
        log_in(page, dash.url, password="wrong")
        expect(page.get_by_role("alert")).to_contain_text("Wrong username or password")
        assert "/accounts/login/" in page.url
        log_in(page, dash.url)
        assert page.url == f"{dash.url}/"
        expect(page.locator("ul.counts li[data-count=registered] strong")).to_have_text(
            re.compile(r"^\d+$"), timeout=WAIT_MS
        )
        expect(page.get_by_role("link", name="Admin")).to_be_visible()
    finally:
        ctx.close()


# ---- add a tenant, see it start, open its URL ---------------------------------------------


def test_add_tenant_and_see_it_start(page: Page, dash: Dashboard) -> None:
    open_overview(page, dash)
    page.click("a#add-tenant")
    form = page.locator("form#add-tenant-form")
    expect(form).to_be_visible()
    expect(page.locator("#id_start")).to_be_checked()
    # The same id rules as the API: a bad id is refused with a message, nothing created.
    page.select_option("#id_service", "slow")
    page.fill("#id_instance_id", "Bad/Id")
    page.click("form#add-tenant-form button[type=submit]")
    expect(page.locator(".field-error").first).to_be_visible()
    assert "slow:Bad/Id" not in dash.rows()

    page.select_option("#id_service", "slow")
    page.fill("#id_instance_id", "alice")
    page.click("form#add-tenant-form button[type=submit]")
    link = page.locator("a#tenant-url")
    expect(link).to_have_attribute("href", f"http://alice.slow.localhost:{dash.port}/")
    screenshot(page, "add-tenant")

    # `slow` takes 4 s to start: the overview loads while it starts and follows it live.
    open_overview(page, dash, "?q=alice")
    mark_document(page)
    track(page, "slow:alice")
    assert seen_states(page)[0] in {"stopped", "starting"}, seen_states(page)
    wait_seen(page, "running")
    expect(row(page, "slow:alice").locator("span.state")).to_have_text("running")
    assert same_document(page)
    assert dash.rows()["slow:alice"]["state"] == "running"


def test_open_tenant_url(page: Page, dash: Dashboard) -> None:
    # The add form's link, followed by the browser (Chromium resolves *.localhost itself).
    page.goto(f"{dash.url}/tenants/add/")
    page.select_option("#id_service", "steady")
    page.fill("#id_instance_id", "frank")
    page.click("form#add-tenant-form button[type=submit]")
    href = page.locator("a#tenant-url").get_attribute("href", timeout=WAIT_MS)
    assert href == dash.tenant_url("steady:frank")
    page.click("a#tenant-url")
    page.wait_for_url(href, timeout=WAIT_MS)
    expect(page.locator("body")).to_have_text("hello from frank", timeout=WAIT_MS)


# ---- live state: idle to sleep, wake; stop and restart -----------------------------------------


def test_idles_to_sleep_and_wakes_live(page: Page, dash: Dashboard) -> None:
    dash.wait_states({"web:bob": "stopped"})  # idle_timeout = 2 s since it started
    open_overview(page, dash, "?service=web")
    mark_document(page)
    track(page, "web:bob")
    asleep = count(page, "sleeping")
    assert seen_states(page) == ["stopped"]

    assert dash.tenant_get("web:bob", "/wake")[0] == 200  # the request wakes it
    wait_seen(page, "running")
    # No more requests: after 2 s idle it is stopped again, and counted as sleeping.
    wait_seen(page, "stopped", after=1)
    page.wait_for_function("n => window.__sleeping.at(-1) === n", arg=asleep, timeout=WAIT_MS)
    sleeping = seen_sleeping(page)
    assert asleep - 1 in sleeping, sleeping  # it left the sleeping count while awake
    assert same_document(page)


def test_stop_and_restart(page: Page, dash: Dashboard) -> None:
    open_overview(page, dash, "?q=carol")
    key = "steady:carol"
    expect(row(page, key)).to_have_attribute("data-state", "running")
    dialogs: list[str] = []

    def accept(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    row(page, key).locator('button[data-action="stop"]').click()
    expect(row(page, key)).to_have_attribute("data-state", "stopped", timeout=WAIT_MS)
    assert dialogs, "stop asked for no confirmation"
    assert dash.rows()[key]["state"] == "stopped"

    open_overview(page, dash, "?q=carol")
    track(page, key)
    # Sleeping: Start and Deregister only (Stop and Restart would do nothing).
    actions = row(page, key).locator("button[data-action]")
    assert actions.evaluate_all("bs => bs.map(b => b.dataset.action)") == ["start", "deregister"]
    expect(row(page, key).locator("span.state")).to_have_text("sleeping")
    row(page, key).locator('button[data-action="start"]').click()
    expect(row(page, key)).to_have_attribute("data-state", "running", timeout=WAIT_MS)
    expect(row(page, key).locator("span.state")).to_have_text("running")
    assert dash.rows()[key]["state"] == "running"


def test_stop_cancelled_does_nothing(page: Page, dash: Dashboard) -> None:
    open_overview(page, dash, "?q=erin")
    key = "steady:erin"
    expect(row(page, key)).to_have_attribute("data-state", "running")
    page.once("dialog", lambda dialog: dialog.dismiss())
    row(page, key).locator('button[data-action="stop"]').click()
    page.wait_for_timeout(1000)  # nothing must happen: there is no event to wait for
    assert dash.rows()[key]["desired_state"] != "stopped"
    expect(row(page, key)).to_have_attribute("data-state", "running")


# ---- logs --------------------------------------------------------------------------------------


def test_log_search_finds_a_printed_line(page: Page, dash: Dashboard) -> None:
    word = "needle" + uuid.uuid4().hex[:10]
    assert dash.tenant_get("steady:dave", f"/{word}")[0] == 200
    dash.wait_for("the app's line in the log store", lambda: dash.logged(word))

    page.goto(f"{dash.url}/logs/")
    expect(page.locator("#search-help")).to_be_visible()
    page.fill("#q", word)
    page.fill("#instance", "steady:dave")
    page.select_option("#stream", "stdout")
    page.click("form#log-search button[type=submit]")
    hit = page.locator("ol#results li.hit")
    expect(hit).to_have_count(1, timeout=WAIT_MS)
    expect(hit.locator("mark")).to_contain_text(word)
    expect(hit).to_contain_text("hello-app served")
    screenshot(page, "log-search")

    # An excluded word leaves nothing: the hit is gone, the help explains why.
    page.fill("#q", f"{word} -served")
    page.click("form#log-search button[type=submit]")
    expect(page.locator("ol#results li.hit")).to_have_count(0, timeout=WAIT_MS)


def test_detail_live_tail_follows_pauses_resumes(page: Page, dash: Dashboard) -> None:
    key = "steady:dave"
    for i in range(60):  # enough lines that the tail can scroll
        dash.tenant_get(key, f"/fill{i}")
    dash.wait_for("the filler lines", lambda: dash.logged("/fill59"))
    page.goto(f"{dash.url}/instances/{key}/")
    expect(page.locator("#instance-state")).to_have_text("running")
    expect(page.locator("table#events tbody tr").first).to_be_visible()
    expect(page.locator("#data-dir")).to_contain_text("/steady/dave")
    expect(page.locator("#data-size")).to_have_text(re.compile(r"\d"))
    expect(page.locator("#health")).not_to_be_empty()
    tail = page.locator("ol#log-tail li.log-line")
    expect(tail.last).to_contain_text("/fill59")
    expect(page.locator("#tail-status")).to_have_text("following")
    mark_document(page)

    word = "tail" + uuid.uuid4().hex[:10]
    before = tail.count()
    assert dash.tenant_get(key, f"/{word}")[0] == 200
    expect(tail.last).to_contain_text(word, timeout=WAIT_MS)
    assert tail.count() > before and same_document(page)
    screenshot(page, "detail")

    log = page.locator("ol#log-tail")
    log.hover()
    page.mouse.wheel(0, -3000)
    expect(page.locator("#tail-status")).to_have_text("paused")
    page.click("button#tail-toggle")
    expect(page.locator("#tail-status")).to_have_text("following")


# ---- tokens ------------------------------------------------------------------------------------


def test_create_and_revoke_token(browser: Browser, dash: Dashboard) -> None:
    ctx = logged_in_context(browser, dash.url, viewport={"width": 1280, "height": 800})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=dash.url)
    try:
        page = ctx.pages[0]
        page.goto(f"{dash.url}/tokens/")
        name = "ci-" + uuid.uuid4().hex[:6]
        page.fill("#id_name", name)
        page.select_option("#id_scope", "admin")
        page.click("form#token-form button[type=submit]")
        secret = page.locator("code#new-token").inner_text(timeout=WAIT_MS).strip()
        assert len(secret) >= 20
        page.click("button#copy-token")
        assert page.evaluate("navigator.clipboard.readText()") == secret
        assert dash.api_status("/api/instances", secret) == 200

        row_ = page.locator(f'table#tokens tr[data-token="{name}"]')
        expect(row_).to_be_visible()
        page.locator("code#new-token").evaluate("el => el.textContent = 'ten_' + 'x'.repeat(40)")
        screenshot(page, "tokens")
        # Shown once: a reload no longer has it.
        page.goto(f"{dash.url}/tokens/")
        expect(page.locator("code#new-token")).to_have_count(0)
        assert secret not in page.content()

        page.once("dialog", lambda dialog: dialog.accept())
        page.locator(f'tr[data-token="{name}"] button[data-action="revoke"]').click()
        page.wait_for_load_state()
        assert dash.api_status("/api/instances", secret) == 401
    finally:
        ctx.close()


# ---- releases ----------------------------------------------------------------------------------


def test_releases_shift_a_weight_see_tenants_move_switch_and_roll_back(
    page: Page, dash: Dashboard
) -> None:
    from routing.releases import ReleaseInfo, effective

    made = dash.manage("createtoken", "--name", "releaser", "--scope", "admin")
    token = made.stdout.strip()
    status, body = dash.request_json(
        "POST", "/api/services/steady/releases", {"name": "v2", "env": {"HELLO": "v2"}}, token
    )
    assert status == 201, body
    # Other tests of the module may have added tenants to steady.
    tenants = [k.split(":")[1] for k in dash.rows() if k.startswith("steady:")]
    total = len(tenants)

    def on_v2(weight: int) -> int:
        found = [ReleaseInfo("v1", 100), ReleaseInfo("v2", weight)]
        return sum(effective(found, bucket("steady", t)) == "v2" for t in tenants)

    weight = next(w for w in range(5, 100, 5) if 0 < on_v2(w) < total)
    page.goto(f"{dash.url}/releases/")
    row = page.locator('#release-steady tr[data-release="v2"]')
    expect(row.locator(".tenants")).to_have_text("0")
    slider = row.locator("input[type=range]")
    slider.fill(str(weight))
    expect(row.locator("output.weight-value")).to_have_text(str(weight))
    # The live preview, before anything is applied.
    expect(row.locator(".preview")).to_have_text(
        f"{on_v2(weight)} of {total} tenants would move", timeout=WAIT_MS
    )
    screenshot(page, "releases")
    row.locator('button[data-action="weight"]').click()
    page.wait_for_load_state()
    row = page.locator('#release-steady tr[data-release="v2"]')
    expect(row.locator(".tenants")).to_have_text(str(on_v2(weight)))
    expect(row.locator(".share")).to_have_text(f"{weight}%")
    # The supervisor moves them: the running count follows.
    dash.wait_for(
        "tenants running on v2",
        lambda: (
            sum(
                r["last_release"] == "v2" for k, r in dash.rows().items() if k.startswith("steady:")
            )
            == on_v2(weight)
        ),
        timeout=30,
    )
    page.reload()
    expect(page.locator('#release-steady tr[data-release="v2"] .running')).to_have_text(
        str(on_v2(weight))
    )
    dialogs: list[str] = []

    def accept(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.locator('#release-steady tr[data-release="v2"] button[data-action="switch"]').click()
    page.wait_for_load_state()
    assert dialogs and "Switch every tenant of steady to v2" in dialogs[0]
    expect(page.locator('#release-steady tr[data-release="v2"] .tenants')).to_have_text(str(total))
    expect(page.locator('#release-steady tr[data-release="v1"] .state')).to_have_text("draining")
    page.locator('#release-steady button[data-action="rollback"]').click()
    page.wait_for_load_state()
    expect(page.locator('#release-steady tr[data-release="v1"] .tenants')).to_have_text(str(total))
    expect(page.locator('#release-steady tr[data-release="v2"] .tenants')).to_have_text("0")
    expect(page.locator("#release-steady details.changes")).to_contain_text("rollback")
    # The instance page shows and sets the pin.
    page.goto(f"{dash.url}/instances/steady:dave/")
    page.locator("#pin-release").select_option("v2")
    page.locator('button[data-action="pin"]').click()
    page.wait_for_load_state()
    expect(page.locator("#pin-release")).to_have_value("v2")
    dash.wait_for("dave on v2", lambda: dash.rows()["steady:dave"]["last_release"] == "v2", 30)


# ---- phone width, keyboard, labels ---------------------------------------------------------------


def chart_ready(page: Page, names: list[str], check: str) -> None:
    """Wait until every named chart exists and `check` (JS, `d` its y values) holds."""
    page.wait_for_function(
        """([names, check]) => names.every(n => {
            const c = window.tenementCharts && window.tenementCharts[n];
            return c && new Function("d", "return " + check)(c.data[1]);
        })""",
        arg=[names, check],
        timeout=WAIT_MS,
    )


def test_charts_of_the_last_hour(page: Page, dash: Dashboard) -> None:
    for _ in range(5):
        assert dash.tenant_get("steady:dave", "/")[0] == 200
    open_overview(page, dash)
    # Drawn by uPlot (served from our static files), with points from the proxy's and the
    # supervisor's own counts.
    chart_ready(page, ["running"], "d.some(v => v >= 2)")
    chart_ready(page, ["req_per_s"], "d.some(v => v > 0)")
    chart_ready(page, ["wakes"], "d.length > 0")
    assert page.locator("#charts canvas").count() == 3
    screenshot(page.locator("#charts"), "charts-overview")
    expect(page.locator("#grafana-link")).to_have_attribute(
        "href", "https://grafana.example/d/tenement"
    )
    page.goto(f"{dash.url}/instances/steady:dave/")
    chart_ready(page, ["requests"], "d.some(v => v >= 1)")
    chart_ready(page, ["rss_mb"], "d.some(v => v > 1)")
    chart_ready(page, ["p95_ms", "wake_ms"], "d.length > 0")
    assert page.locator("#charts canvas").count() == 4
    screenshot(page.locator("#charts"), "charts-detail")
    script = page.locator('script[src*="uPlot"]').get_attribute("src")
    assert script is not None and script.startswith("/static/")  # no CDN


def test_layout_at_390px(browser: Browser, dash: Dashboard) -> None:
    ctx = logged_in_context(browser, dash.url, viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        page = ctx.pages[0]
        for path in ["/", "/instances/steady:dave/", "/logs/?q=hello"]:
            page.goto(dash.url + path)
            page.wait_for_load_state("load")
            assert page_scroll_width(page) <= 390, (path, page_scroll_width(page))
            nav = page.locator("nav[aria-label=Main] a")
            for i in range(nav.count()):
                assert_reachable(page, nav.nth(i))
            if path == "/":
                expect(page.locator("#live-status")).to_have_text("live", timeout=WAIT_MS)
                screenshot(page, "overview-390")
            if path != "/logs/?q=hello":
                button = page.locator('button[data-action="restart"]').first
                assert_reachable(page, button)
    finally:
        ctx.close()


def assert_reachable(page: Page, locator: Locator) -> None:
    """Visible, and inside the 390 px viewport once scrolled into view (no sideways scroll)."""
    locator.scroll_into_view_if_needed(timeout=WAIT_MS)
    expect(locator).to_be_visible()
    box = locator.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390 + 0.5, box


def test_keyboard_reaches_skip_link_nav_and_filters(page: Page, dash: Dashboard) -> None:
    open_overview(page, dash)
    screenshot(page, "overview")
    reached: list[str] = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(page.evaluate(FOCUSED_JS))
    assert reached[0] == "skip", reached
    for wanted in ["Overview", "Releases", "Logs", "Tokens", "#filter-q", "#filter-service"]:
        assert wanted in reached, (wanted, reached)
    assert "#filter-state" in reached, reached
    # The skip link moves focus to the content (a fresh load: Tab starts from the top).
    open_overview(page, dash)
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"


FOCUSED_JS = """() => { const e = document.activeElement;
  return e.id ? '#' + e.id : (e.className === 'skip' ? 'skip' : e.textContent.trim()) }"""
LABEL_JS = """form => [...form.querySelectorAll('input:not([type=hidden]), select, textarea')]
  .map(el => ({id: el.id, label: el.labels && el.labels.length
    ? el.labels[0].textContent.trim() : null}))"""


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/tenants/add/", "form#add-tenant-form"),
        ("/logs/", "form#log-search"),
        ("/tokens/", "form#token-form"),
        ("/", "form#filters"),
    ],
)
def test_every_input_has_a_label(page: Page, dash: Dashboard, path: str, form: str) -> None:
    page.goto(dash.url + path)
    fields = page.locator(form).evaluate(LABEL_JS)
    assert fields, f"no inputs in {form}"
    for field in fields:
        assert field["label"], f"{path}: input {field['id'] or '(no id)'} has no <label>"
        # The accessibility tree agrees: the label names exactly this input.
        found = page.get_by_label(field["label"], exact=True)
        assert found.evaluate("el => el.id") == field["id"], field
