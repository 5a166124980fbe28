"""A neuron page in headless Chromium: the cite box copies, keys navigate, no console errors,
and the core content is there with JavaScript turned off."""

from __future__ import annotations

import pytest

from atlas.site.corpus_sections import SHOWN_ATTR, SHOWN_MAX, SHOWN_MIN, SHOWN_SAMPLES
from atlas.site.neuron_pages import SHOWN_OUT, SHOWN_TOKENS
from helpers import watch_errors

pytestmark = pytest.mark.browser


@pytest.fixture
def site_url(synthetic_site):
    return synthetic_site[1]


def _open(context, url):
    page = watch_errors(context.new_page())
    page.goto(url)
    return page


def test_cite_box_copies_the_bibtex(site_url, browser):
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site_url.rstrip("/"))
    page = _open(context, site_url + "neurons/1/3/")
    page.wait_for_selector('button[data-copy="atlas-bibtex"]', timeout=5_000)      # drawn by the script
    button = page.locator('button[data-copy="atlas-bibtex"]')
    assert button.is_visible()
    button.click()
    page.wait_for_selector('button[data-copy="atlas-bibtex"][data-state="copied"]', timeout=5_000)
    assert button.text_content() == "copied"
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == page.text_content("#atlas-bibtex")
    assert copied.startswith("@misc{atlas:synthetic-gated-2x8:L1:N3,") and f"url = {{{site_url}neurons/1/3/}}" in copied
    assert page.text_content("#atlas-cite-url") == site_url + "neurons/1/3/"   # absolute: the page's own address
    page.locator('button[data-copy="atlas-query"]').click()      # made once the snippet is drawn
    assert page.evaluate("navigator.clipboard.readText()") == page.text_content("#atlas-query") == (
        'import duckdb  # the same rows, from atlas.duckdb\ncon = duckdb.connect("atlas.duckdb", read_only=True)\n'
        'for table in ("neurons", "decoded_tokens", "exemplars", "attributions"):\n'
        '    con.sql(f"SELECT * FROM {table} WHERE layer = 1 AND neuron = 3 ORDER BY ALL").show(max_rows=100)\n')
    assert page.title() != "pwned" and page.errors == []


def test_keys_move_between_neurons_and_layers(site_url, browser):
    page = _open(browser.new_context(), site_url + "neurons/1/3/")
    for key, path in (("j", "neurons/1/4/"), ("ArrowLeft", "neurons/1/3/"), ("k", "neurons/1/2/"),
                      ("ArrowRight", "neurons/1/3/"), ("[", "neurons/0/3/"), ("]", "neurons/1/3/"), ("u", "layers/1/")):
        with page.expect_navigation(timeout=10_000):
            page.keyboard.press(key)
        assert page.url == site_url + path, (key, page.url)
    page.goto(site_url + "neurons/0/7/")
    with page.expect_navigation(timeout=10_000):
        page.keyboard.press("j")                    # the last neuron of a layer leads to the next layer
    assert page.url == site_url + "neurons/1/0/"
    assert page.errors == []


def test_core_content_renders_without_javascript(site_url, browser):
    page = _open(browser.new_context(java_script_enabled=False), site_url + "neurons/0/0/")
    assert page.text_content("h1") == "Layer 0 · neuron 0"
    # What a citation needs is in the HTML: the strongest `out` tokens; the rest needs the script.
    assert page.locator("table.atlas-logits tr td:first-child").count() == SHOWN_OUT[0]
    assert page.text_content("#out th").startswith(f"top {SHOWN_OUT[0]} of 20")
    # One line says what the script draws, beside the link to the JSON it draws it from.
    assert "neighbours and more tables: JavaScript draws them" in page.text_content("#atlas-json + noscript")
    assert page.locator("svg.atlas-hist, .atlas-attr:not(#clamp *)").count() == 0
    assert page.locator("table.atlas-logits").first.is_visible()
    shown = SHOWN_MAX + SHOWN_MIN
    strongest = page.locator("ol.atlas-strips:not(.atlas-bands)")
    assert strongest.locator("li").count() == shown and strongest.locator("b").count() == shown
    samples = page.locator("ol.atlas-bands li")      # weaker activations, sampled from the histogram's bins
    assert 0 < samples.count() <= 3 * SHOWN_SAMPLES and page.locator("ol.atlas-bands b").count() == samples.count()
    assert page.locator("#clamp").is_visible() and page.locator("#out th", has_text="Δ pushed").count() == 1
    assert not page.locator("#atlas-bibtex").is_visible() and not page.locator("#atlas-query").is_visible()   # drawn
    assert page.locator("#atlas-cite-url").is_visible()                                               # in the HTML
    assert page.locator("button[data-copy]").count() == 0     # made by the script, which cannot run
    assert page.locator("#neighbours h2, .atlas-nb").count() == 0                                     # drawn
    assert page.locator("#in, #gate, #reproduce h2").count() == 0                                     # drawn
    # Injected token text stays text: the hostile tokens are on this page and did nothing.
    assert page.title() == "L0/N0: <script>alert(1)</script> · Neuron atlas: synthetic/gated-2x8"   # the label, as text
    assert "<script>alert(1)</script>" in page.text_content("#out")
    assert page.errors == []


