"""Accessibility and small screens, in headless Chromium, on one synthetic site: every page
type (home, layer, neuron, search with a query, map, clusters, a cluster, method, 404) has
zero axe-core violations in light and dark, and none scrolls sideways at 360 px or 1400 px.

axe-core comes from npm, pinned by scripts/setup --test into .venv/share/atlas/npm; without
it these tests skip and say so. Screenshots of every page, width and scheme are saved in
the test's tmp folder (``a11y-shots``) for a person to look at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlas.resources import npm_package
from helpers import served, watch_errors

pytestmark = pytest.mark.browser

AXE_DIR = npm_package("axe-core")
SCHEMES = ("light", "dark")
WIDTHS = (360, 1400)
# The page types, as paths under the site (the 404 is served for a missing path below a sub-folder).
PAGES = {"home": "", "layer": "layers/0/", "neuron": "neurons/1/3/", "search": "search/?q=dog", "map": "map/",
         "clusters": "clusters/", "cluster": "clusters/0/", "method": "method/", "404": "no/such/page/"}


@pytest.fixture(scope="module")
def axe():
    script = AXE_DIR / "axe.min.js"
    if not script.is_file():
        pytest.skip(f"axe-core is not installed at {AXE_DIR}: install node/npm and rerun scripts/setup --test")
    version = json.loads((AXE_DIR / "package.json").read_text())["version"]
    print(f"axe-core {version}")
    return script


@pytest.fixture
def site(synthetic_site):
    return synthetic_site


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("a11y-shots")


def _open(browser, site, scheme: str, width: int):
    """One page in a context of that scheme and width; a missing path gets 404.html, as GitHub Pages does."""
    root, base = site
    context = browser.new_context(viewport={"width": width, "height": 800}, color_scheme=scheme)
    not_found = (root / "site" / "404.html").read_bytes()
    context.route(base + "no/**", lambda route: route.fulfill(status=404, body=not_found, content_type="text/html"))
    return watch_errors(context.new_page())


def _load(page, url: str, name: str):
    page.goto(url)
    if name == "search":
        page.wait_for_selector("#atlas-search-status[data-state=done]", timeout=30_000)
    if name == "map":
        page.wait_for_selector("#atlas-map[data-points]", timeout=30_000)
    if name == "neuron":        # what its script draws from the JSON is checked too
        page.wait_for_selector("[data-draw=histogram][data-state=drawn]", state="attached", timeout=30_000)


def _violations(page, axe: Path) -> list[str]:
    page.add_script_tag(path=str(axe))
    found = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ["violations"]});
        return r.violations.map(v => v.id + " (" + v.impact + ", " + v.nodes.length + " nodes): "
            + v.nodes.slice(0, 3).map(n => n.target.join(" ")).join(" | ") + " : " + v.help);
    }""")
    return found


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_page_passes_axe_and_fits_the_screen(site, axe, browser, shots, scheme):
    """Each page once per width: no sideways scroll, a screenshot, and (at 1400 px) axe-core."""
    page = _open(browser, site, scheme, WIDTHS[-1])
    violations, wide = {}, {}
    for width in reversed(WIDTHS):
        page.set_viewport_size({"width": width, "height": 800})
        for name, path in PAGES.items():
            _load(page, site[1] + path, name)
            if name != "404":        # atlas's pages follow the system's scheme as the theme's do
                assert page.evaluate("document.body.dataset.mdColorScheme") == (
                    "slate" if scheme == "dark" else "default"), name
            assert page.evaluate("(document.querySelector('meta[name=description]') || {}).content"), name
            if name == "neuron":     # the title carries the label
                assert page.text_content(".atlas-label").strip() in page.title(), page.title()
            page.screenshot(path=str(shots / f"{name}-{width}-{scheme}.png"))     # the first screen
            sizes = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            if sizes[0] > sizes[1]:
                wide[f"{name} at {width} px"] = sizes
            if width == WIDTHS[-1] and (found := _violations(page, axe)):
                violations[name] = found
            # the 404 page's own status, and its search for the site's root, log failed loads
            assert name == "404" or page.errors == [], (name, page.errors)
            page.errors.clear()
    assert not violations, f"axe-core violations ({scheme}):\n" + "\n".join(
        f"  {name}: {v}" for name, vs in violations.items() for v in vs)
    assert not wide, f"pages that scroll sideways (scrollWidth, clientWidth): {wide}; screenshots in {shots}"


def test_the_404_page_links_work_under_a_sub_path(site, browser):
    """Served as /project/ with no --site-url, the 404 for any deep missing path links into /project/."""
    root, base = site
    import os
    project = root / "pages"
    project.mkdir(exist_ok=True)
    if not (project / "project").exists():
        os.symlink(root / "site", project / "project")
    with served(project) as host:
        page = _open(browser, (root, host + "project/"), "light", 1400)
        page.context.route(host + "project/no/**", lambda route: route.fulfill(
            status=404, body=(root / "site" / "404.html").read_bytes(), content_type="text/html"))
        page.goto(host + "project/no/such/deep/page/")
        hrefs = page.eval_on_selector_all("a[href]", "els => els.map(a => a.href.split('#')[0])")
        assert host + "project/" in hrefs and host + "project/search/" in hrefs, hrefs
        assert all(h.startswith(host + "project/") for h in hrefs if h.startswith(host)), hrefs
        styled = page.evaluate("getComputedStyle(document.body).fontFamily")
        assert [e for e in page.errors if "status of 404" not in e] == [], page.errors
        assert styled and "Times" not in styled, styled    # the theme's stylesheet loaded


def test_question_mark_opens_the_keyboard_help(site, browser):
    page = _open(browser, site, "light", 1400)
    page.goto(site[1] + "neurons/1/3/")
    help_box = page.locator("#atlas-keys")
    assert not help_box.is_visible()
    page.keyboard.press("?")
    assert help_box.is_visible()
    text = help_box.text_content()
    assert all(key in text for key in ("?", "j", "k", "u", "[", "]")), text
    page.keyboard.press("Escape")
    assert not help_box.is_visible()


def test_the_scheme_toggle_is_remembered(site, browser):
    """The toggle on an atlas page sets the scheme, and the choice holds on the next page; the
    palette's colours, which the page does not carry, come from atlas-theme.js as the frame's do."""
    page = _open(browser, site, "light", 1400)
    page.goto(site[1] + "method/")
    palette = "[document.body.dataset.mdColorPrimary, document.body.dataset.mdColorAccent]"
    frame = page.evaluate(palette)
    page.goto(site[1] + "neurons/1/3/")
    assert page.evaluate("document.body.dataset.mdColorScheme") == "default"
    assert page.evaluate(palette) == frame == ["indigo", "indigo"]
    page.click(".atlas-scheme")
    assert page.evaluate("document.body.dataset.mdColorScheme") == "slate"
    page.goto(site[1] + "clusters/")
    assert page.evaluate("document.body.dataset.mdColorScheme") == "slate"
    page.goto(site[1] + "method/")
    assert page.evaluate("document.body.dataset.mdColorScheme") == "slate" and page.evaluate(palette) == frame
