"""Render stage: pages and JSON for every neuron, escaping, links, reproducibility, atomicity."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pytest

from atlas.site import render as render_mod
from atlas.site import neuron_pages as render_page
from atlas.errors import AtlasError
from atlas.config import RenderConfig
from atlas.site.render import render
from atlas.resources import TEMPLATES
from atlas.site.text import show_token
from atlas.schema import SCHEMA_VERSION
from atlas.site.neuron_json import FORMAT, load as load_neuron, table_rows
from atlas.site.neuron_pages import SHOWN_OUT
from atlas.store import Store
from atlas.bench.synthetic import make_synthetic_store
from helpers import parse, resolve

N_LAYERS, D_MLP = 2, 8
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=\"document.title='pwned'\">"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "atlas.duckdb", N_LAYERS, D_MLP, vocab_size=512)


@pytest.fixture(scope="module")
def site(store_path, tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("out") / "site"
    render(store_path, site_dir, RenderConfig(workers=1), progress=False)
    return site_dir


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_neuron_has_a_page_and_json(site):
    for layer in range(N_LAYERS):
        for n in range(D_MLP):
            assert (site / "neurons" / str(layer) / str(n) / "index.html").is_file()
            assert (site / "neurons" / str(layer) / f"{n}.json").is_file()
    assert len(list(site.glob("neurons/*/*/index.html"))) == N_LAYERS * D_MLP
    for page in ["index.html", "method/index.html"] + [f"layers/{layer}/index.html" for layer in range(N_LAYERS)]:
        assert (site / page).is_file(), page
    home = (site / "index.html").read_text()
    assert f"{N_LAYERS * D_MLP} neurons in {N_LAYERS} layers" in home


def test_json_equals_the_store_rows(site, store_path):
    con = duckdb.connect(str(store_path), read_only=True)
    try:
        for layer in range(N_LAYERS):
            for n in range(D_MLP):
                data = load_neuron(site / "neurons" / str(layer) / f"{n}.json")
                assert (data["layer"], data["neuron"], data["schema_version"]) == (layer, n, SCHEMA_VERSION)
                assert data["format"] == FORMAT
                cur = con.execute("SELECT * FROM neurons WHERE layer = ? AND neuron = ?", [layer, n])
                row = dict(zip([d[0] for d in cur.description], cur.fetchone()))
                assert set(data["neurons"]) == set(row)
                for key, value in row.items():
                    if isinstance(value, float):        # 3 significant digits (neuron_json.FLOAT_DIGITS)
                        assert data["neurons"][key] == pytest.approx(value, rel=5.1e-3), key
                    else:
                        assert data["neurons"][key] == value, key
                cur = con.execute("SELECT * EXCLUDE (layer, neuron) FROM decoded_tokens WHERE layer = ? AND neuron = ? "
                                  "ORDER BY side, polarity, rank", [layer, n])
                names = [d[0] for d in cur.description]
                rows = [dict(zip(names, r)) for r in cur.fetchall()]
                got_rows = table_rows(data, "decoded_tokens")
                assert len(got_rows) == len(rows) == 3 * (20 + 10)
                for got, want in zip(got_rows, rows):
                    assert set(got) == set(names)          # the table's columns, less layer and neuron
                    assert {k: got[k] for k in names if k not in ("logit", "prob")} == \
                           {k: want[k] for k in names if k not in ("logit", "prob")}
                    # Logits in hundredths or finer; prob = exp(logit - lse) keeps 3 significant digits.
                    assert got["logit"] == pytest.approx(want["logit"], abs=0.00501)
                    assert got["prob"] == pytest.approx(want["prob"], rel=5.1e-3)
    finally:
        con.close()


def test_hostile_strings_are_escaped_everywhere(site):
    for rel, data in tree(site).items():
        if rel.startswith("exports/"):
            continue            # the store and its tables as downloads: data, never rendered
        assert SCRIPT.encode() not in data, rel
        assert b"onerror=\"document" not in data, rel
        assert b"onmouseover=\"x" not in data, rel
        if rel.endswith(".html"):
            assert "\u202e" not in data.decode("utf-8"), rel      # bidi override shown, not obeyed
    neuron = (site / "neurons/0/0/index.html").read_text()
    layer = (site / "layers/0/index.html").read_text()
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert neuron.count(escaped) == 4          # the label, the title, the meta description and the top `out` token
    assert escaped in layer
    assert "⟨U+202E⟩evil" in neuron
    parsed = parse(neuron)
    # The scripts are the site's own: the scheme helper and the keyboard/copy helper, from assets/.
    assert parsed.tags.count("script") == 2 and '<script src="../../../assets/atlas-neuron.js" defer>' in neuron
    assert "atlas-text.js" not in neuron
    # The neuron page's one script is atlas-text.js and then its own, bundled when the site is built.
    bundle = (site / "assets/atlas-neuron.js").read_text(encoding="utf-8")
    assert bundle.startswith((TEMPLATES / "assets/atlas-text.js").read_text(encoding="utf-8"))
    assert '<script src="../../../assets/atlas-theme.js">' in neuron
    assert "img" not in parsed.tags
    assert not {"onerror", "onmouseover"} & parsed.attrs_seen
    data = load_neuron(site / "neurons/0/0.json")
    assert data["neurons"]["label"] == SCRIPT      # the JSON escapes `<` yet decodes to the original
    assert IMG in {r["token"] for r in table_rows(data, "decoded_tokens")}


def test_the_theme_script_carries_the_site_palette(site, tmp_path):
    """Pages carry no palette attributes: atlas-theme.js sets them, from the palette the render writes into it."""
    from atlas.site.frame import theme_palette

    neuron = (site / "neurons/0/0/index.html").read_text()
    assert "\n<body>\n" in neuron and "data-md-color" not in neuron
    script = tmp_path / "atlas-theme.js"
    shutil.copyfile(site / "assets/atlas-theme.js", script)
    theme_palette(script, {"scheme": "slate", "primary": "deep-orange", "accent": "teal"})
    assert 'var PALETTE = {"primary": "deep-orange", "accent": "teal"};' in script.read_text()
    script.write_text("no palette here")
    with pytest.raises(RuntimeError, match="PALETTE"):
        theme_palette(script, {"primary": "a", "accent": "b"})


def test_links_resolve_to_existing_files(site):
    pages = sorted(site.glob("neurons/*/*/index.html")) + [site / "index.html", site / "layers/0/index.html"]
    for page in pages:
        hrefs = parse(page.read_text()).hrefs
        assert hrefs, page
        for href in hrefs:
            assert not href.startswith("/"), (page, href)         # relative: works under any prefix
            target = resolve(page, href)
            if target is not None:
                assert target.is_file(), (page.relative_to(site), href)
    last_of_layer0 = parse((site / f"neurons/0/{D_MLP - 1}/index.html").read_text()).hrefs
    assert "../../1/0/" in last_of_layer0       # next crosses into the next layer
    first = (site / "neurons/0/0/index.html").read_text()
    assert "rel=prev" not in first and "rel=next" in first
    layer_links = parse((site / "layers/1/index.html").read_text()).hrefs
    assert all(f"../../neurons/1/{n}/" in layer_links for n in range(D_MLP))


def test_neuron_pages_are_lean(site):
    sizes = [p.stat().st_size for p in site.glob("neurons/*/*/index.html")]
    assert max(sizes) < 10 * 1024
    # Shared theme CSS, linked (one stylesheet holding the theme's and atlas.css), not inlined.
    assert "assets/atlas-pages.css" in (site / "neurons/1/3/index.html").read_text()
    assert "/* stylesheets/main." in (site / "assets/atlas-pages.css").read_text()


def test_rendering_twice_gives_identical_bytes(site, store_path, tmp_path, monkeypatch):
    again = tmp_path / "again"
    # Force worker processes even for this small site: their output must not differ.
    monkeypatch.setattr(render_mod, "PAGES_PER_WORKER", 1)
    stats = render(store_path, again, RenderConfig(workers=2), progress=False)
    assert stats["neurons"] == N_LAYERS * D_MLP
    assert tree(again) == tree(site)
    render(store_path, again, RenderConfig(workers=1), progress=False)     # in place, over the old one
    assert tree(again) == tree(site)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "exports"]   # no temporary left behind


def test_site_url_makes_permanent_urls_absolute(store_path, tmp_path):
    render(store_path, tmp_path / "s", RenderConfig(site_url="https://example.org/atlas"), progress=False)
    page = (tmp_path / "s/neurons/1/2/index.html").read_text()
    url = "https://example.org/atlas/neurons/1/2/"
    assert f'<link rel="canonical" href="{url}">' in page
    assert f'<a href="{url}" id=atlas-cite-url>{url}</a>' in page      # the cite box (the script's BibTeX takes it)
    assert "--site-url" not in page


def test_plain_mlp_has_no_gate_side(tmp_path):
    store = make_synthetic_store(tmp_path / "plain.duckdb", 1, 4, vocab_size=256, gated=False)
    render(store, tmp_path / "site", progress=False)
    page = (tmp_path / "site/neurons/0/3/index.html").read_text()
    assert '<section id=out>' in page and '<div data-draw=reads></div>' in page     # `in` is drawn from the JSON
    assert set(json.loads((tmp_path / "site/neurons/0/3.json").read_text())["decoded_tokens"]) == {"in", "out"}


def test_refuses_a_store_without_a_finished_decode(store_path, tmp_path):
    copy = tmp_path / "copy.duckdb"
    shutil.copyfile(store_path, copy)
    with Store(copy) as store:
        store.set_meta("stage.decode", {"status": "running", "fingerprint": "x"})
    with pytest.raises(AtlasError, match="decode"):
        render(copy, tmp_path / "site", progress=False)
    with pytest.raises(AtlasError):
        render(tmp_path / "missing.duckdb", tmp_path / "site", progress=False)
    assert not (tmp_path / "site").exists()


def test_a_crash_mid_render_keeps_the_previous_site(site, store_path, tmp_path, monkeypatch):
    target = tmp_path / "site"
    shutil.copytree(site, target)
    before = tree(target)
    calls = {"n": 0}
    real_write = render_page._write

    def failing_write(path, text):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_write(path, text)

    monkeypatch.setattr(render_page, "_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        render(store_path, target, RenderConfig(workers=1), progress=False, force=True)
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_an_up_to_date_site_is_not_rendered_again(site, store_path, tmp_path):
    target = tmp_path / "site"
    shutil.copytree(site, target)
    assert render(store_path, target, progress=False) == {"skipped": True, "site_dir": str(target.resolve())}
    # Another setting that changes the pages makes the site stale.
    stats = render(store_path, target, RenderConfig(layer_preview=1), progress=False)
    assert stats["neurons"] == N_LAYERS * D_MLP and tree(target) != tree(site)


def test_a_new_json_or_index_format_alone_makes_a_site_stale(site, store_path, tmp_path, monkeypatch):
    """Templates and settings unchanged, only the neuron JSON's or the index's format: render again."""
    import atlas.site.render as render_mod
    target = tmp_path / "site"
    shutil.copytree(site, target)
    assert render(store_path, target, progress=False).get("skipped")
    for name in ("JSON_FORMAT", "INDEX_SCHEMA"):
        with monkeypatch.context() as m:
            m.setattr(render_mod, name, getattr(render_mod, name) + 1)
            assert not render(store_path, target, progress=False).get("skipped"), name


def test_refuses_to_replace_a_directory_that_is_not_a_site(store_path, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(AtlasError, match="not an atlas site"):
        render(store_path, tmp_path / "notes", progress=False)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


def test_show_token_makes_invisible_characters_visible():
    assert show_token(" the") == "␣the"
    assert show_token("a\nb\tc") == "a↵b⇥c"
    assert show_token("\u202eevil") == "⟨U+202E⟩evil"
    assert show_token("") == "∅"
    assert show_token("Über") == "Über"


@pytest.mark.browser
def test_browser_shows_tokens_and_runs_no_injected_script(site, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's `chromium` is not installed (apt-get install chromium)")
    data = load_neuron(site / "neurons/0/0.json")
    plain = [show_token(r["token"]) for r in table_rows(data, "decoded_tokens")     # the rows the page itself holds
             if not set("<>&\"'") & set(r["token"]) and r["side"] == "out" and r["polarity"] == "top" and r["rank"] < SHOWN_OUT[0]]
    assert plain
    for page, title in (("neurons/0/0/index.html", "L0/N0"), ("layers/0/index.html", "Layer 0")):
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (site / page).as_uri()],
            capture_output=True, text=True, timeout=120, check=True).stdout
        parsed = parse(dom)
        assert f"<title>{title}" in dom, page        # an injected onerror would have set it to 'pwned'
        assert "pwned</title>" not in dom
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
        assert not {"onerror", "onmouseover"} & parsed.attrs_seen
        if page.startswith("neurons"):
            assert parsed.tags.count("script") == 2 and "img" not in parsed.tags     # atlas-theme.js, atlas-neuron.js
            assert all(token in dom for token in plain)


def test_serve_finds_the_site_and_serves_pages(site, tmp_path):
    import threading
    import urllib.request

    from atlas.site.serve import make_server, site_root

    assert site_root(site) == site and site_root(site.parent) == site.parent / "site"
    with pytest.raises(AtlasError, match="no built site"):
        site_root(tmp_path)
    with make_server(site.parent, port=0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        try:
            page = urllib.request.urlopen(base + "neurons/1/2/").read()
            data = json.loads(urllib.request.urlopen(base + "neurons/1/2.json").read())
        finally:
            server.shutdown()
    assert page == (site / "neurons/1/2/index.html").read_bytes()
    assert data["neurons"]["neuron"] == 2


def test_exemplar_strips_title_each_shaded_token_with_its_value():
    from atlas.site.corpus_sections import shade_level, strip_html, strip_scale

    vocab = ["a", "b", "c", "d", "e", "&lt;f&gt;"]         # strip_vocab entries are already escaped
    acts = [0.25, 0.3, 0.01, 1.0, 0.5, -0.2, -0.19]
    html = strip_html([0, 1, 2, 3, 4, 5, 0], [1, 1, 0, 2, 2, -1, -1], 3, vocab, acts)
    # Every shaded token is its own element with its value, in the strips' one format; blank
    # tokens are plain text, and the focus carries no title (its value is the strip's number).
    assert html == ("<i class=p1 title=0.250>a</i><i class=p1 title=0.300>b</i>c<b class=p2>d</b>"
                    "<i class=p2 title=0.500>e</i><i class=n1 title=-0.200>&lt;f&gt;</i><i class=n1 title=-0.190>a</i>")
    assert strip_html([0, 1], [0, 0], 0, vocab, [None, None]) == "<b>a</b>b"
    # The scale is the neuron's own and centred on zero: a neuron whose corpus sits slightly
    # negative (min -0.6, normaliser 5) leaves -0.477 blank; a sixth of the scale starts a shade.
    scale = strip_scale(5.0, -0.6)
    assert scale == 5.0 and strip_scale(0.4, -2.0) == 2.0 and strip_scale(None, None) is None
    assert [int(shade_level(x, scale)) for x in (-0.477, 0.8, 0.85, -0.9, 2.6, 4.2, 9.0, -9.0)] == [0, 0, 1, -1, 3, 5, 5, -5]


def test_activations_have_one_format_and_shares_read_as_percentages():
    from atlas.site.text import fmt_act, fmt_share

    assert [fmt_act(x) for x in (1.0, 0.969, -0.477, 12.0, 100.0, 1234.5, 0.000123, None)] == \
        ["1.00", "0.969", "-0.477", "12.0", "100", "1.23e+03", "0.000123", "\u2013"]
    assert [fmt_share(x) for x in (0.031, 0.00012, 0.45, 1.0, None)] == ["3.1%", "0.012%", "45%", "100%", "\u2013"]
