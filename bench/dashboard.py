"""Dashboard benchmark: the overview's page load with 1,000 tenants, against 10, in one run.

    python bench/dashboard.py [--tenants 1000] [--running 20] [--runs 15] [--ten PATH]

Ours: a real `manage.py runsupervisor` on a data dir where `loadconfig` registered the
tenants (bench/apps/fast_app.py, only --running of them started), a staff user from
`createsuperuser`, logged in through the login page by Debian's Chromium (Playwright).
Measured, medians of --runs:

  server ms     GET / with the session cookie, whole response read (http.client)
  load ms       a fresh tab: navigation start to the `load` event
  live ms       navigation start to `#live-status` reading "live" (the WebSocket is up
                and has answered), seen by a MutationObserver installed before any script
  HTML KiB      the overview's HTML; rows = instance rows in it (server-side pagination)

the same for 10 tenants (the ratio shows what 1,000 costs), and two baselines:
  admin         Django admin's Instance changelist (/admin/instances/instance/) at 1,000,
                the in-process page listing the same rows (its own paging: 100 per page)
  ten 0.2.2     upstream's dashboard (`ten serve`, GET / on the control host): a Vite SPA
                shell. Its /assets/*.js and *.css answer with the shell itself (text/html),
                so Chromium refuses the module script and the page shows nothing; we time
                what it serves and count what it renders (no instance list at any size,
                so it is measured with none running: starting 1,000 processes for a page
                that shows none of them would measure nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    MANAGE,
    PYTHON,
    REPO,
    become_subreaper,
    ensure_ten,
    free_port,
    kill_descendants,
    log,
    process_group,
    register_ours,
    running_count,
    wait_for,
)
from playwright.sync_api import Browser, BrowserContext, sync_playwright

FAST_APP = REPO / "bench" / "apps" / "fast_app.py"
USER, PASSWORD = "bench", "bench-password-not-secret"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 30_000
# Installed before any page script: the moment #live-status first reads "live".
LIVE_JS = """window.__liveAt = null;
new MutationObserver(() => {
  const s = document.getElementById('live-status');
  if (window.__liveAt === null && s && s.textContent.trim() === 'live')
    window.__liveAt = performance.now();
}).observe(document, {subtree: true, childList: true, characterData: true});"""
LOAD_JS = "performance.getEntriesByType('navigation')[0].loadEventEnd"


@dataclass
class Figures:
    server_ms: list[float] = field(default_factory=list)
    load_ms: list[float] = field(default_factory=list)
    live_ms: list[float] = field(default_factory=list)
    html_bytes: int = 0
    rows: int = 0
    note: str = ""


# ---- ours --------------------------------------------------------------------------------


@contextlib.contextmanager
def ours(root: Path, tenants: int, running: int) -> Iterator[int]:
    """A runsupervisor with `tenants` registered, `running` of them started; yields its port."""
    root.mkdir()
    ids = [f"t{i:04d}" for i in range(tenants)]
    command = f"{PYTHON} {FAST_APP}"
    (root / "tenement.toml").write_text(
        f'[service.app]\ncommand = {json.dumps(command)}\nhealth = "/health"\n\n'
        f"[instances]\napp = {json.dumps(ids)}\n"
    )
    log(f"ours: registering {tenants} tenants, starting {running}")
    data = root / "data"
    register_ours(root / "tenement.toml", data, ids[:running])
    env = {**os.environ, "TENEMENT_DATA_DIR": str(data), "DJANGO_SUPERUSER_PASSWORD": PASSWORD}
    subprocess.run(
        [*MANAGE, "createsuperuser", "--noinput", "--username", USER, "--email", "b@example.com"],
        check=True,
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    port = free_port()
    cmd = [*MANAGE, "runsupervisor", "--bind", f"127.0.0.1:{port}", "--data-dir", str(data)]
    with process_group(cmd, cwd=REPO, log_file=root / "runsupervisor.log", grace=60):
        wait_for("ours: the login page", lambda: get(port, "/accounts/login/")[0] == 200)
        wait_for(f"ours: {running} running", lambda: running_count(data) >= running, 180)
        yield port


def get(port: int, path: str, cookie: str = "") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Host": "localhost", "Cookie": cookie})
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def log_in(browser: Browser, port: int) -> BrowserContext:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(WAIT_MS)
    context.add_init_script(LIVE_JS)
    page = context.new_page()
    page.goto(f"http://localhost:{port}/accounts/login/")
    page.fill("#id_username", USER)
    page.fill("#id_password", PASSWORD)
    with page.expect_navigation():
        page.click("form button[type=submit]")
    page.close()
    return context


def cookie_header(context: BrowserContext) -> str:
    return "; ".join(f"{c['name']}={c['value']}" for c in context.cookies())


def time_server(port: int, path: str, cookie: str, runs: int, figures: Figures) -> None:
    get(port, path, cookie)  # warm-up: templates, connections
    for _ in range(runs):
        started = time.perf_counter()
        status, body = get(port, path, cookie)
        figures.server_ms.append((time.perf_counter() - started) * 1000)
        if status != 200:
            raise SystemExit(f"GET {path}: {status} {body[:200]!r}")
    figures.html_bytes = len(body)
    # Overview rows carry data-key; the admin's carry a selection checkbox.
    figures.rows = len(re.findall(rb"<tr[^>]*data-key=|name=\"_selected_action\"", body))


def time_browser(
    context: BrowserContext, url: str, runs: int, figures: Figures, live: bool
) -> None:
    for i in range(runs + 1):  # the first is a warm-up (static files into the cache)
        page = context.new_page()
        page.goto(url, wait_until="load")
        if live:
            page.wait_for_function("window.__liveAt !== null", timeout=WAIT_MS)
        if i:
            figures.load_ms.append(page.evaluate(LOAD_JS))
            if live:
                figures.live_ms.append(page.evaluate("window.__liveAt"))
        page.close()


def measure_ours(browser: Browser, port: int, runs: int, admin: bool) -> dict[str, Figures]:
    context = log_in(browser, port)
    cookie = cookie_header(context)
    results = {"overview": Figures()}
    time_server(port, "/", cookie, runs, results["overview"])
    time_browser(context, f"http://localhost:{port}/", runs, results["overview"], live=True)
    if admin:
        results["admin"] = Figures()
        time_server(port, "/admin/instances/instance/", cookie, runs, results["admin"])
        url = f"http://localhost:{port}/admin/instances/instance/"
        time_browser(context, url, runs, results["admin"], live=False)
    context.close()
    return results


# ---- upstream ten 0.2.2 ---------------------------------------------------------------------


def measure_ten(browser: Browser, ten: str, root: Path, runs: int) -> Figures:
    root.mkdir()
    (root / "tenement.toml").write_text(
        f"[settings]\ndata_dir = {json.dumps(str(root / 'data'))}\n\n"
        f"[service.app]\ncommand = {json.dumps(f'{PYTHON} {FAST_APP} --tcp')}\n"
        'health = "/health"\nisolation = "process"\n'
    )
    port = free_port()
    serve = [ten, "serve", "--port", str(port), "--domain", "localhost"]
    figures = Figures()
    with process_group(serve, cwd=root, log_file=root / "serve.log", grace=30):
        wait_for("ten: its dashboard", lambda: get(port, "/")[0] == 200, 60)
        time_server(port, "/", "", runs, figures)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        time_browser(context, f"http://localhost:{port}/", runs, figures, live=False)
        figures.note = ten_renders(context, port)
        context.close()
    return figures


def ten_renders(context: BrowserContext, port: int) -> str:
    """What upstream's dashboard shows, and why (its asset URLs answer with the shell)."""
    page = context.new_page()
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if m.type == "error" else None)
    page.goto(f"http://localhost:{port}/", wait_until="load")
    page.wait_for_timeout(2000)  # give a working SPA time to fetch and render
    shown = page.evaluate("document.getElementById('app')?.childElementCount ?? -1")
    script = page.evaluate("document.querySelector('script[type=module]')?.src || ''")
    page.close()
    _, asset = get(port, script.replace(f"http://localhost:{port}", "") or "/assets/x.js")
    kind = "the HTML shell" if asset.lstrip().lower().startswith(b"<!doctype html") else "JS"
    return (
        f"#app has {shown} child elements after load + 2 s; its script {script.rsplit('/', 1)[-1]}"
        f" answers with {kind}; console errors: {len(refused)}"
    )


