"""The web page in a real headless Chromium (Debian's /usr/bin/chromium, installed by `make setup`,
driven by Playwright; no browser download), against the shared real server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("ALLINONE_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


def test_page_shows_sentiment_then_streamed_reply_and_keeps_the_session(server, browser, tmp_path):
    page = browser.new_page()
    external = []
    page.on("request", lambda req: None if req.url.startswith(server.url) else external.append(req.url))
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("#health.ok", timeout=30_000)
        # A message that looks like HTML stays text (user message and reply are set with textContent).
        message = "今天终于完成了项目，太开心了！<b>bold</b>"
        page.fill("#input", message)
        page.click("#send")
        sentiment = page.locator(".turn .sentiment").first
        page.wait_for_function(
            "() => /LLM 情感判断: (正面|负面)/.test(document.querySelector('.turn .sentiment').textContent)",
            timeout=120_000,
        )
        assert sentiment.inner_text().startswith(("😄 LLM 情感判断: 正面", "😞 LLM 情感判断: 负面"))
        assert "%" in sentiment.inner_text()  # the probability is shown with the label
        page.wait_for_selector(".turn.done", timeout=120_000)
        reply = page.locator(".turn .reply").first.inner_text()
        assert reply.strip()
        # under the sentiment: the message's emotion and intent, e.g. "😄 喜悦 · 分享喜事"
        roles = page.locator(".turn .roles").first.inner_text()
        assert " · " in roles and roles.startswith("😄 喜悦"), roles
        assert page.locator(".turn .user").first.inner_text() == message
        assert page.locator(".turn .user b").count() == 0
        page.screenshot(path=str(tmp_path / "page.png"))

        # The session survives a reload.
        page.reload()
        page.wait_for_selector(".turn.done", timeout=30_000)
        assert page.locator(".turn .user").first.inner_text() == message
        assert page.locator(".turn .reply").first.inner_text() == reply
        assert page.locator(".turn .roles").first.inner_text() == roles  # kept in the session

        # "New conversation" starts over.
        page.click("#new")
        page.wait_for_selector(".empty", timeout=10_000)
        assert page.locator(".turn").count() == 0
        assert page.evaluate("localStorage.getItem('allinone.session')") is None
        assert not external, external
    finally:
        page.close()


def test_page_says_when_the_server_is_down(browser, server):
    page = browser.new_page()
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("#health.ok", timeout=30_000)
        page.route("**/v1/respond", lambda route: route.abort())  # as if the server went away
        page.fill("#input", "你好")
        page.click("#send")
        page.wait_for_selector("#status:not([hidden])", timeout=30_000)
        assert "Cannot reach the server" in page.locator("#status").inner_text()

        page.unroute("**/v1/respond")
        page.route(
            "**/v1/respond",
            lambda route: route.fulfill(
                status=503,
                headers={"Retry-After": "3", "Content-Type": "application/json"},
                body='{"error": {"message": "the server is busy", "type": "server_busy"}}',
            ),
        )
        page.fill("#input", "你好")
        page.click("#send")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('busy')", timeout=30_000)
        assert "try again in 3 s" in page.locator("#status").inner_text()
    finally:
        page.close()
