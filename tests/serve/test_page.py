"""The Chinese chat page in a real headless browser (Debian's chromium, driven by Playwright)."""
from __future__ import annotations

from pathlib import Path

import pytest
from servekit import API_KEY

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium (`apt-get install chromium`; CI installs it)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_page_streams_answers_and_shows_the_emergency_banner(served, page):
    from playwright.sync_api import expect

    from medtune.safety import DISCLAIMER, EMERGENCY_NOTICE

    page.goto(served.url + "/")
    expect(page.locator("#disclaimer")).to_contain_text("不能替代医生面诊")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()  # the API needs a key: the page asks for it
    page.fill("#key-input", API_KEY)
    page.click("#key-save")
    expect(page.locator("#model")).to_have_text("模型：" + served.model_id)

    page.select_option("#department", "神经内科")
    page.fill("#question", "最近总是头晕乏力，怎么办？")
    page.click("#send")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-done", "true", timeout=60_000)
    assert int(answer.get_attribute("data-chunks")) >= 2  # it arrived in pieces
    assert answer.inner_text().strip().endswith(DISCLAIMER)
    expect(page.locator("#emergency")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()

    page.fill("#question", "我爸突然嘴歪了，说话含糊不清，右手拿不住筷子")
    page.press("#question", "Enter")  # Enter sends, as the send button does
    banner = page.locator("#emergency")
    expect(banner).to_be_visible(timeout=60_000)
    expect(banner).to_contain_text("120")
    second = page.locator(".msg.assistant").nth(1)
    expect(second).to_have_attribute("data-done", "true", timeout=60_000)
    assert second.inner_text().startswith(EMERGENCY_NOTICE)
    assert page.locator(".msg.user").count() == 2  # the conversation is kept


def test_stop_button_ends_the_stream_and_frees_the_slot(loaded, page):
    import time

    from servekit import make_app, running
    from playwright.sync_api import expect

    app = make_app(loaded, api_key=None, max_new_tokens=3000, max_tokens_limit=4096)
    with running(app) as url:
        page.goto(url + "/")
        expect(page.locator("#model")).to_contain_text(app.state.config.model_id)
        page.fill("#question", "请详细介绍一下高血压的日常护理")
        page.click("#send")
        answer = page.locator(".msg.assistant").last
        page.wait_for_function("document.querySelector('.msg.assistant').dataset.chunks >= 3", timeout=60_000)
        assert app.state.engine.running == 1
        page.click("#stop")
        expect(answer).to_have_attribute("data-done", "stopped")
        expect(answer).to_contain_text("（已停止）")
        expect(page.locator("#send")).to_be_enabled()
        deadline = time.monotonic() + 20
        while app.state.engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.engine.running == 0  # the server stopped generating when the page hung up
