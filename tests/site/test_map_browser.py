"""The map page in headless Chromium: points drawn, labels escaped once (hover, names on the plot, legend),
the legend, a count that follows the layer filter, ?n=L/N, search, a phone's width, a click opens a neuron,
point colours that keep 3:1 against the light and the dark page, and a 2D canvas without WebGL."""

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


SCATTER = "document.getElementById('atlas-map').atlasScatter"
TIP = "#atlas-map .atlas-scatter-tip"


def _point_on_screen(page, layer: int, neuron: int) -> tuple[float, float]:
    # Layers have 64 neurons each; the renderer's point index runs over them in order.
    return tuple(page.evaluate(f"{SCATTER}.project({layer * 64 + neuron})"))


def _coloured_pixels(page) -> int:
    from PIL import Image

    raw = Image.open(io.BytesIO(page.locator("#atlas-map").screenshot())).convert("RGB").tobytes()
    return sum(1 for i in range(0, len(raw), 3) if max(raw[i:i + 3]) - min(raw[i:i + 3]) > 60)


def test_map_draws_every_point_without_errors(page):
    assert page.get_attribute("#atlas-map", "data-points") == str(3 * 64)
    assert page.evaluate(f"{SCATTER}.backend") == "webgl"
    coloured = _coloured_pixels(page)
    assert coloured > 500, coloured                    # 192 markers of a few pixels each, in colour
    page.select_option("#atlas-map-colour", "layer")
    page.select_option("#atlas-map-layer", "1")
    one_layer = _coloured_pixels(page)
    assert coloured / 5 < one_layer < coloured * 0.6, (one_layer, coloured)   # a third of the points stay
    x, y = _point_on_screen(page, 0, 5)                # hidden layers cannot be picked
    assert page.evaluate(f"{SCATTER}.pick({x}, {y})") == -1
    x, y = _point_on_screen(page, 1, 5)
    assert page.evaluate(f"{SCATTER}.pick({x}, {y})") >= 64
    page.select_option("#atlas-map-colour", "cluster")
    page.select_option("#atlas-map-layer", "all")


def _luminance(rgb) -> float:
    c = [v / 255 for v in rgb]
    c = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]


def _contrast(a, b) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)))
    return (lb + 0.05) / (la + 0.05)


def test_every_point_keeps_3_to_1_against_the_light_and_the_dark_page(page):
    backgrounds = []
    for scheme in ("default", "slate"):
        backgrounds.append(page.evaluate(f"""() => {{ document.body.setAttribute("data-md-color-scheme", "{scheme}");
            return getComputedStyle(document.body).backgroundColor.match(/\\d+/g).slice(0, 3).map(Number); }}"""))
    page.evaluate("document.body.setAttribute('data-md-color-scheme', 'default')")
    assert backgrounds[0] == [255, 255, 255] and _luminance(backgrounds[1]) < 0.05, backgrounds
    for by in ("cluster", "layer"):
        page.select_option("#atlas-map-colour", by)
        colours = {tuple(c) for c in page.evaluate(f"Array.from({{length: 192}}, (_, i) => {SCATTER}.colour(i))")}
        assert len(colours) >= 3, colours
        worst = min(_contrast(c, bg) for c in colours for bg in backgrounds)
        assert worst >= 3, (by, worst)
    page.select_option("#atlas-map-colour", "cluster")


def test_hover_shows_the_label_as_text(page):
    x, y = _point_on_screen(page, 0, 0)               # neuron 0 of layer 0 is labelled <script>…
    page.mouse.move(x, y)
    page.wait_for_selector(TIP, state="visible", timeout=10_000)
    text = page.text_content(TIP)
    assert text.startswith("L0/N0 ") and "cluster" in text, text
    assert page.locator(f"{TIP} *:not(div)").count() == 0
    assert "<script>alert(1)</script>" in text               # shown as written
    x, y = _point_on_screen(page, 0, 1)               # labelled 'a label with a newline & "quotes"'
    page.mouse.move(x, y)
    page.wait_for_function(f"document.querySelector('{TIP}')?.textContent.startsWith('L0/N1 ')", timeout=10_000)
    text = page.text_content(TIP)
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
    stops = re.findall(r"rgb\(\d+, \d+, \d+\)", page.evaluate(
        "getComputedStyle(document.querySelector('#atlas-map-legend .atlas-map-gradient')).backgroundImage"))
    ends = page.evaluate(f"[{SCATTER}.colour(0), {SCATTER}.colour(191)]")   # layer 0 and layer 2: the bar's ends
    assert [stops[0], stops[-1]] == [f"rgb({r}, {g}, {b})" for r, g, b in ends], (stops, ends)
    page.select_option("#atlas-map-colour", "cluster")


