"""Helpers for the dashboard's browser tests: a live runsupervisor and Debian's Chromium.

The deployment serves three services of tests/apps/hello.py (an app that prints a line per
request): `web` sleeps after 2 s idle, `steady` never does, `slow` takes 4 s to start (so a
page can watch it go from starting to running).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    Playwright,
    sync_playwright,
)

from tests.conftest import REPO, TENANT_PYTHON
from tests.harness import Deployment, free_port, http_request

HELLO = REPO / "tests" / "apps" / "hello.py"
USER, PASSWORD, EMAIL = "admin", "correct horse battery staple", "admin@example.com"
MANAGE = [sys.executable, str(REPO / "manage.py")]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Every Playwright wait gets an explicit deadline (ms): generous, this machine is shared.
WAIT_MS = 15_000
CONFIG = f"""
[settings]
health_check_interval = 0.5
backoff_base_ms = 100
backoff_max_ms = 400

[service.web]
command = "{TENANT_PYTHON} {HELLO}"
health = "/health"
idle_timeout = 2
stop_timeout = 2

[service.steady]
command = "{TENANT_PYTHON} {HELLO}"
health = "/health"
stop_timeout = 2

[service.slow]
command = "{TENANT_PYTHON} {HELLO}"
health = "/health"
stop_timeout = 2
env = {{ HELLO_START_DELAY = "4" }}

