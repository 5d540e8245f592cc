"""The web page in a real browser: headless Chromium (Debian's package, driven by Playwright) against the app under
uvicorn, over a small index of real grocery photos with real weights. Upload a real photo, see the right product
first, click it, get "more like this". Screenshots are saved in the test's temporary folder.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lookalike import ImageSearchEngine, Settings
from lookalike.server import create_app

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [  # without the network flags Chromium keeps calling home, which floods a closed network
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PRODUCTS = ["Oatly-Oat-Milk", "Banana", "Red-Bell-Pepper", "Pineapple", "Arla-Standard-Milk", "Kiwi"]
PER_PRODUCT = 12
EXPECTED = "Red-Bell-Pepper"
TIMEOUT_MS = 30_000


@contextmanager
def running(app) -> Iterator[str]:
    """The app under uvicorn on a free local port, in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture
def grocery_engine(grocery, tmp_path) -> ImageSearchEngine:
    """An index of the first photos of six real products, with efficientnet_lite0's ImageNet weights."""
    for product in PRODUCTS:
        folder = tmp_path / "catalog" / product
        folder.mkdir(parents=True)
        for photo in sorted((grocery / "catalog" / product).iterdir())[:PER_PRODUCT]:
            shutil.copyfile(photo, folder / photo.name)
    settings = Settings(
        config_file=None, environ={}, model_name="efficientnet_lite0", data_dir=tmp_path / "catalog", cache_dir=tmp_path
    )
    engine = ImageSearchEngine(settings)
    engine.build_index(progress=False)
    return engine


def test_upload_a_real_photo_then_more_like_this(grocery, grocery_engine, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    photo = grocery / "queries" / EXPECTED / f"{EXPECTED}_001.jpg"
    problems: list[str] = []
    with running(create_app(engine=grocery_engine)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
            page.goto(url)
            expect(page.locator("#index-info")).to_have_text(f"{len(PRODUCTS) * PER_PRODUCT} catalog photos indexed")

            # Pick a real photo: the grid shows the right product first, one card per product.
            page.locator("#file").set_input_files(photo)
            results = page.locator("#results")
            cards = results.locator(".card")
            expect(results).to_have_attribute("data-query", "search")
            expect(cards).to_have_count(len(PRODUCTS))
            expect(cards.first).to_have_attribute("data-product", EXPECTED)
            expect(cards.first.locator(".product")).to_have_text(EXPECTED)
            expect(page.locator("#preview")).to_be_visible()
            expect(page.locator("#status")).to_contain_text(f"{len(PRODUCTS)} result(s)")
            similarity = float(cards.first.locator(".similarity span").inner_text())
            assert 0 < similarity <= 1
            wait_for_thumbnails(page)
            page.screenshot(path=tmp_path / "search.png", full_page=True)

            # Click the best match: a new grid of the other products, "more like" it; the preview shows that product.
            clicked_thumbnail = cards.first.locator("img").get_attribute("src")
            cards.first.click()
            expect(results).to_have_attribute("data-query", f"similar:{EXPECTED}")
            expect(page.locator("#results-title")).to_have_text(f"More like {EXPECTED}")
            expect(cards).to_have_count(len(PRODUCTS) - 1)
            shown = [cards.nth(i).get_attribute("data-product") for i in range(cards.count())]
            assert sorted(shown) == sorted(p for p in PRODUCTS if p != EXPECTED)
            wait_for_thumbnails(page)
            expect(page.locator("#preview")).to_have_attribute("src", clicked_thumbnail)
            expect(page.locator("#preview")).to_have_attribute("alt", EXPECTED)
            page.wait_for_function("() => document.querySelector('#preview').naturalWidth > 0", timeout=TIMEOUT_MS)
            page.screenshot(path=tmp_path / "more-like-this.png", full_page=True)

            # A file that is not a photo: the page says why, in words; the old results go, and the preview shows
            # no broken image.
            page.locator("#file").set_input_files(
                files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"just some text"}]
            )
            expect(page.locator("#status")).to_have_class("error")
            expect(page.locator("#status")).to_contain_text("not a supported image")
            expect(cards).to_have_count(0)
            expect(page.locator("#results-section")).to_be_hidden()
            expect(page.locator("#preview")).to_be_hidden()
            page.screenshot(path=tmp_path / "error.png", full_page=True)

            # A PDF dropped after a good search: same story.
            page.locator("#file").set_input_files(photo)
            expect(cards).to_have_count(len(PRODUCTS))
            expect(page.locator("#preview")).to_be_visible()
            page.locator("#file").set_input_files(
                files=[{"name": "price-list.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.4\n%%EOF\n"}]
            )
            expect(page.locator("#status")).to_have_class("error")
            expect(cards).to_have_count(0)
            expect(page.locator("#results-section")).to_be_hidden()
            expect(page.locator("#preview")).to_be_hidden()
            assert page.evaluate("() => document.querySelector('#preview').getAttribute('src')") is None
            page.screenshot(path=tmp_path / "pdf-error.png", full_page=True)
        finally:
            browser.close()
    shots = ("search.png", "more-like-this.png", "error.png", "pdf-error.png")
    print("screenshots: " + ", ".join(str(tmp_path / name) for name in shots))
    # The only console errors allowed are the browser's own notes about the refused uploads (415 responses).
    assert [p for p in problems if "415" not in p] == []
    for name in shots:
        assert (tmp_path / name).stat().st_size > 10_000


def wait_for_thumbnails(page) -> None:
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=TIMEOUT_MS,
    )