def _plot_name(label: str, named: str) -> str:
    """A cluster's name on the plot: a concept's word, a kind with its first two tokens, else the label."""
    cut = label.find(" (")
    if named == "c" and cut > 0:
        return label[:cut]
    if named == "k" and cut > 0:
        return label[:cut] + ": " + ", ".join(label[label.find("): ") + 3:].split(", ")[:2])
    return label


def test_cluster_names_are_drawn_on_the_plot_escaped_once_named_first_where_they_fit(page):
    data = json.loads(page.text_content("#atlas-map-data"))
    sizes, labels, named = (data["clusters"][k] for k in ("size", "label", "named"))
    rank = {"c": 0, "k": 1}
    order = sorted(range(len(sizes)), key=lambda c: (rank.get(named[c], 2), -sizes[c], c))[:70]
    names = page.locator(".atlas-scatter-name")
    drawn = names.all_text_contents()
    assert drawn == [_plot_name(labels[c] or f"cluster {c}", named[c]) for c in order]
    assert not any("&amp;" in t or "&quot;" in t or "&lt;" in t for t in drawn), drawn
    assert page.locator(".atlas-scatter-names *:not(span)").count() == 0
    # The first name is shown; every name shown overlaps none shown before it, and a hidden one
    # lies outside the plot or overlaps one shown.
    boxes = names.evaluate_all("els => els.map(e => e.hidden ? null : e.getBoundingClientRect().toJSON())")
    shown = [b for b in boxes if b]
    assert boxes[0] and len(shown) >= 2, boxes

    def overlap(a, b, slack=0.5):           # positions are written to 0.1 px
        return (a["left"] + slack < b["right"] and b["left"] + slack < a["right"]
                and a["top"] + slack < b["bottom"] and b["top"] + slack < a["bottom"])
    assert not any(overlap(a, b) for i, a in enumerate(shown) for b in shown[:i])


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
    view = page.evaluate(f"{SCATTER}.view()")
    xr, yr = view["x"], view["y"]
    assert abs((xr[0] + xr[1]) / 2 - p["x"][7]) < 1e-3 and abs((yr[0] + yr[1]) / 2 - p["y"][7]) < 1e-3, (xr, yr)
    ring = page.locator("#atlas-map .atlas-scatter-ring").bounding_box()
    x, y = page.evaluate(f"{SCATTER}.project(2 * 64 + 7)")
    assert abs(ring["x"] + ring["width"] / 2 - x) < 1 and abs(ring["y"] + ring["height"] / 2 - y) < 1, (ring, x, y)
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


def test_drag_pans_and_the_wheel_zooms_about_the_cursor(page):
    page.evaluate(f"{SCATTER}.fit()")
    before = page.evaluate(f"{SCATTER}.view()")
    box = page.locator("#atlas-map").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    k = box["width"] / (before["x"][1] - before["x"][0])        # pixels per data unit
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 100, cy + 40, steps=5)
    page.mouse.up()
    after = page.evaluate(f"{SCATTER}.view()")
    assert abs(before["x"][0] - after["x"][0] - 100 / k) < 1e-3 and abs(after["y"][0] - before["y"][0] - 40 / k) < 1e-3
    under = page.evaluate(f"""() => {{ const v = {SCATTER}.view();
        return [v.x[0] + (v.x[1] - v.x[0]) / 4, v.y[1] - (v.y[1] - v.y[0]) / 4]; }}""")
    page.mouse.move(box["x"] + box["width"] / 4, box["y"] + box["height"] / 4)
    page.mouse.wheel(0, -400)
    page.wait_for_function(f"{SCATTER}.view().x[1] - {SCATTER}.view().x[0] < {(after['x'][1] - after['x'][0]) * 0.7}")
    zoomed = page.evaluate(f"{SCATTER}.view()")
    still = [zoomed["x"][0] + (zoomed["x"][1] - zoomed["x"][0]) / 4, zoomed["y"][1] - (zoomed["y"][1] - zoomed["y"][0]) / 4]
    assert abs(still[0] - under[0]) < 1e-3 and abs(still[1] - under[1]) < 1e-3, (still, under)   # the point under the cursor stays
    page.evaluate(f"{SCATTER}.fit()")


