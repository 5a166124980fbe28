"""A site published under a sub-path, as on GitHub Pages (https://user.github.io/repo/):
rendered with that --site-url, served here under /repo/, every link, the search and the map
work in headless Chromium, and nothing is fetched from the absolute URL."""

from __future__ import annotations

import urllib.error
import urllib.request

import duckdb
import pytest

from atlas.bench.synthetic import make_synthetic_store
from atlas.config import RenderConfig
from atlas.site.render import render
from atlas.site.index_format import normalise
from helpers import search_page, served, watch_errors

pytestmark = pytest.mark.browser
SITE_URL = "https://user.github.io/repo/"


@pytest.fixture(scope="module")
def subpath_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("subpath")
    store = make_synthetic_store(root / "atlas.duckdb", 2, 32, vocab_size=512, clusters=True, corpus=True, clamp=True)
    render(store, root / "www" / "repo", RenderConfig(workers=1, site_url=SITE_URL), progress=False)
    with served(root / "www") as base:
        yield root, base + "repo/"


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_links_search_and_map_work_under_a_sub_path(subpath_site, browser):
    root, base = subpath_site
    page = watch_errors(browser.new_page(viewport={"width": 1200, "height": 900}))
    outside = []
    page.route("https://user.github.io/**", lambda route: (outside.append(route.request.url), route.abort()))
    checked = set()
    for rel in ("", "neurons/1/7/", "layers/0/", "clusters/", "method/"):
        page.goto(base + rel)
        hrefs = page.eval_on_selector_all("a[href]", "els => els.map(a => a.href.split('#')[0])")
        local = {h for h in hrefs if h.startswith("http://127.0.0.1")}
        assert local and all(h.startswith(base) for h in local), [h for h in local if not h.startswith(base)]
        for url in sorted(local - checked):
            assert _status(url) == 200, (rel, url)
        checked |= local
    neuron = (base + "neurons/1/7/")
    page.goto(neuron)
    assert page.get_attribute("link[rel=canonical]", "href") == SITE_URL + "neurons/1/7/"
    page.wait_for_selector("#atlas-bibtex:not([hidden])", timeout=10_000)      # filled in from atlas-site.json
    assert f"url = {{{SITE_URL}neurons/1/7/}}" in page.text_content("#atlas-bibtex")
    assert _status(neuron.replace("/1/7/", "/1/7.json")) == 200

    page.goto(base + "map/")
    page.wait_for_selector("#atlas-map[data-points]", timeout=60_000)
    assert page.get_attribute("#atlas-map", "data-points") == str(2 * 32)
    assert page.errors == [] and outside == []

    with duckdb.connect(str(root / "atlas.duckdb"), read_only=True) as con:
        tokens = [t for (t,) in con.execute("SELECT token FROM decoded_tokens WHERE side = 'out' AND polarity = 'top' "
                                            "AND rank = 0 ORDER BY layer, neuron").fetchall()]
    word = next(normalise(t) for t in tokens if normalise(t))
    found = search_page(browser, base, word)
    links = found.eval_on_selector_all("#atlas-search-results a[href]", "els => els.map(a => a.href)")
    assert links and all(u.startswith(base) for u in links)
    assert all(_status(u) == 200 for u in links[:10])
    assert found.errors == []
