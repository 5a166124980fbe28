"""The map page in headless Chromium: points drawn, labels escaped once (hover, names on the plot, legend),
the legend, a count that follows the layer filter, ?n=L/N, search, a phone's width, a click opens a neuron."""

from __future__ import annotations

import io
import json
import re
import urllib.request

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


@pytest.fixture(scope="module")
def map_page(site_url, chromium):
    # One map for the module's tests (drawing it is most of their time); each puts back what it changes.
    # Chromium's software WebGL logs performance notes as warnings; errors are what count.
    page = watch_errors(chromium.new_page(viewport={"width": 1200, "height": 900}))
    page.goto(site_url + "map/")
    page.wait_for_selector("#atlas-map[data-ready]", timeout=60_000)
    yield page
    page.context.close()


@pytest.fixture
def page(map_page):
    yield map_page
    assert map_page.errors == []


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
    assert page.evaluate("document.getElementById('atlas-map')._fullData.length") == 3 + 1   # + the highlight ring
    shot = Image.open(io.BytesIO(page.locator("#atlas-map").screenshot())).convert("RGB")
    raw = shot.tobytes()
    coloured = sum(1 for i in range(0, len(raw), 3) if max(raw[i:i + 3]) - min(raw[i:i + 3]) > 60)
    assert coloured > 500, coloured                    # 192 markers of a few pixels each, in colour
    page.select_option("#atlas-map-colour", "layer")
    page.select_option("#atlas-map-layer", "1")
    assert page.evaluate("document.getElementById('atlas-map')._fullData.slice(0, 3).map(t => t.visible)") == \
        [False, True, False]
    page.select_option("#atlas-map-colour", "cluster")
    page.select_option("#atlas-map-layer", "all")


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
    assert page.title() != "pwned"


def _ready(page, url: str):
    page.goto(url)
    page.wait_for_selector("#atlas-map[data-ready]", timeout=60_000)
    return page


def _points(site_url, layer: int) -> dict:
    with urllib.request.urlopen(f"{site_url}map/points/{layer}.json") as r:
        return json.load(r)


def test_legend_names_the_biggest_clusters_then_shows_a_layer_scale(page):
    data = json.loads(page.text_content("#atlas-map-data"))
    sizes, labels = data["clusters"]["size"], data["clusters"]["label"]
    biggest = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))[:8]
    items = page.locator("#atlas-map-legend > span")
    assert items.all_text_contents() == [labels[c] or f"cluster {c}" for c in biggest]
    assert page.locator("#atlas-map-legend .atlas-map-swatch").count() == len(biggest)
    page.select_option("#atlas-map-colour", "layer")
    assert page.locator("#atlas-map-legend .atlas-map-gradient").count() == 1
    assert page.text_content("#atlas-map-legend") == "layer 02"
    scales = page.evaluate("document.getElementById('atlas-map').data.slice(0, 3).map(t => t.marker.colorscale)")
    assert all(s[0] == [0, "#440154"] and s[-1] == [1, "#fde725"] for s in scales), scales   # the bar's scale
    page.select_option("#atlas-map-colour", "cluster")


def test_cluster_names_are_drawn_on_the_plot_escaped_once(page):
    data = json.loads(page.text_content("#atlas-map-data"))
    sizes, labels = data["clusters"]["size"], data["clusters"]["label"]
    biggest = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))[:12]
    drawn = page.locator(".annotation-text").all_text_contents()
    assert drawn == [labels[c] or f"cluster {c}" for c in biggest]
    assert not any("&amp;" in t or "&quot;" in t or "&lt;" in t for t in drawn), drawn
    assert page.locator(".annotation script, .annotation img").count() == 0


def test_the_count_follows_the_layer_filter(page):
    assert page.text_content("#atlas-map-status") == "192 neurons"
    page.select_option("#atlas-map-layer", "1")
    assert page.get_attribute("#atlas-map", "data-shown") == "64"
    assert page.text_content("#atlas-map-status") == "64 of 192 neurons, layer 1"
    page.select_option("#atlas-map-layer", "all")
    assert page.text_content("#atlas-map-status") == "192 neurons"