# ---- report --------------------------------------------------------------------------------


def median(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.median(values)
    return f"{m:.1f}" if m < 10 else f"{m:.0f}"


def report(results: dict[str, Figures], tenants: int, runs: int) -> None:
    print(f"\nMedians of {runs} runs; 2-core shared machine; Debian Chromium headless.\n")
    print("| page | server ms | load ms | live ms | HTML KiB | rows in HTML |")
    print("|---|---|---|---|---|---|")
    for name, f in results.items():
        cells = [median(f.server_ms), median(f.load_ms), median(f.live_ms)]
        print(f"| {name} | {' | '.join(cells)} | {f.html_bytes / 1024:.1f} | {f.rows} |")
    big, small = results.get(f"overview, {tenants:,} tenants"), results.get("overview, 10 tenants")
    if big and small:
        print()
        for label, key in [("server", "server_ms"), ("load", "load_ms"), ("live", "live_ms")]:
            a, b = getattr(big, key), getattr(small, key)
            if a and b:
                ratio = statistics.median(a) / statistics.median(b)
                print(f"- {label}: {tenants:,} tenants ÷ 10 tenants = {ratio:.2f}")
    for name, f in results.items():
        if f.note:
            print(f"- {name}: {f.note}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--running", type=int, default=20)
    parser.add_argument("--runs", type=int, default=15, help="measured runs (default 15)")
    parser.add_argument("--ten", help="upstream `ten` binary (default: bench/.ten-venv)")
    parser.add_argument("--no-ten", action="store_true", help="skip upstream ten")
    return parser.parse_args()


def run_all(args: argparse.Namespace, root: Path, browser: Browser) -> dict[str, Figures]:
    results: dict[str, Figures] = {}
    for tenants in (args.tenants, 10):
        with ours(root / f"ours-{tenants}", tenants, min(args.running, tenants)) as port:
            log(f"ours: measuring the overview at {tenants} tenants")
            got = measure_ours(browser, port, args.runs, admin=tenants == args.tenants)
        results[f"overview, {tenants:,} tenants"] = got["overview"]
        if "admin" in got:
            results[f"admin changelist, {tenants:,} tenants"] = got["admin"]
    if not args.no_ten:
        log("ten 0.2.2: measuring its dashboard")
        ten = ensure_ten(args.ten)
        results["ten 0.2.2 dashboard (renders nothing)"] = measure_ten(
            browser, ten, root / "ten", args.runs
        )
    return results


def main() -> None:
    args = parse_args()
    become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="tdash", dir="/tmp"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True
            )
            try:
                results = run_all(args, root, browser)
            finally:
                browser.close()
        report(results, args.tenants, args.runs)
    finally:
        kill_descendants()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
