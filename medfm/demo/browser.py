"""Drive the demo in headless Chromium through Playwright: the browser test and docs/make_screenshots.py share these steps."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

from .app import launch

CHROMIUM = "/usr/bin/chromium"  # Debian's `chromium` package; `playwright install` needs a download
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 300_000  # first use of an adapter loads its model; CPU runs on a busy machine are slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(index: str | Path | None = None):
    """The demo on 127.0.0.1 at a free port, served from this process; yields its URL."""
    demo = launch(index, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@contextmanager
def open_page(url: str, requests: list[str] | None = None):
    """A headless Chromium page at `url` (1280 px wide); every URL it requests is appended to `requests`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            if requests is not None:
                page.on("request", lambda request: requests.append(request.url))
            page.goto(url)
            page.get_by_text("Research use only").wait_for()
            yield page
        finally:
            browser.close()


def generate_in_page(page, prompt: str | None = None, finding: str | None = None, num_images: int = 2) -> None:
    """Type `prompt` and/or click the `finding` chip, press Generate, and wait until both galleries show their images."""
    page.get_by_role("tab", name="Prompt → radiograph").click()
    if prompt is not None:
        page.locator("#prompt textarea").fill(prompt)
    if finding is not None:
        page.get_by_role("button", name=finding, exact=True).click()
        page.wait_for_function("([box, text]) => box.value.endsWith(text)", arg=[page.locator("#prompt textarea").element_handle(), finding])
    page.locator("#generate").click()
    for gallery in ("#gallery", "#base-gallery"):
        page.locator(f"{gallery} img").nth(num_images - 1).wait_for()


def report_in_page(page, radiograph: str | Path) -> str:
    """Upload `radiograph` on the report tab, press "Write report", and return the report once it appears."""
    page.get_by_role("tab", name="Radiograph → report").click()
    page.locator("#upload input[type=file]").set_input_files(str(radiograph))
    page.locator("#write-report").click()
    report = page.locator("#report textarea")
    page.wait_for_function("element => element.value.length > 0", arg=report.element_handle())
    return report.input_value()


def page_error(page, upload: str | Path) -> str:
    """Upload a file on the report tab, press "Write report" and return the error message the page shows."""
    page.get_by_role("tab", name="Radiograph → report").click()
    page.locator("#upload input[type=file]").set_input_files(str(upload))
    page.locator("#write-report").click()
    toast = page.locator(".toast-body").first
    toast.wait_for()
    return toast.inner_text()
