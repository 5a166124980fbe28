"""``--site-url`` is checked, and escaped where it is written all the same.

The CLI refuses a URL with a quote (tests/test_bad_settings.py). Here a render through the
Python API with that check switched off shows the second guard: mkdocs writes the URL into
404.html's attributes unescaped, so atlas percent-encodes it first. Every file is searched
for the raw payload, and headless Chromium loads 404.html, the home page and a neuron page
with a trap on ``window.__pwned``, which the payload sets if it ever runs.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from atlas.bench.synthetic import make_synthetic_store
from atlas.config import RenderConfig
from atlas.errors import AtlasError
from atlas.site.render import render
from helpers import FAULT_COUNTS

pytestmark = pytest.mark.faults
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
# The hostile strings, as the fault summary counts them.
HOSTILE_URLS = ['https://ex.org/a"onerror="window.__pwned=1"x="/',
                "https://ex.org/a'><img src=x onerror=window.__pwned=2>/"]
PAGES = ["404.html", "index.html", "neurons/0/3/index.html"]


@dataclass
class UncheckedURL(RenderConfig):
    """A render config whose URL check is off, to test the escaping behind it."""

    def validate(self) -> None:
        pass


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("site-url")
    store = make_synthetic_store(root / "atlas.duckdb", n_layers=1, d_mlp=16, vocab_size=256, top_k=5, bottom_k=3)
    out = {}
    for i, url in enumerate(HOSTILE_URLS):
        with pytest.raises(AtlasError, match="--site-url"):
            RenderConfig(site_url=url).validate()
        cfg = UncheckedURL(site_url=url, exports=False)
        render(store, root / f"site{i}", cfg, progress=False)
        out[url] = root / f"site{i}"
    return out


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_no_file_holds_the_url_raw(sites, url):
    FAULT_COUNTS["hostile strings"].add(url)
    site = sites[url]
    payload = url.split("/a", 1)[1].rstrip("/")
    assert (site / "404.html").is_file()
    for path in site.rglob("*"):
        if path.is_file() and path.suffix in (".html", ".xml", ".json", ".js", ".css"):
            text = path.read_text(encoding="utf-8", errors="replace")
            assert payload not in text, f"{path.relative_to(site)} holds the raw URL"
    not_found = (site / "404.html").read_text(encoding="utf-8")
    assert ("/a%22onerror=%22" if '"' in url else "/a%27%3E%3Cimg%20") in not_found   # encoded, still a link


@pytest.mark.browser
@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_no_page_runs_the_url(sites, browser, url):
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(sites[url])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = browser.new_page()
    hits = []
    page.add_init_script("""(() => {
        Object.defineProperty(window, "__pwned", {configurable: false, get: () => undefined,
                                                   set: v => console.error("PWNED:" + String(v))});
    })();""")
    page.on("console", lambda m: hits.append(m.text) if m.text.startswith("PWNED:") else None)
    page.route("https://ex.org/**", lambda route: route.abort())        # nothing leaves the machine
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        page.goto(base)
        page.set_content("<img src=x onerror=\"window.__pwned='control'\">")   # the trap works
        page.wait_for_timeout(300)
        assert hits == ["PWNED:control"]
        hits.clear()
        for rel in PAGES:
            page.goto(base + rel)
            page.wait_for_timeout(300)
            live = page.evaluate("""() => [...document.querySelectorAll('*')].flatMap(el =>
                [...el.attributes].filter(a => a.name.startsWith('on')).map(a => el.tagName + ' ' + a.name))""")
            assert not live, f"{rel}: live event attributes {live}"
        assert hits == [], hits
    finally:
        page.close()
        server.shutdown()