def test_touch_pinch_zooms_a_tap_shows_the_tip_and_a_second_tap_opens(site_url, browser):
    context = browser.new_context(viewport={"width": 360, "height": 740}, has_touch=True)
    page = _ready(watch_errors(context.new_page()), site_url + "map/")
    page.evaluate("document.getElementById('atlas-map').scrollIntoView()")   # the plot starts low on a phone
    box = page.locator("#atlas-map").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    width = lambda: page.evaluate(f"{SCATTER}.view().x[1] - {SCATTER}.view().x[0]")   # noqa: E731
    before = width()
    cdp = context.new_cdp_session(page)

    def touch(kind, spread):
        points = [] if kind == "touchEnd" else [{"x": cx - spread, "y": cy, "id": 0}, {"x": cx + spread, "y": cy, "id": 1}]
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    touch("touchStart", 20)
    for spread in range(30, 100, 10):                       # fingers apart: 40 px to 180 px
        touch("touchMove", spread)
    touch("touchEnd", 0)
    page.wait_for_function(f"{SCATTER}.view().x[1] - {SCATTER}.view().x[0] < {before / 3}")
    assert 3.5 < before / width() < 5.5, before / width()   # zoomed by the fingers' 4.5x, give or take a step
    page.evaluate(f"{SCATTER}.fit()")
    x, y = _point_on_screen(page, 1, 9)
    page.touchscreen.tap(x, y)
    page.wait_for_selector(TIP, state="visible", timeout=10_000)
    assert page.text_content(TIP).startswith("L1/N9 ") and page.url.endswith("/map/")
    with page.expect_navigation(timeout=10_000):
        page.touchscreen.tap(x, y)
    assert page.url.endswith("/neurons/1/9/"), page.url
    assert page.errors == []
    context.close()


def test_without_webgl_the_map_says_so_and_draws_on_a_2d_canvas(site_url, browser):
    page = watch_errors(browser.new_page(viewport={"width": 1200, "height": 900}))
    page.add_init_script("""(() => { const get = HTMLCanvasElement.prototype.getContext;
        HTMLCanvasElement.prototype.getContext = function (kind, o) { return /webgl/.test(kind) ? null : get.call(this, kind, o); };
    })()""")
    _ready(page, site_url + "map/")
    assert page.evaluate(f"{SCATTER}.backend") == "2d"
    assert page.text_content("#atlas-map-status") == "192 neurons (no WebGL: drawn on a 2D canvas, slower)"
    assert _coloured_pixels(page) > 500
    x, y = _point_on_screen(page, 1, 3)
    page.mouse.move(x, y)
    page.wait_for_selector(TIP, state="visible", timeout=10_000)
    assert page.text_content(TIP).startswith("L1/N3 ")
    assert page.errors == []
    page.close()


def test_clicking_a_point_opens_its_neuron_page(page):
    # Last in the module: it leaves the shared map page. Searches before it zoomed in; zoom out.
    page.evaluate(f"{SCATTER}.fit()")
    x, y = _point_on_screen(page, 2, 7)
    page.mouse.move(x, y)
    page.wait_for_selector(TIP, state="visible", timeout=10_000)
    with page.expect_navigation(timeout=10_000):
        page.mouse.click(x, y)
    assert re.search(r"/neurons/\d+/\d+/$", page.url), page.url
    assert page.locator("h1").text_content().startswith("Layer ")
    assert page.errors == []