def test_script_draws_what_the_html_leaves_out_and_the_neighbours_labels(synthetic_site, browser):
    """The decoded tables beyond the strongest `out` tokens, the histogram and the next tokens it
    pushes come from the neuron's JSON and read as the site's Python writes the same rows (hostile
    and invisible tokens included); the neighbours' labels come from the search index's label files."""
    import duckdb

    from atlas.site.corpus_sections import histogram_edges, histogram_figure
    from atlas.site.neuron_json import table_rows, with_vocab
    from atlas.site.text import fmt_logit, fmt_stat, show_token, visible

    root, site_url = synthetic_site
    con = duckdb.connect(str(root / "atlas.duckdb"), read_only=True)
    page = _open(browser.new_context(), site_url + "neurons/0/0/")
    for drawn in ("reads", "out", "histogram", "attributions", "clamp", "neighbours", "query"):
        page.wait_for_selector(f"[data-draw={drawn}][data-state]", state="attached", timeout=10_000)
    assert page.locator("[data-draw][data-state=failed]").count() == 0
    tables, cells = [*SHOWN_TOKENS.items(), ("out", SHOWN_OUT)], []
    for side, (top, bottom) in tables:
        want = []
        for polarity, shown in (("top", top), ("bottom", bottom)):
            rows = con.execute("SELECT token, logit FROM decoded_tokens WHERE layer = 0 AND neuron = 0 AND side = ? "
                               "AND polarity = ? ORDER BY rank", [side, polarity]).fetchall()
            want += [[show_token(t), fmt_logit(lg)] for t, lg in rows[:shown]]
            header = page.locator(f"#{side} table.atlas-logits th").filter(has_text=polarity).first.text_content()
            assert header == (f"{polarity} {shown} of {len(rows)}" if shown < len(rows) else polarity)
        got = page.eval_on_selector_all(f"#{side} table.atlas-logits tr:has(td)",
                                        "rows => rows.map(r => [...r.cells].slice(0, 2).map(c => c.textContent))")
        assert got == want, side
        cells += got
        # Every side's stats line is drawn too, from the neurons row (the `out` side's above its table).
        row = con.execute(f"SELECT {side}_norm, {side}_logit_mean, {side}_logit_std, {side}_logit_skew, "
                          f"{side}_logit_kurtosis FROM neurons WHERE layer = 0 AND neuron = 0").fetchone()
        want_stats = "‖v‖ {} · logits: mean {}, std {}, skew {}, kurtosis {}".format(*map(fmt_stat, row))
        assert page.text_content(f"#{side} p.atlas-stats") == want_stats
        assert page.locator(f"#{side} p.atlas-stats + table.atlas-logits").count() == 1
    assert any("<script>" in t or "⟨U+" in t for t, _ in cells)         # the hostile tokens are among them, as text
    # The next tokens it pushes: the JSON's strongest attributions, in the Python formats.
    data = with_vocab(page.request.get(site_url + "neurons/0/0.json").json(),
                      page.request.get(site_url + "vocab.json").json()["token"])
    rows = table_rows(data, "attributions")
    want = "".join(f"{label}: " + " · ".join([f"{show_token(r['token'])} {fmt_stat(r['attribution'])}"
                                            for r in rows if r["polarity"] == polarity][:SHOWN_ATTR])
                   for polarity, label in (("supports", "up"), ("suppresses", "down")))
    assert page.text_content("[data-draw=attributions] p.atlas-attr") == want
    assert page.locator("[data-draw=attributions] b").count() == 2 * SHOWN_ATTR
    # The clamp check's tokens that rise and fall most, as the store has them.
    from atlas.site.clamp_sections import SHOWN as CLAMP_SHOWN

    effects = con.execute("SELECT direction, token, delta_logprob FROM clamp_effects WHERE layer = 0 AND neuron = 0 "
                          "AND direction <> 'own' AND rank < ? ORDER BY direction DESC, rank", [CLAMP_SHOWN]).fetchall()
    want = "".join(f"{direction}: " + " · ".join(f"{show_token(t)} {d:+.2f}" for dn, t, d in effects if dn == direction)
                   for direction in ("rises", "falls"))
    assert page.text_content("#clamp [data-draw=clamp]") == want and want.count(" · ") == 2 * (CLAMP_SHOWN - 1)
    # The histogram: the same path, ticks and count as the Python twin draws from the store's rows.
    counts = con.execute("SELECT counts FROM histograms WHERE layer = 0 AND neuron = 0").fetchone()[0]
    figure = histogram_figure(counts, histogram_edges(con, len(counts)))
    hist = page.locator("[data-draw=histogram] svg.atlas-hist")
    assert hist.locator("path").first.get_attribute("d") == figure["path"]
    ticks = hist.locator("text").evaluate_all("els => els.map(e => [e.getAttribute('x'), e.textContent])")
    assert ticks[:len(figure["ticks"])] == [[str(x), label] for x, label in figure["ticks"]]
    assert ticks[len(figure["ticks"])][1] == "{:,}".format(figure["count_max"])
    assert hist.locator("path.z").get_attribute("d") == f"M{figure['zero']} 0V48"
    # The neighbours: each links the neuron the store names, with its cosine as the JSON rounds it
    # (its step, 10^cosine_exp: 4 decimals here) and its label.
    page.wait_for_selector("ol.atlas-nb[data-state=labelled]", state="attached", timeout=10_000)
    nbs = con.execute("SELECT g.nb_layer, g.nb_neuron, g.cosine, n.label FROM neighbours g JOIN neurons n ON n.layer = g.nb_layer "
                      "AND n.neuron = g.nb_neuron WHERE g.layer = 0 AND g.neuron = 0 ORDER BY g.rank").fetchall()
    items = page.eval_on_selector_all("ol.atlas-nb li", "lis => lis.map(li => [li.firstChild.href, li.textContent])")
    step = 10.0 ** data["neighbours"]["cosine_exp"]
    assert len(items) == len(nbs) == 10 and step <= 1e-3
    for (href, text), (layer, n, cosine, label) in zip(items, nbs):
        assert href == f"{site_url}neurons/{layer}/{n}/", (href, layer, n)
        name, shown, *rest = text.split(" ", 2)
        assert name == f"L{layer}/N{n}" and rest == ([visible(label)] if visible(label) else []), (text, label)
        assert len(shown.split(".")[1]) == -data["neighbours"]["cosine_exp"] and abs(float(shown) - cosine) <= step / 2 + 1e-9, (shown, cosine)
    # The reproduce section: its heading, the home page for what every page shares, the snippet (test_cite_box...).
    assert page.text_content("#reproduce h2") == "Reproduce"
    assert page.eval_on_selector("#reproduce p a", "a => a.href") == site_url
    assert page.title() != "pwned" and page.errors == []


