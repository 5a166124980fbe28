"""The map page in headless Chromium: no console errors, points drawn, hover escaped, a click opens a neuron."""

from __future__ import annotations

import functools
import io
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from atlas.site.render import RenderConfig, render
from atlas.bench.synthetic import make_synthetic_store

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed (pip install playwright)")
    root = tmp_path_factory.mktemp("map")
    store = make_synthetic_store(root / "atlas.duckdb", 3, 64, vocab_size=512, clusters=True)
    render(store, root / "site", RenderConfig(workers=1), progress=False)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture
def page(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.errors = []
        # Chromium's software WebGL logs performance notes as warnings; errors are what count.
        page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(served + "map/")
        page.wait_for_selector("#atlas-map[data-points]", timeout=60_000)
        yield page
        browser.close()


def _point_on_screen(page, layer: int, neuron: int) -> tuple[float, float]:
    return tuple(page.evaluate("""([layer, neuron]) => {
        const el = document.getElementById("atlas-map"), L = el._fullLayout, box = el.getBoundingClientRect();
        const trace = el._fullData.findIndex(t => t.name === "layer " + layer);
        const d = el._fullData[trace];
        return [box.left + L._size.l + L.xaxis.l2p(d.x[neuron]), box.top + L._size.t + L.yaxis.l2p(d.y[neuron])];
    }""", [layer, neuron]))


def test_map_draws_every_point_without_errors(page):
    from PIL import Image

    assert page.get_attribute("#atlas-map", "data-points") == str(3 * 64)
    assert page.evaluate("document.getElementById('atlas-map')._fullData.length") == 3
    shot = Image.open(io.BytesIO(page.locator("#atlas-map").screenshot())).convert("RGB")
    raw = shot.tobytes()
    coloured = sum(1 for i in range(0, len(raw), 3) if max(raw[i:i + 3]) - min(raw[i:i + 3]) > 60)
    assert coloured > 500, coloured                    # 192 markers of a few pixels each, in colour
    page.select_option("#atlas-map-colour", "layer")
    page.select_option("#atlas-map-layer", "1")
    assert page.evaluate("document.getElementById('atlas-map')._fullData.map(t => t.visible)") == \
        [False, True, False]
    assert page.errors == []


def test_hover_shows_the_label_as_text(page):
    x, y = _point_on_screen(page, 0, 0)               # neuron 0 of layer 0 is labelled <script>…
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
    text = page.text_content(".hoverlayer .hovertext")
    assert re.search(r"L\d+/N\d+", text) and "cluster" in text
    assert page.locator(".hoverlayer script, .hoverlayer img").count() == 0
    assert page.title() != "pwned" and page.errors == []


def test_clicking_a_point_opens_its_neuron_page(page):
    x, y = _point_on_screen(page, 2, 7)
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
    with page.expect_navigation(timeout=10_000):
        page.mouse.click(x, y)
    assert re.search(r"/neurons/\d+/\d+/$", page.url), page.url
    assert page.locator("h1").text_content().startswith("Layer ")
    assert page.errors == []
