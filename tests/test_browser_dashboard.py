"""The dashboard of an application's own server (``--app``, at ``/dashboard``) in Chromium:
sign in, filter and search, a task page, pause and resume a queue, bulk-retry failures,
and a 390 px screen with nothing cut off. Screenshots go to the test's tmp directory
and to ``test-output/``. Every wait is Playwright's own ``expect``; no sleeps.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .conftest import ServerProcess
from .test_browser import CHROMIUM, CHROMIUM_ARGS, OUTPUT, WAIT_MS, _require_browser

if TYPE_CHECKING:
    from playwright.sync_api import Page

TOKEN = "dashboard-token-0123456789abcdef"
#: Records every EventSource the page opens, so a test can see what it subscribes to.
TRACK_STREAMS = """
(() => {
  const Original = window.EventSource;
  window.__streams = [];
  window.EventSource = class extends Original {
    constructor(url, init) { super(url, init); window.__streams.push(this); }
  };
})();
"""

PageFactory = Callable[..., "Page"]


@pytest.fixture
def new_page() -> Iterator[PageFactory]:
    """Chromium pages of a given size; fails the test on any uncaught JavaScript error."""
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )

        def make(width: int = 1360, height: int = 1000) -> Page:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.add_init_script(TRACK_STREAMS)
            tab = context.new_page()
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.on("dialog", lambda dialog: dialog.accept())
            return tab

        try:
            yield make
        finally:
            browser.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def api(server: ServerProcess, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"{server.url}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.load(response)


def wait_state(server: ServerProcess, task_id: int, state: str) -> None:
    task = api(server, "GET", f"/tasks/{task_id}?wait=20")
    assert task["state"] == state, task


def shoot(page: Page, tmp_path: Path, name: str) -> None:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    OUTPUT.mkdir(exist_ok=True)
    shutil.copyfile(shot, OUTPUT / name)


def sign_in(page: Page, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.locator("#login")).to_be_visible()
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


@pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")
def test_an_apps_dashboard_filters_pages_pauses_and_bulk_retries(
    run_server: Callable[..., ServerProcess], new_page: PageFactory, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    gate = tmp_path / "let-them-pass"
    env = {"TASKSERVER_API_TOKEN": TOKEN}
    server = run_server("--app", "tests.helpers:setup_flaky", "--task-workers", "2", env=env)
    failing = {"fail_until": str(gate)}
    made = api(
        server,
        "POST",
        "/tasks:batch",
        {
            "tasks": [
                *({"data": failing, "queue": "mail", "name": "send"} for _ in range(3)),
                *({"data": {"n": n}, "queue": "pdf", "name": "render"} for n in range(2)),
            ]
        },
    )
    ids = [t["id"] for t in made["tasks"]]
    for task_id in ids[:3]:
        wait_state(server, task_id, "failed")
    for task_id in ids[3:]:
        wait_state(server, task_id, "succeeded")

    page = new_page()
    with urllib.request.urlopen(f"{server.url}/dashboard", timeout=10) as response:
        assert response.headers["X-Frame-Options"] == "DENY"
    sign_in(page, f"{server.url}/dashboard")
    expect(page.locator("#enqueue")).to_be_hidden()  # the demo's form: not in an app
    expect(page.locator('[data-count="failed"]')).to_have_text("3")
    expect(page.locator("#recent tr")).to_have_count(5)
    # A failure that happened before the page opened shows its traceback.
    failure = page.locator(f"#failure-{ids[0]}")
    expect(failure.locator("details")).to_be_visible()
    # Queues, idle ones too, with their limits.
    expect(page.locator('#queues tr[data-queue="mail"] [data-key="concurrency"]')).to_have_text("2")
    expect(page.locator('#queues tr[data-queue="default"]')).to_be_visible()

    # Filters: by state, then by queue; search by id.
    page.locator("#filter-state").select_option("failed")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#recent tr")).to_have_count(3)
    expect(page.locator('#recent tr[data-state="failed"]')).to_have_count(3)
    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#recent tr")).to_have_count(5)
    page.locator("#filter-queue").fill("pdf")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#recent tr")).to_have_count(2)
    page.get_by_role("button", name="Clear").click()
    page.locator("#search").fill(str(ids[3]))
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#recent tr")).to_have_count(1)
    expect(page.locator(f"#task-{ids[3]}")).to_be_visible()
    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#recent tr")).to_have_count(5)

    # The task page: the whole task, its attempt and its timeline, on its own stream.
    page.locator(f"#task-{ids[0]} .task-link").click()
    expect(page).to_have_url(re.compile(rf"#/tasks/{ids[0]}$"))
    view = page.locator("#task-view")
    expect(view).to_be_visible()
    expect(page.locator("#task-state")).to_have_text("failed")
    expect(page.locator("#task-error")).to_contain_text("does not exist yet")
    expect(page.locator("#task-traceback-block")).to_be_visible()
    expect(page.locator("#task-fields")).to_contain_text("mail")
    expect(page.locator("#timeline .event")).to_have_count(3)  # queued, started, failed
    expect(page.locator("#timeline .event").last).to_contain_text("failed")
    expect(page.locator("#attempts tr")).to_have_count(1)
    expect(page.locator("#attempts tr")).to_contain_text("failed")
    streams = page.evaluate(
        "() => window.__streams.map((s) => [new URL(s.url).pathname, s.readyState])"
    )
    assert [path for path, state in streams if state != 2] in (
        [],
        [f"/tasks/{ids[0]}/events"],
    ), streams  # the all-tasks stream is closed; at most the task's own is open
    shoot(page, tmp_path, "dashboard-task-page.png")
    page.get_by_role("link", name="← All tasks").click()
    expect(page.locator("#overview")).to_be_visible()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    # Pause the mail queue: a new task waits; resume: it runs.
    mail = page.locator('#queues tr[data-queue="mail"]')
    mail.get_by_role("button", name="Pause queue mail").click()
    expect(mail.locator(".qstate")).to_have_text("paused")
    held = api(server, "POST", "/tasks", {"data": {"n": 9}, "queue": "mail"})["id"]
    after = api(server, "POST", "/tasks", {"data": {"n": 10}, "queue": "pdf"})["id"]
    wait_state(server, after, "succeeded")
    expect(page.locator(f"#task-{after}")).to_have_attribute("data-state", "succeeded")
    expect(page.locator(f"#task-{held}")).to_have_attribute("data-state", "queued")
    expect(mail.locator('[data-key="queued"]')).to_have_text("1")
    shoot(page, tmp_path, "dashboard-paused.png")
    mail.get_by_role("button", name="Resume queue mail").click()
    expect(mail.locator(".qstate")).to_have_text("active")
    expect(page.locator(f"#task-{held}")).to_have_attribute("data-state", "succeeded")

    # Bulk retry of the failures: select them (the failed filter, then the page).
    gate.write_text("ok")
    page.locator("#filter-state").select_option("failed")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#recent tr")).to_have_count(3)
    page.get_by_label("Select every task on this page").check()
    expect(page.locator("#bulk-count")).to_have_text("3 selected")
    page.get_by_role("button", name="Retry selected").click()
    expect(page.locator("#notice")).to_have_text("Retried 3 of 3 tasks.")
    expect(page.locator('[data-count="failed"]')).to_have_text("0")
    expect(page.locator('[data-count="succeeded"]')).to_have_text("7")
    expect(page.locator("#failures-empty")).to_be_visible()
    # The notice clears by itself.
    expect(page.locator("#notice")).to_have_text("", timeout=WAIT_MS)
    page.get_by_role("button", name="Clear").click()
    expect(page.locator('#recent tr[data-state="succeeded"]')).to_have_count(7)
    # The charts drew this hour's successes and failures.
    expect(page.locator("#chart-throughput .chart-total")).to_have_text("7 in the hour")
    expect(page.locator("#chart-failures .chart-total")).to_have_text("3 in the hour")
    shoot(page, tmp_path, "dashboard-app.png")


@pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")
def test_cursor_pages_reach_the_oldest_task(
    run_server: Callable[..., ServerProcess], new_page: PageFactory
) -> None:
    from playwright.sync_api import expect

    server = run_server(
        "--app",
        "tests.helpers:setup_flaky",
        "--task-workers",
        "0",
        env={"TASKSERVER_API_TOKEN": TOKEN},
    )
    api(server, "POST", "/tasks:batch", {"tasks": [{"data": n} for n in range(120)]})
    page = new_page()
    sign_in(page, f"{server.url}/dashboard")
    expect(page.locator("#recent tr")).to_have_count(50)
    expect(page.locator("#task-120")).to_be_visible()
    page.get_by_role("button", name="Older →").click()
    expect(page.locator("#task-70")).to_be_visible()
    expect(page.locator("#recent tr")).to_have_count(50)
    page.get_by_role("button", name="Older →").click()
    expect(page.locator("#task-1")).to_be_visible()
    expect(page.locator("#recent tr")).to_have_count(20)
    expect(page.get_by_role("button", name="Older →")).to_be_disabled()
    page.get_by_role("button", name="← Newer").click()
    expect(page.locator("#task-70")).to_be_visible()
    page.get_by_role("button", name="Newest").click()
    expect(page.locator("#task-120")).to_be_visible()
    # Delayed tasks show with their due time.
    api(server, "POST", "/tasks", {"data": "later", "delay": 600})
    expect(page.locator("#scheduled-121")).to_contain_text("waiting")


@pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")
def test_a_390px_screen_cuts_nothing_off(
    run_server: Callable[..., ServerProcess], new_page: PageFactory, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    server = run_server("--task-workers", "2")  # the demo: the dashboard at / too
    page = new_page(390, 844)
    page.goto(f"{server.url}/?seconds=0.3")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    # Idle, nothing run yet: the queues table still shows the default queue.
    expect(page.locator('#queues tr[data-queue="default"]')).to_be_visible()
    page.get_by_label("Fail half way").check()
    page.get_by_role("button", name="Request", exact=True).click()
    expect(page.locator('[data-count="failed"]')).to_have_text("1")
    # A failure seen live gets its traceback toggle (the event carries none: it is read).
    expect(page.locator("#failures details")).to_be_visible()
    page.get_by_label("Fail half way").uncheck()
    page.get_by_role("button", name="Request", exact=True).click()
    expect(page.locator('[data-count="succeeded"]')).to_have_text("1")
    expect(page.locator("#recent tr")).to_have_count(2)

    def overflow() -> list[str]:
        found: list[str] = page.evaluate(
            """() => {
                const wide = [];
                const width = document.documentElement.clientWidth;
                if (document.documentElement.scrollWidth > width) wide.push("page");
                for (const el of document.querySelectorAll(".table-wrap, .panel, .failures")) {
                    if (el.offsetParent === null) continue;
                    if (el.scrollWidth > el.clientWidth + 1) wide.push(el.className);
                }
                for (const el of document.querySelectorAll("td, th, button, dd, pre")) {
                    // Hidden, or a header kept for screen readers only (rows are cards here).
                    if (el.offsetParent === null || el.closest("thead")) continue;
                    const box = el.getBoundingClientRect();
                    const out = box.right > width + 0.5 || box.left < -0.5;
                    if (out) wide.push(el.outerHTML.slice(0, 80));
                }
                return wide;
            }"""
        )
        return found

    assert overflow() == []
    shoot(page, tmp_path, "dashboard-390.png")
    page.locator("#recent tr .task-link").first.click()
    expect(page.locator("#timeline .event").first).to_be_visible()
    expect(page.locator("#task-state")).to_have_text("succeeded")
    assert overflow() == []
    shoot(page, tmp_path, "dashboard-390-task.png")


@pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")
def test_counts_move_with_the_rows_without_waiting_for_stats(
    run_server: Callable[..., ServerProcess], new_page: PageFactory
) -> None:
    from playwright.sync_api import expect

    server = run_server("--task-workers", "1")
    page = new_page()
    page.goto(f"{server.url}/dashboard?seconds=0.2")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator('[data-count="succeeded"]')).to_have_text("0")
    # From now on /stats never answers: only the events can move the counts.
    page.route("**/stats", lambda route: route.abort())
    page.get_by_role("button", name="Request", exact=True).click()
    expect(page.locator('#recent tr[data-state="succeeded"]')).to_have_count(1)
    expect(page.locator('[data-count="succeeded"]')).to_have_text("1")
    expect(page.locator('[data-count="queued"]')).to_have_text("0")
    expect(page.locator('[data-count="running"]')).to_have_text("0")
