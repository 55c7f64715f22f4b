"""The dashboard at ``/`` in a real browser, against a real ``taskserver run``.

Playwright drives Debian's Chromium (``/usr/bin/chromium``; Playwright downloads no
browser of its own here). Without Playwright or that binary the test skips, unless
``CI`` is set: there a missing browser fails, so CI cannot pass by skipping it.
Every wait is Playwright's own (``expect`` retries until its timeout); no sleeps.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .conftest import ROOT, ServerProcess

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
#: Headless, and nothing that reaches the network or needs a GPU or a sandbox
#: (containers often lack the user namespaces Chromium's sandbox wants).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: How long an ``expect`` waits for the page to catch up, in ms: generous for slow CI.
WAIT_MS = 15_000
#: Screenshots also land here (gitignored), where a developer or CI can find them.
OUTPUT = ROOT / "test-output"


def _require_browser() -> None:
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install playwright)")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if not missing:
        return
    reason = "the browser test needs " + " and ".join(missing)
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)


@pytest.fixture
def page() -> Iterator[Page]:
    """A Chromium page; fails the test on any uncaught JavaScript error."""
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            context = browser.new_context(viewport={"width": 1360, "height": 1000})
            tab = context.new_page()
            tab.on("pageerror", lambda error: errors.append(str(error)))
            yield tab
            context.close()
        finally:
            browser.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def _queued_id(page: Page) -> int:
    """Press Request and return the new task's id, as the page announces it."""
    from playwright.sync_api import expect

    notice = page.locator("#notice")
    before = notice.text_content() or ""
    page.get_by_role("button", name="Request", exact=True).click()
    # Wait for a *new* announcement (the previous one may name another task).
    expect(notice).not_to_have_text(before or "\0")
    expect(notice).to_have_text(re.compile(r"^Task \d+ queued\.$"))
    match = re.search(r"\d+", notice.text_content() or "")
    assert match is not None
    return int(match.group())


# conftest's run_server leaves its log file open (the handle it passes to Popen);
# remove this mark once run_server closes it after starting the process.
@pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")
def test_dashboard_runs_cancels_and_shows_failures(
    run_server: Callable[..., ServerProcess], page: Page, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    server = run_server("--task-workers", "2")
    # ?seconds= sets the demo task's duration: long enough to see it run, short to wait.
    page.goto(f"{server.url}/?seconds=1.5")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#recent-empty")).to_have_text(re.compile("No tasks yet"))

    # Request: the new row goes from queued/running to succeeded, live over SSE.
    done = _queued_id(page)
    row = page.locator(f"#task-{done}")
    expect(row).to_have_attribute("data-state", "running")
    expect(page.locator(f"#running-{done}")).to_be_visible()
    expect(row).to_have_attribute("data-state", "succeeded")
    expect(row.locator("progress")).to_have_js_property("value", 1)
    expect(row.locator(".data")).to_contain_text('"seconds":1.5')
    expect(page.locator('[data-count="succeeded"]')).to_have_text("1")
    expect(page.locator(f"#running-{done}")).to_have_count(0)

    # Cancel a running task from its row.
    page.get_by_label("Duration").fill("30")
    slow = _queued_id(page)
    row = page.locator(f"#task-{slow}")
    expect(row).to_have_attribute("data-state", "running")
    row.get_by_role("button", name=f"Cancel task {slow}").click()
    expect(row).to_have_attribute("data-state", "cancelled")
    expect(page.locator('[data-count="cancelled"]')).to_have_text("1")
    expect(page.locator("#running-empty")).to_be_visible()

    # A task asked to fail half way shows up under recent failures, with its error.
    page.get_by_label("Duration").fill("0.4")
    page.get_by_label("Fail half way").check()
    failed = _queued_id(page)
    expect(page.locator(f"#task-{failed}")).to_have_attribute("data-state", "failed")
    failure = page.locator(f"#failure-{failed}")
    expect(failure).to_contain_text("asked to fail half way")
    expect(page.locator('[data-count="failed"]')).to_have_text("1")
    # The picture with every kind of row in it: succeeded, cancelled, failed.
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    OUTPUT.mkdir(exist_ok=True)
    shutil.copyfile(shot, OUTPUT / "dashboard.png")

    # Retry answers either way: re-queued, or "not available" on a server without it.
    failure.get_by_role("button", name=f"Retry task {failed}").click()
    expect(page.locator("#notice")).to_have_text(re.compile(r"retry", re.IGNORECASE))

    # A fresh page rebuilds the same picture from GET /stats and GET /tasks alone.
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator(f"#task-{done}")).to_have_attribute("data-state", "succeeded")
    expect(page.locator(f"#task-{slow}")).to_have_attribute("data-state", "cancelled")
    expect(page.locator("#recent tr")).to_have_count(3)


@pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")
def test_dashboard_asks_for_a_token_once(
    run_server: Callable[..., ServerProcess], page: Page
) -> None:
    from playwright.sync_api import expect

    token = "browser-token-0123456789abcdef"
    server = run_server("--task-workers", "2", env={"TASKSERVER_API_TOKEN": token})
    page.goto(f"{server.url}/?seconds=0.2")
    login = page.locator("#login")
    expect(login).to_be_visible()
    expect(page.locator("#counts")).to_be_hidden()

    page.get_by_label("API token").fill("not-the-token-0123456789")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_contain_text("HTTP 401")

    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(login).to_be_hidden()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    done = _queued_id(page)  # a cookie write, from the page's own origin
    expect(page.locator(f"#task-{done}")).to_have_attribute("data-state", "succeeded")

    # The cookie: HttpOnly (no script sees it), SameSite=Strict; the page kept no token.
    (cookie,) = page.context.cookies()
    assert (cookie["name"], cookie["value"]) == ("taskserver_token", token)
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""
    assert token not in page.evaluate(
        "JSON.stringify(localStorage) + JSON.stringify(sessionStorage)"
    )

    # Once: a new page is signed in already. Sign out forgets it.
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(login).to_be_hidden()
    page.get_by_role("button", name="Sign out").click()
    expect(login).to_be_visible()
    assert page.context.cookies() == []


@pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")
def test_event_source_stops_after_an_ended_tasks_events(
    run_server: Callable[..., ServerProcess], page: Page
) -> None:
    import json
    import urllib.request

    server = run_server("--task-workers", "1")
    request = urllib.request.Request(
        f"{server.url}/tasks",
        data=json.dumps({"data": {"seconds": 0}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        task_id = json.load(response)["id"]
    with urllib.request.urlopen(f"{server.url}/tasks/{task_id}?wait=10", timeout=20) as response:
        assert json.load(response)["state"] == "succeeded"

    page.goto(f"{server.url}/healthz")  # any page of the same origin
    # Task events are named: addEventListener, not onmessage (which sees none of them).
    page.evaluate(
        """(url) => {
            window.seen = []; window.opens = 0; window.unnamed = 0;
            const events = new EventSource(url);
            window.events = events;
            for (const type of ["queued", "started", "progress", "finished"]) {
                events.addEventListener(type, () => window.seen.push(type));
            }
            events.onopen = () => { window.opens += 1; };
            events.onmessage = () => { window.unnamed += 1; };
        }""",
        f"/tasks/{task_id}/events",
    )
    # The replay ends; EventSource reconnects with Last-Event-ID, gets 204 and stops.
    page.wait_for_function("() => window.events.readyState === EventSource.CLOSED", timeout=WAIT_MS)
    seen = page.evaluate("() => window.seen")
    assert seen[0] == "queued"
    assert seen.count("finished") == 1
    assert page.evaluate("() => [window.opens, window.unnamed]") == [1, 0]
