"""The search page in headless Chromium: same ranking as `atlas search`, links that exist, escaping.

The site is served under a path prefix (/atlas/), as a publisher's host would, so every
link the page makes must be relative.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

import duckdb
import pytest

from atlas.bench.synthetic import make_synthetic_store
from atlas.config import RenderConfig
from atlas.site.render import render
from atlas.bench.synthetic import HOSTILE_LABELS
from atlas.site.index_format import SCHEMA, normalise
from atlas.site.search_query import match_words, search, status_line
from atlas.site.text import show_token, visible
from helpers import check_concepts, packed_shards, result_links, search_page, served, watch_errors

pytestmark = pytest.mark.browser
PREFIX = "atlas/"
NBSP_TOKEN = "\u00a0nbsp"


@pytest.fixture(scope="module")
def search_site(tmp_path_factory):
    """A synthetic atlas rendered under www/atlas/ and served from www/; yields (root, base URL of the site)."""
    root = tmp_path_factory.mktemp("search-site")
    store = make_synthetic_store(root / "atlas.duckdb", 3, 64, vocab_size=512, corpus=True, clamp=True)
    # As on a CPU budget: only some neurons were pushed, so results mix weighted and plain scores.
    with duckdb.connect(str(store)) as con:
        con.execute("UPDATE neurons SET clamp_value = NULL, clamp_lift = NULL, faithfulness = NULL WHERE neuron % 2 = 1")
        con.execute("DELETE FROM clamp_effects WHERE neuron % 2 = 1")
        # A token with a no-break space, which the page must show as the neuron pages do.
        token_id = con.execute("SELECT max(token_id) + 1 FROM vocab").fetchone()[0]
        con.execute("INSERT INTO vocab VALUES (?, ?, ?)", [token_id, NBSP_TOKEN, NBSP_TOKEN])
        con.execute("UPDATE decoded_tokens SET token = ?, token_id = ? WHERE layer = 1 AND neuron = 60 AND side = 'out' "
                    "AND polarity = 'top' AND rank = 0", [NBSP_TOKEN, token_id])
    render(store, root / "www" / PREFIX, RenderConfig(workers=1), progress=False)
    with served(root / "www") as base:
        yield root, base + PREFIX


def _some_terms(store: Path) -> list[str]:
    with duckdb.connect(str(store), read_only=True) as con:
        tokens = [t for (t,) in con.execute(
            "SELECT token FROM decoded_tokens WHERE side = 'out' AND polarity = 'top' AND rank = 0 "
            "AND layer = 2 AND neuron < 40 ORDER BY neuron").fetchall()]
    return [normalise(t) for t in tokens if normalise(t)]


def test_results_equal_the_cli_ranking_and_link_to_pages(search_site, browser):
    root, base = search_site
    site = root / "www" / PREFIX
    a, b, c = _some_terms(root / "atlas.duckdb")[:3]
    queries = [a, f" {b.upper()}", f"{a} {c}"]
    for query in queries:
        page = search_page(browser, base, query)
        links = result_links(page)
        want = search(site, query, limit=50)["hits"]
        assert len(links) == len(want) > 0
        assert [href for href, _ in links] == [f"../neurons/{h['layer']}/{h['neuron']}/" for h in want]
        for _, url in links:
            assert url.startswith(base + "neurons/")            # stays under the prefix
            assert (site / url.removeprefix(base) / "index.html").is_file()
        assert page.errors == []
        page.close()


def test_check_concepts_helper_on_a_synthetic_site(search_site, browser):
    root, _ = search_site
    terms = _some_terms(root / "atlas.duckdb")[3:6]
    found = check_concepts(browser, root / "www" / PREFIX, terms)
    assert sorted(found) == sorted(terms) and all(n > 0 for n in found.values())
    # The pages it compared show both kinds of result: pushed neurons and ones never measured.
    checks = {h["faithfulness"] is None for t in terms for h in search(root / "www" / PREFIX, t)["hits"]}
    assert checks == {True, False}


def test_the_form_makes_a_linkable_url(search_site, browser):
    root, base = search_site
    term = _some_terms(root / "atlas.duckdb")[0]
    page = search_page(browser, base, "")
    assert page.get_attribute("#atlas-search-results", "data-hits") == "0"
    page.fill("#atlas-search-q", term)
    with page.expect_navigation():
        page.press("#atlas-search-q", "Enter")
    assert page.url == base + "search/?q=" + urllib.parse.quote_plus(term)
    page.wait_for_selector("#atlas-search-status[data-state=done]")
    assert int(page.get_attribute("#atlas-search-results", "data-hits")) > 0
    assert page.input_value("#atlas-search-q") == term
    assert page.errors == []


def test_unknown_words_say_so(search_site, browser):
    root, base = search_site
    for query in ("zzzqqq", "constructor toString __proto__ hasOwnProperty"):   # not Object's own keys
        page = search_page(browser, base, query)
        # Only what the index holds: "constructor" is an English word, so it may have concept
        # matches, but no word finds anything through the shard object's prototype.
        want = search(root / "www" / PREFIX, query, limit=50)
        assert want["counts"].get("tostring", 0) == want["counts"].get("__proto__", 0) == 0
        assert page.get_attribute("#atlas-search-results", "data-hits") == str(len(want["hits"]))
        assert query.split()[0].lower() in page.text_content("#atlas-search-status")
        assert page.text_content("#atlas-search-status") == status_line(want)      # no reading from a prototype
        assert page.errors == []
        page.close()


def test_hostile_tokens_show_as_text(search_site, browser):
    _, base = search_site
    page = search_page(browser, base, "<script>alert(1)</script> <img src=x onerror=\"document.title='pwned'\">")
    assert int(page.get_attribute("#atlas-search-results", "data-hits")) > 0
    codes = page.eval_on_selector_all("#atlas-search-results code", "els => els.map(e => e.textContent)")
    assert "<script>alert(1)</script>" in codes
    assert page.locator("#atlas-search-results script, #atlas-search-results img").count() == 0
    assert page.title() != "pwned" and page.errors == []


def test_page_and_python_agree_on_terms_and_shards(search_site, browser, tmp_path):
    from atlas.site.index_format import OUT_TOP, SCHEMA, entry_postings, query_terms, shard_of
    from atlas.site.search_query import score

    _, base = search_site
    samples = [" Dog", "\u0120dog", "\u2581DOG", "dog.", "(Dog)", "don't", "\uff24\uff4f\uff47", "Stra\u00dfe", "ΟΔΟΣ",
               "\u0130stanbul", "caf\u0065\u0301", "\u202eevil", "  ", "dog\u0120", "\U0001F436dog\U0001F436",
               "new\u00a0york\u2028city", "a\u0085b", "<script>alert(1)</script>", "x" * 40]
    page = search_page(browser, base, "")
    got = page.evaluate("""samples => samples.map(s => [atlasSearch.normalise(s), atlasSearch.queryTerms(s),
                                                     atlasSearch.queryTerms(s).map(t => atlasSearch.shardOf(t, 4096))])""",
                        samples)
    want = [[normalise(s), query_terms(s), [shard_of(t, 4096) for t in query_terms(s)]] for s in samples]
    assert got == want
    # The index layout and the score: the same constants and integers on both sides.
    assert page.evaluate("[atlasSearch.schema, atlasSearch.pageSchema]") == [SCHEMA, SCHEMA]
    cases = [(s, src, c) for s in (0, 1, 49, 50, 149, 1234, 99999) for src in (0, OUT_TOP) for c in (-1, 0, 1, 49, 50, 99, 100)]
    assert page.evaluate(f"cases => cases.map(c => atlasSearch.score(c[0], c[1], c[2], {OUT_TOP}))", cases) == \
        [score(*c) for c in cases]
    # The packed postings: hand-made shards with hostile text and fields in several groups, and the site's own.
    folder, layout, _ = packed_shards(tmp_path / "idx")
    site_idx = search_site[0] / "www" / PREFIX / "search" / "idx"
    site_layout = json.loads((site_idx / "meta.json").read_text(encoding="utf-8"))["posting"]
    entries = [(e, layout) for f in sorted(folder.glob("*.json")) for e in json.loads(f.read_text(encoding="utf-8")).values()]
    entries += [(e, site_layout) for f in sorted(site_idx.glob("*.json"))[:8] if f.name != "meta.json"
                for e in json.loads(f.read_text(encoding="utf-8")).values()]
    assert any("e" in e for e, _ in entries) and len(entries) > 20
    got = page.evaluate("cases => cases.map(c => atlasSearch.entryPostings(c[0], c[1]))", [list(c) for c in entries])
    assert got == [[list(p) for p in entry_postings(e, lay)] for e, lay in entries]
    assert page.errors == []


def test_an_index_of_another_schema_is_refused_in_words(search_site, browser, tmp_path):
    """A stale cached script must not misread a newer index: the page says what is wrong."""
    import shutil

    root, base = search_site
    site = root / "www" / PREFIX
    meta_path = site / "search" / "idx" / "meta.json"
    saved = tmp_path / "meta.json"
    shutil.copy2(meta_path, saved)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta_path.write_text(json.dumps({**meta, "schema": 1}), encoding="utf-8")
        term = _some_terms(root / "atlas.duckdb")[0]
        page = browser.new_page()                       # a new context: nothing cached
        page.goto(base + "search/?q=" + urllib.parse.quote(term))
        page.wait_for_selector("#atlas-search-status[data-state=error]", timeout=60_000)
        status = page.text_content("#atlas-search-status")
        assert "schema 1" in status and f"reads {SCHEMA}" in status, status
        assert result_links(page) == []
        page.close()
    finally:
        shutil.copy2(saved, meta_path)


def _dom_hits(page) -> list[dict]:
    """Each listed hit as the page shows it: link, label, and the text of each match line."""
    return page.eval_on_selector_all("#atlas-search-results li", """els => els.map(li => ({
        href: li.querySelector('a').getAttribute('href'),
        label: li.querySelector('.atlas-search-label').textContent,
        matches: Array.from(li.querySelectorAll('.atlas-search-match')).map(m => m.textContent),
        dirs: Array.from(li.querySelectorAll('.atlas-search-dir')).map(m => m.textContent)}))""")


def _want(site: Path, query: str, direction: str | None = None) -> list[dict]:
    return [{"href": f"../neurons/{h['layer']}/{h['neuron']}/", "label": visible(h["label"]) if h["label"] else "no label yet",
             "matches": [match_words(m) for m in h["matches"]]}
            for h in search(site, query, limit=50, direction=direction)["hits"]]


def test_hits_show_label_direction_and_why(search_site, browser):
    root, base = search_site
    site = root / "www" / PREFIX
    # A term whose best neurons match it literally (word vectors put some synthetic syllables
    # near each other, and concept matches of many such terms would fill the list).
    term = next(t for t in _some_terms(root / "atlas.duckdb")[1:]
                if not any(m["source"] in ("concept", "concept fires") for h in search(site, t, limit=50)["hits"]
                           for m in h["matches"]))
    page = search_page(browser, base, term)
    got = _dom_hits(page)
    assert [{k: g[k] for k in ("href", "label", "matches")} for g in got] == _want(site, term)
    # The words name the direction: a top `out` token is promoted, a bottom one suppressed, in/gate ones read.
    dirs = {d.split(" \u2018")[0] for g in got for d in g["dirs"]}     # a concept match names its word
    assert {"promotes", "suppresses", "reads"} <= dirs
    assert dirs <= {"promotes", "suppresses", "reads", "fires on", "fires most negatively on", "promotes words near"}
    assert any(g["label"].startswith("synthetic ") for g in got)
    assert page.text_content("#atlas-search-status") == status_line(search(site, term, limit=50))
    assert page.errors == []
    page.close()


@pytest.fixture(scope="module")
def concept_site(tmp_path_factory):
    """A synthetic atlas with concept postings, one of whose words the model read the word
    "parole" as (an accepted reading); yields (site, the word, base URL)."""
    root = tmp_path_factory.mktemp("concept-site")
    store = make_synthetic_store(root / "atlas.duckdb", 2, 32, vocab_size=512, concepts=20)
    first, site = root / "first", root / "www"
    with duckdb.connect(str(store)) as con:
        words = [w for (w,) in con.execute("SELECT DISTINCT word FROM concept_postings ORDER BY word").fetchall()]
    render(store, first, RenderConfig(workers=1), progress=False)
    # A word whose list holds concept matches of both sides: the tokens a neuron writes and those it fires on.
    word = next(w for w in words if {"concept", "concept fires"} <= {m["source"] for h in search(first, w, limit=50)["hits"]
                                                                    for m in h["matches"]})
    with duckdb.connect(str(store)) as con:      # as the labels stage would have kept it
        con.execute("INSERT INTO concept_translations VALUES ('parole', 'fr', ?, 0.9, true)", [word])
    render(store, site, RenderConfig(workers=1), progress=False)
    with served(site) as base:
        yield site, word, base


def test_a_concept_match_shows_a_strength_not_sigmas(concept_site, browser):
    """A literal match's strength is in σ of the neuron's own logits; a concept match's is a score
    made from such strengths, and the page and `atlas search` say so alike."""
    site, term, base = concept_site
    page = search_page(browser, base, term)
    got = _dom_hits(page)
    assert [{k: g[k] for k in ("href", "label", "matches")} for g in got] == _want(site, term)
    assert page.errors == []
    page.close()
    lines = [m for g in got for m in g["matches"]]
    concept = [m for m in lines if re.search(r", concept (fires )?#", m)]
    other = [m for m in lines if not re.search(r", concept (fires )?#", m)]
    assert concept and all(re.search(r", concept (fires )?#\d+, strength \d+\.\d\d$", m) for m in concept), concept
    # Both sides, each in its own words: the tokens a neuron writes, and those it fires on.
    assert any(m.startswith("promotes words near \u2018" + term + "\u2019 via ") for m in concept), concept
    assert any(m.startswith("fires on words near \u2018" + term + "\u2019 in the corpus via ") for m in concept), concept
    assert all(re.search(r" #\d+, \d+\.\d\d\u03c3$", m) for m in other), other


def test_a_word_the_model_reads_as_english_shows_that_words_neurons(concept_site, browser):
    """The page lists what `atlas search` lists for a word of another language, and says what the
    model reads it as."""
    site, word, base = concept_site
    page = search_page(browser, base, "parole")
    want = search(site, "parole", limit=50)
    assert want["aliases"] == {"parole": [word, "French"]} and want["hits"]
    assert [{k: g[k] for k in ("href", "label", "matches")} for g in _dom_hits(page)] == _want(site, "parole")
    assert page.text_content("#atlas-search-status") == status_line(want)
    assert "(the model's French for \u2018" + word + "\u2019)" in status_line(want)
    assert page.errors == []
    page.close()


def test_direction_filter_changes_the_list_and_the_url(search_site, browser):
    root, base = search_site
    site = root / "www" / PREFIX
    term = _some_terms(root / "atlas.duckdb")[2]
    page = search_page(browser, base, term)
    everything = _dom_hits(page)
    page.get_by_label("suppresses", exact=True).check()
    page.wait_for_function("location.search.includes('dir=suppresses')")
    page.wait_for_selector("#atlas-search-status[data-state=done]")
    suppressing = _dom_hits(page)
    assert suppressing != everything
    assert [{k: g[k] for k in ("href", "label", "matches")} for g in suppressing] == _want(site, term, "suppresses")
    assert {d for g in suppressing for d in g["dirs"]} == {"suppresses"}
    assert page.text_content("#atlas-search-status") == status_line(search(site, term, limit=50, direction="suppresses"))
    assert " suppress it" in page.text_content("#atlas-search-status")
    # Keyboard: the radio group moves with the arrow keys, and the URL follows.
    page.focus("input[name=dir][value=suppresses]")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("location.search.includes('dir=reads')")
    assert page.is_checked("input[name=dir][value=reads]")
    page.close()
    # The link shares the filter: opened afresh it shows the same list with its radio checked.
    page = watch_errors(browser.new_page())
    page.goto(base + "search/?" + urllib.parse.urlencode({"q": term, "dir": "promotes"}))
    page.wait_for_selector("#atlas-search-status[data-state=done]")
    assert page.is_checked("input[name=dir][value=promotes]")
    assert [g["href"] for g in _dom_hits(page)] == [w["href"] for w in _want(site, term, "promotes")]
    assert page.errors == []
    page.close()


def test_the_bench_counts_the_index_files_the_page_fetches(search_site, browser):
    """`atlas bench search`'s bytes per query are those of the files the page asks for: for two words,
    the meta, each word's shard and the whole phrase's (its label files are counted apart)."""
    from atlas.bench.search import query_files
    from atlas.site.index_format import shard_of

    root, base = search_site
    idx = root / "www" / PREFIX / "search" / "idx"
    meta = json.loads((idx / "meta.json").read_text(encoding="utf-8"))
    n = meta["shards"]
    terms = _some_terms(root / "atlas.duckdb")
    # two words whose phrase lies in a shard of its own, which counting the words alone would miss
    a, b = next((a, b) for a in terms for b in terms
                if a != b and shard_of(f"{a} {b}", n) not in {shard_of(a, n), shard_of(b, n)})
    for query in (a, f"{a} {b}", f"{b} {a} {a}"):
        page = watch_errors(browser.new_page())
        asked = []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(base + "search/?q=" + urllib.parse.quote(query))
        page.wait_for_selector("#atlas-search-status[data-state=done]", timeout=60_000)
        fetched = sorted({u.split("/search/idx/", 1)[1] for u in asked if "/search/idx/" in u and "/labels/" not in u})
        assert fetched == sorted(f.name for f in query_files(idx, meta, query)), query
        assert page.errors == []
        page.close()


def test_two_words_rank_neurons_matching_both_first(search_site, browser):
    root, base = search_site
    site = root / "www" / PREFIX
    with duckdb.connect(str(root / "atlas.duckdb"), read_only=True) as con:
        tokens = [t for (t,) in con.execute("SELECT token FROM decoded_tokens WHERE layer = 1 AND neuron = 5 "
                                            "AND side = 'out' AND polarity = 'top' ORDER BY rank").fetchall()]
    a, b = list(dict.fromkeys(normalise(t) for t in tokens if normalise(t)))[:2]
    page = search_page(browser, base, f"{a} {b}")
    got = _dom_hits(page)
    both = [len({m.split("\u2018")[-1].split("\u2019")[0] for m in g["matches"]}) == 2 for g in got]
    assert both[0] and both == sorted(both, reverse=True)       # every neuron matching both words comes first
    assert "../neurons/1/5/" in [g["href"] for g, two in zip(got, both) if two]
    assert [{k: g[k] for k in ("href", "label", "matches")} for g in got] == _want(site, f"{a} {b}")
    assert "match every word" in page.text_content("#atlas-search-status")
    assert page.errors == []
    page.close()


def test_hostile_labels_show_as_text(search_site, browser):
    root, base = search_site
    site = root / "www" / PREFIX
    query = "<script>alert(1)</script>"
    page = search_page(browser, base, query)
    labels = page.eval_on_selector_all(".atlas-search-label", "els => els.map(e => e.textContent)")
    # As the neuron pages show them: on one line, control and direction characters as code points.
    want = [visible(h["label"]) if h["label"] else "no label yet" for h in search(site, query, limit=50)["hits"]]
    assert labels == want and set(labels) & {visible(label) for label in HOSTILE_LABELS}
    # A label with a line break shows on one line: the neuron that has it, found by its top token.
    i = next(i for i, label in enumerate(HOSTILE_LABELS) if "\n" in label)
    with duckdb.connect(str(root / "atlas.duckdb"), read_only=True) as con:
        token = con.execute("SELECT token FROM decoded_tokens WHERE layer = 0 AND neuron = ? AND side = 'out' "
                            "AND polarity = 'top' AND rank = 0", [i]).fetchone()[0]
    page.close()
    page = search_page(browser, base, normalise(token))
    labels = page.eval_on_selector_all(".atlas-search-label", "els => els.map(e => e.textContent)")
    assert visible(HOSTILE_LABELS[i]) in labels and visible(HOSTILE_LABELS[i]) != HOSTILE_LABELS[i]
    assert page.locator("#atlas-search-results script, #atlas-search-results img, #atlas-search-results iframe").count() == 0
    assert page.title() != "pwned" and page.errors == []
    page.close()


def test_results_fit_a_phone_and_a_desktop(search_site, browser, tmp_path_factory):
    """Screenshots at 1400 and 360 px (kept in the test's tmp folder); at 360 px nothing scrolls sideways."""
    root, base = search_site
    shots = tmp_path_factory.mktemp("search-shots")
    term = _some_terms(root / "atlas.duckdb")[0]
    for width in (1400, 360):
        page = watch_errors(browser.new_page(viewport={"width": width, "height": 900}))
        page.goto(base + "search/?" + urllib.parse.urlencode({"q": f"{term} <script>alert(1)</script>"}))
        page.wait_for_selector("#atlas-search-status[data-state=done]")
        page.screenshot(path=str(shots / f"search-{width}.png"), full_page=False)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        assert page.errors == []
        page.close()


def test_tokens_show_as_the_neuron_pages_show_them(search_site, browser):
    """A no-break space in a token is shown as its code point, as text.show_token does (atlas-text.js is its twin)."""
    root, base = search_site
    page = search_page(browser, base, "nbsp")
    codes = page.eval_on_selector_all("#atlas-search-results code", "els => els.map(e => e.textContent)")
    assert show_token(NBSP_TOKEN) == "\u27e8U+00A0\u27e9nbsp" and show_token(NBSP_TOKEN) in codes
    assert page.errors == []
    page.close()