[instances]
web = ["bob"]
steady = ["carol", "dave", "erin"]
"""


class Dashboard(Deployment):
    """A runsupervisor serving the dashboard on a free port, with a staff user."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, CONFIG)
        self.port = free_port()
        self.url = f"http://localhost:{self.port}"
        self.env["DJANGO_SUPERUSER_PASSWORD"] = PASSWORD
        # The charts' points once a second, so a test sees several within its time.
        self.env["TENEMENT_CHARTS_STEP_SECONDS"] = "1"
        self.env["TENEMENT_GRAFANA_URL"] = "https://grafana.example/d/tenement"
        self.start("--config", str(self.config), "--bind", f"127.0.0.1:{self.port}", http=True)

    def ready(self) -> None:
        self.wait_for("the HTTP listener", self.listening, timeout=60)
        self.wait_states({"steady:carol": "running", "steady:dave": "running"}, timeout=60)
        made = subprocess.run(
            [*MANAGE, "createsuperuser", "--noinput", "--username", USER, "--email", EMAIL],
            capture_output=True,
            text=True,
            timeout=60,
            env={**self.env, "TENEMENT_DATA_DIR": str(self.data)},
            cwd=REPO,
        )
        assert made.returncode == 0, made.stderr

    def listening(self) -> bool:
        if self.supervisors[0].poll() is not None:
            log = (self.root / "supervisor-0.log").read_text()[-3000:]
            raise AssertionError(f"runsupervisor exited:\n{log}")
        return self.status("localhost", "/accounts/login/") == 200

    def tenant_url(self, key: str) -> str:
        service, instance_id = key.split(":")
        return f"http://{instance_id}.{service}.localhost:{self.port}/"

    def request(
        self, host: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One request to our server with this Host (tenant or control host)."""
        try:
            response, body = http_request(self.port, host, path, headers=headers)
        except OSError:
            return 0, b""
        return response.status, body

    def status(self, host: str, path: str) -> int:
        return self.request(host, path)[0]

    def tenant_get(self, key: str, path: str) -> tuple[int, bytes]:
        service, instance_id = key.split(":")
        return self.request(f"{instance_id}.{service}.localhost", path)

    def request_json(self, method: str, path: str, body: object, token: str) -> tuple[int, object]:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        response, raw = http_request(
            self.port, "localhost", path, method=method, body=json.dumps(body), headers=headers
        )
        return response.status, json.loads(raw) if raw else None

    def api_status(self, path: str, token: str) -> int:
        return self.request("localhost", path, {"Authorization": f"Bearer {token}"})[0]

    def logged(self, text: str) -> bool:
        """Whether the app's line containing `text` is stored (log capture is asynchronous)."""
        with contextlib.closing(sqlite3.connect(self.data / "tenement.sqlite3", timeout=10)) as db:
            row = db.execute(
                "SELECT 1 FROM instances_logline WHERE text LIKE ? LIMIT 1", (f"%{text}%",)
            ).fetchone()
        return row is not None


@contextlib.contextmanager
def live_dashboard() -> Iterator[Dashboard]:
    """One deployment for a whole test module (short path: Unix sockets live under it)."""
    root = Path(tempfile.mkdtemp(prefix="tt", dir="/tmp"))
    dashboard = Dashboard(root)
    try:
        dashboard.ready()
        yield dashboard
    finally:
        dashboard.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    reset_child_watcher()
    with sync_playwright() as p:
        browser = launch(p)
        try:
            yield browser
        finally:
            browser.close()


def reset_child_watcher() -> None:
    """Earlier in-process tests leave the supervisor's pidfd child watcher attached to
    their closed loop (process.use_pidfd_child_watcher); Playwright's own loop could then
    start no driver. 3.12+ has no process-wide watcher to reset."""
    if sys.version_info < (3, 12):
        asyncio.set_child_watcher(asyncio.ThreadedChildWatcher())


def launch(p: Playwright) -> Browser:
    """Debian's Chromium, headless (never a Playwright-downloaded browser)."""
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


@contextlib.contextmanager
def no_leftover_processes() -> Iterator[None]:
    """The module-wide form of conftest's check: the deployment and browser outlive tests."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    _, alive = psutil.wait_procs(
        [p for p in psutil.Process().children(recursive=True) if p.pid not in before], timeout=10
    )
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not alive, f"browser tests left processes behind: {alive}"


def log_in(page: Page, base: str, password: str = PASSWORD) -> None:
    page.goto(f"{base}/accounts/login/", timeout=WAIT_MS)
    page.fill("#id_username", USER)
    page.fill("#id_password", password)
    with page.expect_navigation(timeout=WAIT_MS):
        page.click("form button[type=submit]")


def logged_in_context(browser: Browser, base: str, **options: object) -> BrowserContext:
    context = browser.new_context(**options)  # type: ignore[arg-type]
    context.set_default_timeout(WAIT_MS)
    log_in(context.new_page(), base)
    return context


def screenshot(page: Page | Locator, name: str) -> None:
    """A PNG of the full page (or of one element) into $TENEMENT_SCREENSHOTS (unset: none)."""
    folder = os.environ.get("TENEMENT_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = str(Path(folder) / f"{name}.png")
        if isinstance(page, Locator):
            page.screenshot(path=path)
        else:
            page.screenshot(path=path, full_page=True)


def mark_document(page: Page) -> None:
    """Tag this document: if the tag survives, the page was updated without a reload."""
    page.evaluate("window.__sameDocument = true")


def same_document(page: Page) -> bool:
    return bool(page.evaluate("window.__sameDocument === true"))


# Records every value a row's data-state and the counts take, even if the page replaces the
# row element: a state that lasts less than a polling interval is still seen.
TRACK_JS = """([key]) => {
  window.__states = []; window.__sleeping = [];
  const row = () => document.querySelector(`tr[data-key="${key}"]`);
  const sleeping = () => {
    const s = document.querySelector('li[data-count="sleeping"] strong');
    return s ? parseInt(s.textContent, 10) : null;
  };
  const note = () => {
    const r = row(), st = r ? r.dataset.state : null;
    if (window.__states.at(-1) !== st) window.__states.push(st);
    const n = sleeping();
    if (window.__sleeping.at(-1) !== n) window.__sleeping.push(n);
  };
  note();
  new MutationObserver(note).observe(document.body,
    {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def track(page: Page, key: str) -> None:
    page.evaluate(TRACK_JS, [key])


def seen_states(page: Page) -> list[str | None]:
    return page.evaluate("window.__states")


def seen_sleeping(page: Page) -> list[int | None]:
    return page.evaluate("window.__sleeping")


def wait_seen(page: Page, state: str, after: int = 0) -> None:
    """Wait until the tracked row has taken `state` at some point after the first `after`."""
    page.wait_for_function(
        "([s, n]) => window.__states.slice(n).includes(s)", arg=[state, after], timeout=WAIT_MS
    )


def page_scroll_width(page: Page) -> int:
    return page.evaluate("document.scrollingElement.scrollWidth")
