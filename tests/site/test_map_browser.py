"""The map page in headless Chromium: no console errors, points drawn, hover escaped, a click opens a neuron."""

from __future__ import annotations

import io
import re

import pytest

from atlas.bench.synthetic import make_synthetic_store
from atlas.config import RenderConfig
from atlas.site.render import render
from helpers import served, watch_errors

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("map")
    store = make_synthetic_store(root / "atlas.duckdb", 3, 64, vocab_size=512, clusters=True)
    render(store, root / "site", RenderConfig(workers=1), progress=False)
    with served(root / "site") as base:
        yield base


@pytest.fixture
def page(site_url, browser):
    # Chromium's software WebGL logs performance notes as warnings; errors are what count.
    page = watch_errors(browser.new_page(viewport={"width": 1200, "height": 900}))
    page.goto(site_url + "map/")
    page.wait_for_selector("#atlas-map[data-points]", timeout=60_000)
    return page


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
    assert "<script>alert(1)</script>" in text               # escaped once: shown as written
    x, y = _point_on_screen(page, 0, 1)               # labelled 'a label with a newline & "quotes"'
    page.mouse.move(x, y)
    page.wait_for_function("document.querySelector('.hoverlayer .hovertext')?.textContent.includes('L0/N1')",
                           timeout=10_000)
    text = page.text_content(".hoverlayer .hovertext")
    assert '& "quotes"' in text and "&quot;" not in text and "&amp;" not in text, text
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