def test_evidence_comes_first_and_phones_scroll_no_page_sideways(site_url, browser):
    """At 1400 x 900 the first exemplar strip is on the first screen, above the decoded tables; at
    360 px wide no page (neuron, home, layer, cluster, search) scrolls sideways, and no neuron or
    cluster id in a table's first column breaks across lines ("L0/N14" over "9")."""
    page = _open(browser.new_context(viewport={"width": 1400, "height": 900}), site_url + "neurons/0/0/")
    strip = page.locator("ol.atlas-strips li").first.bounding_box()
    assert strip is not None and strip["y"] + strip["height"] <= 900, strip
    assert page.locator("#out").bounding_box()["y"] > strip["y"]
    page.wait_for_selector("[data-draw=reads][data-state=drawn]", state="attached", timeout=10_000)
    reads = page.locator("details.atlas-reads")
    assert reads.count() == 1 and not reads.evaluate("d => d.open")    # in and gate: folded, one click away
    assert reads.locator("summary").text_content() == "What it reads: in and gate"
    assert page.locator("details.atlas-reads #in, details.atlas-reads #gate").count() == 2
    assert not reads.locator("#in table.atlas-logits").first.is_visible()     # folded
    reads.locator("summary").click()
    assert reads.locator("#gate table.atlas-logits").first.is_visible()
    phone = browser.new_context(viewport={"width": 360, "height": 740})
    for path in ("neurons/0/0/", "", "layers/0/", "clusters/", "clusters/0/", "search/?q=enta"):
        page = _open(phone, site_url + path)
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 360, (path, width)
        # The test site's ids are too short to wrap at 360 px, so the rule is checked too.
        ids = page.eval_on_selector_all("table.atlas-compact td:first-child > a", """links => links.map(a =>
            [a.textContent, a.getClientRects().length, getComputedStyle(a).whiteSpace])""")
        assert all(n == 1 and ws == "nowrap" for _, n, ws in ids), (path, [i for i in ids if i[1:] != [1, "nowrap"]])
        assert page.errors == []


