"""The web page in a real browser: headless Chromium (Debian's package, driven by Playwright) against the app under
uvicorn, over a small index of real grocery photos with real weights. Upload a real photo, see the right product
first, click it, get "more like this". Screenshots are saved in the test's temporary folder.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from conftest import GROCERY
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
RECORDS = {  # name, price (SEK), category, brand, tags
    "Oatly-Oat-Milk": ("Oatly Oat Drink 1 l", 21.95, "dairy", "Oatly", "vegan"),
    "Banana": ("Bananas", 24.9, "fruit", "", "organic"),
    "Red-Bell-Pepper": ("Red bell pepper", 12.5, "vegetables", "", ""),
    "Pineapple": ("Pineapple", 29, "fruit", "", ""),
    "Arla-Standard-Milk": ("Arla Standard Milk 1 l", 16.75, "dairy", "Arla", ""),
    "Kiwi": ("Kiwi", 4.5, "fruit", "", "organic"),
}
OUT_OF_STOCK = {"Kiwi"}  # a boolean attribute: the page offers an "in stock" tick
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


@pytest.fixture(scope="module")
def grocery_engine(tmp_path_factory) -> ImageSearchEngine:
    """An index of the first photos of six real products, with efficientnet_lite0's ImageNet weights, and a
    products.csv giving each a name, a price, a link, a category (two brands, two tags). One build per module."""
    if not (GROCERY / "catalog").is_dir():
        pytest.skip(f"real product photos not found at {GROCERY} (see ../shared/data/README.md)")
    tmp_path = tmp_path_factory.mktemp("browser")
    for product in PRODUCTS:
        folder = tmp_path / "catalog" / product
        folder.mkdir(parents=True)
        for photo in sorted((GROCERY / "catalog" / product).iterdir())[:PER_PRODUCT]:
            shutil.copyfile(photo, folder / photo.name)
    lines = []
    for product, (name, price, category, brand, tags) in RECORDS.items():
        url = f"https://shop.example/p/{product.lower()}"
        record = {"product_id": product, "name": name, "url": url, "price": price, "currency": "SEK"}
        record |= {"category": category, "brand": brand or None, "tags": [tags] if tags else []}
        lines.append(json.dumps(record | {"in_stock": product not in OUT_OF_STOCK}))
    (tmp_path / "catalog" / "products.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
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
            expect(cards.first.locator(".product")).to_have_text(RECORDS[EXPECTED][0])  # the record's name
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
            expect(page.locator("#results-title")).to_have_text(f"More like {RECORDS[EXPECTED][0]}")
            expect(cards).to_have_count(len(PRODUCTS) - 1)
            shown = [cards.nth(i).get_attribute("data-product") for i in range(cards.count())]
            assert sorted(shown) == sorted(p for p in PRODUCTS if p != EXPECTED)
            wait_for_thumbnails(page)
            expect(page.locator("#preview")).to_have_attribute("src", clicked_thumbnail)
            expect(page.locator("#preview")).to_have_attribute("alt", RECORDS[EXPECTED][0])
            expect(results.locator(".badge")).to_have_count(0)  # other products by design: no "no match" flags
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
    """Every result's thumbnail drawn (lazy ones below the fold are asked for now: a full-page shot shows them)."""
    page.evaluate("() => document.querySelectorAll('#results img').forEach(i => { i.loading = 'eager'; })")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=TIMEOUT_MS,
    )


CATEGORY = "fruit"
COLLAGE = ("Red-Bell-Pepper", "Banana")  # left and right half of a two-photo collage


def collage(grocery: Path, path: Path) -> tuple[int, int]:
    """Two query photos side by side at a phone photo's scale; returns its size."""
    from PIL import Image

    tiles = [Image.open(grocery / "queries" / p / f"{p}_001.jpg").convert("RGB").resize((696, 696)) for p in COLLAGE]
    canvas = Image.new("RGB", (1392, 696), (255, 255, 255))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (696 * i, 0))
    canvas.save(path, quality=92)
    return canvas.size