def test_a_neuron_pages_map_link_highlights_and_centres_it(site_url, browser):
    page = watch_errors(browser.new_page(viewport={"width": 1200, "height": 900}))
    page.goto(site_url + "neurons/2/7/")
    with page.expect_navigation():
        page.click("a[href$='map/?n=2/7']")
    page.wait_for_selector("#atlas-map[data-ready]", timeout=60_000)
    assert page.get_attribute("#atlas-map", "data-highlight") == "2/7"
    assert page.text_content("#atlas-map-found").startswith("L2/N7 ")
    assert page.get_attribute("#atlas-map-found a", "href") == "../neurons/2/7/"
    p = _points(site_url, 2)
    ring, xr, yr = page.evaluate("""() => { const el = document.getElementById("atlas-map"), d = el._fullData;
        return [[d[d.length - 1].x[0], d[d.length - 1].y[0]], el._fullLayout.xaxis.range, el._fullLayout.yaxis.range]; }""")
    assert ring == [p["x"][7], p["y"][7]]
    assert abs((xr[0] + xr[1]) / 2 - p["x"][7]) < 1e-3 and abs((yr[0] + yr[1]) / 2 - p["y"][7]) < 1e-3, (xr, yr)
    assert page.errors == []
    page.close()


def test_search_finds_by_layer_and_neuron_and_by_label_text(page, site_url):
    page.fill("#atlas-map-search", "L1/N12")
    page.press("#atlas-map-search", "Enter")
    assert page.get_attribute("#atlas-map", "data-highlight") == "1/12"
    label = _points(site_url, 0)["label"][1]                 # 'a label with a newline & "quotes"'
    page.fill("#atlas-map-search", "& \"quotes")
    page.press("#atlas-map-search", "Enter")
    found = page.text_content("#atlas-map-found")
    hits = [(layer, n) for layer in range(3) for n, t in enumerate(_points(site_url, layer)["label"])
            if t and '& "quotes' in t.lower()]
    assert found == f"match 1 of {len(hits)}: L{hits[0][0]}/N{hits[0][1]} {label}", found
    assert page.get_attribute("#atlas-map", "data-highlight") == f"{hits[0][0]}/{hits[0][1]}"
    page.fill("#atlas-map-search", "no such label anywhere")
    page.press("#atlas-map-search", "Enter")
    assert page.text_content("#atlas-map-found") == "no label contains \u201cno such label anywhere\u201d"
    assert page.get_attribute("#atlas-map", "data-highlight") is None
    page.fill("#atlas-map-search", "9/9")
    page.press("#atlas-map-search", "Enter")
    assert page.text_content("#atlas-map-found") == "no neuron L9/N9 on this map"


def test_a_phone_gets_the_map_across_its_width_without_sideways_scroll(site_url, browser):
    page = _ready(watch_errors(browser.new_page(viewport={"width": 360, "height": 740})), site_url + "map/?n=0/3")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    box = page.locator("#atlas-map").bounding_box()
    assert box["width"] >= 300 and box["height"] >= box["width"] * 0.9, box
    assert box["y"] < 740                                     # the plot starts on the first screen
    assert page.get_attribute("#atlas-map", "data-highlight") == "0/3" and page.errors == []
    page.close()


def test_clicking_a_point_opens_its_neuron_page(page):
    # Last in the module: it leaves the shared map page. Searches before it zoomed in; zoom out.
    page.evaluate("Plotly.relayout('atlas-map', {'xaxis.autorange': true, 'yaxis.autorange': true})")
    x, y = _point_on_screen(page, 2, 7)
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
    with page.expect_navigation(timeout=10_000):
        page.mouse.click(x, y)
    assert re.search(r"/neurons/\d+/\d+/$", page.url), page.url
    assert page.locator("h1").text_content().startswith("Layer ")
    assert page.errors == []