def test_the_search_page_leads_to_the_clusters_and_the_map(site_url, browser):
    """The search page's header links the pages a reader browses next, as cluster pages' do."""
    page = _open(browser.new_context(viewport={"width": 1400, "height": 900}), site_url + "search/")
    links = page.eval_on_selector_all("header nav a", "as => as.map(a => [a.textContent, a.href])")
    assert [t for t, _ in links][1:] == ["Search", "Clusters", "Map"], links
    for _, href in links[2:]:
        assert page.request.get(href).status == 200, href
    assert page.errors == []


_CONTRAST = """els => els.map(el => {
    const rgb = s => s.match(/[\\d.]+/g).slice(0, 3).map(Number).map(c => c / 255)
        .map(c => c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
    const lum = s => { const [r, g, b] = rgb(s); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
    const st = getComputedStyle(el), a = lum(st.color), b = lum(st.backgroundColor);
    return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
})"""
_ACT = r"-?(\d\.\d\d|\d\d\.\d|\d{3}|0\.0*[1-9]\d\d|\d\.\d\de[+-]\d+)"      # fmt_act: 3 significant digits


def test_strips_show_values_on_a_neuron_scale_with_a_legend(site_url, browser):
    """At least 10 strongest strips, each number in one format; every shaded token has its value
    on hover, shaded on the neuron's own zero-centred scale that the legend states, readable
    (contrast ≥ 4.5) in the light and slate schemes; the histogram has axes and a density line."""
    import re

    page = _open(browser.new_context(viewport={"width": 1400, "height": 900}), site_url + "neurons/1/3/")
    row = page.request.get(site_url + "neurons/1/3.json").json()["neurons"]
    scale = max(row["normaliser"], -row["act_min"])
    strongest = page.locator("ol.atlas-strips").first
    assert SHOWN_MAX >= 10 and strongest.locator("li").count() == SHOWN_MAX
    numbers = page.locator("ol.atlas-strips li > span").all_text_contents()
    assert numbers and all(re.fullmatch(_ACT, x) for x in numbers), numbers
    assert page.text_content(".atlas-cols span") == "act"
    legend = page.locator("h3 .atlas-legend").first.text_content()
    assert legend == f"{-scale:#.3g}{scale:#.3g}".replace(".e", "e"), legend
    shaded = page.locator("ol.atlas-strips i")
    assert shaded.count() > 0
    for cls, title in shaded.evaluate_all("els => els.map(e => [e.className, e.title])"):
        value = float(title)
        assert re.fullmatch(_ACT, title) and abs(value) >= scale / 6 * 0.99, (cls, title)     # near zero stays blank
        assert cls[0] == ("p" if value > 0 else "n") and int(cls[1]) == min(5, int(abs(value) * 6 / scale)), (cls, title)
    token = shaded.first
    token.hover()
    assert token.evaluate("e => getComputedStyle(e).outlineStyle") == "dotted"     # the hovered token, titled
    # Keyboard: a strip with shaded tokens is one tab stop that shows their values when focused.
    strip = strongest.locator("li:has(i[title])").first
    values = strip.locator(".atlas-sr")
    assert values.bounding_box()["width"] <= 1                   # hidden but read
    strip.focus()
    first = strip.locator("i[title]").first
    assert values.bounding_box()["width"] > 20 and f"{first.text_content().strip()} {first.get_attribute('title')}" in values.text_content()
    assert min(shaded.evaluate_all(_CONTRAST)) >= 4.5
    page.evaluate("document.body.setAttribute('data-md-color-scheme', 'slate')")
    assert min(shaded.evaluate_all(_CONTRAST)) >= 4.5
    assert min(page.locator("ol.atlas-strips b[class]").evaluate_all(_CONTRAST)) >= 4.5
    hist = page.locator("svg.atlas-hist")
    assert hist.bounding_box()["width"] >= 400
    ticks = hist.locator("text").all_text_contents()
    assert "0" in ticks and "activation" in ticks and "tokens (log)" in ticks
    assert re.search(r"≥ 0 on [\d.]+% of tokens", page.text_content("#corpus"))
    assert page.locator("#corpus script").count() == 0 and page.errors == []