def test_filters_a_crop_regions_and_match_badges(grocery, grocery_engine, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    photo = grocery / "queries" / EXPECTED / f"{EXPECTED}_001.jpg"
    width, height = collage(grocery, tmp_path / "collage.jpg")
    problems: list[str] = []
    shots = []

    def shot(page, name):
        wait_for_thumbnails(page)
        page.screenshot(path=tmp_path / name, full_page=True)
        shots.append(name)

    with running(create_app(engine=grocery_engine)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.set_viewport_size({"width": 1200, "height": 900})
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.goto(url)
            results = page.locator("#results")
            cards = results.locator(".card")

            # The filter controls offer what the records hold.
            expect(page.locator("#filters")).to_be_visible()
            categories = page.locator("#filter-category option")
            expect(categories).to_have_count(4)  # any, dairy, fruit, vegetables
            expect(page.locator("#filter-brand option")).to_have_count(3)  # any, Arla, Oatly
            expect(page.locator("#filter-price")).to_be_visible()

            # A search: names, prices and links from the records; a calibrated index badges each result, and the
            # results under its "no match" threshold come after a line, dimmed.
            with page.expect_response(lambda r: "/search?" in r.url):
                page.locator("#file").set_input_files(photo)
            expect(cards).to_have_count(len(PRODUCTS))
            first = results.locator(".result").first
            expect(first.locator(".card")).to_have_attribute("data-product", EXPECTED)
            expect(first.locator(".product")).to_have_text(RECORDS[EXPECTED][0])
            expect(first.locator(".price")).to_contain_text(f"{RECORDS[EXPECTED][1]:.2f}")
            expect(first.locator(".shop-link")).to_have_attribute("href", f"https://shop.example/p/{EXPECTED.lower()}")
            expect(first.locator(".badge")).to_have_text("match")
            weak = results.locator(".result.weak")
            assert weak.count() >= 1, "expected some of six products under the no-match threshold"
            order = page.evaluate(
                "() => [...document.querySelectorAll('#results > li')].map(li => li.className.split(' ').pop())"
            )
            line = order.index("weak-line")
            assert all(c != "weak" for c in order[:line]) and all(c == "weak" for c in order[line + 1 :]), order
            expect(weak.first.locator(".badge")).to_have_text("weak")
            strong = len(PRODUCTS) - weak.count()
            shot(page, "records-and-badges.png")

            # Only matches: the weak ones go.
            with page.expect_response(lambda r: "only_matches=true" in r.url):
                page.locator("#only-matches").check()
            expect(cards).to_have_count(strong)
            expect(weak).to_have_count(0)
            with page.expect_response(lambda r: "only_matches=false" in r.url):
                page.locator("#only-matches").uncheck()
            expect(cards).to_have_count(len(PRODUCTS))

            # A category filter: every shown result is in it, with its name and price; the search sent where=.
            with page.expect_response(lambda r: "/search?" in r.url) as answer:
                page.locator("#filter-category").select_option(CATEGORY)
            assert f"where=category%3D{CATEGORY}" in answer.value.url
            fruit = [p for p, r in RECORDS.items() if r[2] == CATEGORY]
            expect(cards).to_have_count(len(fruit))
            shown = [cards.nth(i).get_attribute("data-product") for i in range(cards.count())]
            assert sorted(shown) == sorted(fruit)
            for i, product in enumerate(shown):
                expect(cards.nth(i).locator(".product")).to_have_text(RECORDS[product][0])
                expect(cards.nth(i).locator(".price")).to_contain_text(f"{RECORDS[product][1]:.2f}")
            expect(page.locator("#results-title")).to_contain_text("(filtered)")
            shot(page, "filtered.png")
            # ... and a price cap on top of it
            with page.expect_response(lambda r: "/search?" in r.url) as answer:
                page.locator("#filter-price").fill("25")
                page.locator("#filter-price").press("Enter")  # commits the value: a change event
            assert "where=price%3C%3D25" in answer.value.url
            cheap = [p for p in fruit if RECORDS[p][1] <= 25]
            expect(cards).to_have_count(len(cheap))
            # ... and a tick made from the records' own boolean column
            with page.expect_response(lambda r: "/search?" in r.url) as answer:
                page.get_by_label("in stock").check()
            assert "where=in_stock%3Dtrue" in answer.value.url
            expect(cards).to_have_count(len([p for p in cheap if p not in OUT_OF_STOCK]))
            assert OUT_OF_STOCK & set(cheap), "the tick should take a product away"
            shot(page, "filtered-price-in-stock.png")
            with page.expect_response(lambda r: "/search?" in r.url and "where=" not in r.url):
                page.locator("#clear-filters").click()
            expect(cards).to_have_count(len(PRODUCTS))

            # A crop: drag a rectangle over the right half of a two-photo collage; the search sends that box in the
            # photo's own pixels and the right photo's product comes first.
            with page.expect_response(lambda r: "/search?" in r.url):
                page.locator("#file").set_input_files(tmp_path / "collage.jpg")
            page.wait_for_function("() => document.querySelector('#preview').naturalWidth > 0", timeout=TIMEOUT_MS)
            area = page.locator("#preview").bounding_box()
            scale = area["width"] / width
            x0, y0, x1, y1 = width / 2 + 20, 20, width - 20, height - 20
            page.mouse.move(area["x"] + x0 * scale, area["y"] + y0 * scale)
            page.mouse.down()
            page.mouse.move(area["x"] + (x0 + x1) / 2 * scale, area["y"] + (y0 + y1) / 2 * scale, steps=5)
            with page.expect_response(lambda r: "box=" in r.url) as answer:
                page.mouse.move(area["x"] + x1 * scale, area["y"] + y1 * scale, steps=5)
                page.mouse.up()
            sent = [float(v) for v in parse_qs(urlparse(answer.value.url).query)["box"][0].split(",")]
            tolerance = 2 / scale + 1  # a screen pixel or two, in photo pixels
            assert all(abs(a - b) <= tolerance for a, b in zip(sent, (x0, y0, x1, y1))), sent
            expect(results).to_have_attribute("data-query", "search-box")
            expect(cards.first).to_have_attribute("data-product", COLLAGE[1])
            expect(page.locator("#box")).to_be_visible()
            expect(page.locator("#clear-box")).to_be_visible()
            shot(page, "crop.png")
            with page.expect_response(lambda r: "/search?" in r.url) as answer:
                page.locator("#clear-box").click()
            assert "box=" not in answer.value.url
            expect(page.locator("#box")).to_be_hidden()

            # Find every product: one region per product of the collage, each drawn on the photo with its results.
            with page.expect_response(lambda r: "/search/regions?" in r.url):
                page.locator("#regions-mode").check()
            expect(results).to_have_attribute("data-query", "regions")
            groups = results.locator(".region-group")
            expect(groups.first).to_be_visible()
            assert groups.count() >= 2
            expect(page.locator("#region-boxes .box")).to_have_count(groups.count())
            tops = [groups.nth(i).locator(".card").first.get_attribute("data-product") for i in range(groups.count())]
            assert set(COLLAGE) <= set(tops), tops
            area = page.locator("#preview").bounding_box()
            for i, product in enumerate(tops):  # each region's box lies over its photo's half
                if product in COLLAGE:
                    box = page.locator(f"#region-boxes .box[data-region='{i + 1}']").bounding_box()
                    centre = (box["x"] + box["width"] / 2 - area["x"]) / scale
                    assert (centre < width / 2) == (product == COLLAGE[0]), (product, centre)
            groups.nth(1).hover()  # pointing at a region's results points out its box
            expect(page.locator("#region-boxes .box[data-region='2']")).to_have_class(re.compile(r"\bactive\b"))
            shot(page, "regions.png")
        finally:
            browser.close()
    print("screenshots: " + ", ".join(str(tmp_path / name) for name in shots))
    assert problems == []
    for name in shots:
        assert (tmp_path / name).stat().st_size > 10_000
