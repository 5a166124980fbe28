"""Hostile text: a site built from web-like text never runs it, and shows it escaped everywhere.

A tiny model whose vocabulary holds the hostile strings (one token per line of the corpus)
is run over a corpus made of them, so they reach every place a site shows text: decoded
token tables, neuron labels, exemplar strips, attribution, layer tables, cluster pages, map
hovers and the per-neuron JSON. The model directory and the corpus file have hostile names
too. Each payload sets ``window.__pwned`` if it ever runs; headless Chromium loads every page
with a trap on that name (checked against a page that does run one), hovers every map point,
and fails on any trap, dialog, event-handler attribute or ``javascript:`` URL.
"""

from __future__ import annotations

import json
import random
import re
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest

from atlas.resources import hostile
from atlas.site.neuron_json import table_rows, with_vocab
from helpers import FAULT_COUNTS, atlas, served, tiny_model

pytestmark = pytest.mark.faults
PAYLOADS = hostile("payloads")            # data/hostile.json: corpus and vocabulary text
VOCAB_ONLY = ["nul\x00byte", "<script>window.__pwned='vocab'</script>\x00"]    # NUL cannot be in a text corpus
MODEL_NAME = "model \"><svg onload=window.__pwned='model'>"
CORPUS_NAME = "corpus `x` [y](javascript:window.__pwned='path') <b>.txt"
MARKUP = set("<>&")            # a payload with one of these must never appear as it is in a file


def _hostile_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="removed")      # one token per corpus line
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    words = ["<unk>", "<s>", "</s>"] + PAYLOADS + VOCAB_ONLY + [f"w{i}" for i in range(16)]
    model = root / MODEL_NAME
    tiny_model("llama", vocab=len(words)).save_pretrained(model)
    _hostile_tokenizer(words).save_pretrained(model)
    rng = random.Random(0)
    corpus = root / CORPUS_NAME
    corpus.write_text("\n".join(rng.choice(PAYLOADS + [f"w{i}" for i in range(16)]) for _ in range(1500)),
                      encoding="utf-8")
    proc = atlas("build", "--out", root / "out", "--model", model, "--corpus", corpus, "--context", 16,
                     "--batch-size", 8, "--k", 5, "--attribution-rows", 8, "--quiet")
    assert proc.returncode == 0, proc.stderr
    for s in PAYLOADS + VOCAB_ONLY + [MODEL_NAME, CORPUS_NAME]:
        FAULT_COUNTS["hostile strings"].add(s)
    return root / "out" / "site"


def _texts(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(site.rglob("*")) if p.suffix in (".html", ".json", ".xml")}


_URL_ATTRS = {"href", "src", "action", "formaction", "srcdoc", "xlink:href", "poster", "data", "style"}


class _Markup(HTMLParser):
    """What a page's markup does, as opposed to what its text says."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.problems, self._script = [], None

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name.startswith("on") and (name, value) != ("onsubmit", "return false"):
                self.problems.append(f"<{tag} {name}>")
            # Text attributes (title, aria-label) may hold payload text; URLs and styles may not.
            if name in _URL_ATTRS and ("__pwned" in (value or "") or "javascript:" in (value or "").lower()):
                self.problems.append(f"<{tag} {name}={(value or '')[:40]!r}>")
        # The page's own <details class=atlas-reads> (in and gate, folded) is markup atlas writes;
        # an injected one would also need an on* attribute to act, which is caught above.
        own = tag == "details" and dict(attrs).get("class") == "atlas-reads"
        if tag in ("iframe", "object", "embed", "details", "animate", "img") and not own:
            self.problems.append(f"a <{tag}> element")
        self._script = dict(attrs).get("type", "") if tag == "script" else None

    def handle_data(self, data):
        if self._script is not None and self._script != "application/json" and "__pwned" in data:
            self.problems.append("a script that mentions __pwned")


def test_every_file_holds_the_text_escaped(hostile_site):
    texts = _texts(hostile_site)
    raw_controls = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
    for rel, text in texts.items():
        for s in PAYLOADS + VOCAB_ONLY + [MODEL_NAME, CORPUS_NAME]:
            if MARKUP & set(s):
                assert s not in text, (rel, s[:60])
        assert not raw_controls.search(text), (rel, raw_controls.search(text))
        if rel.endswith(".html"):
            markup = _Markup()
            markup.feed(text)
            assert not markup.problems, (rel, markup.problems)
    everything = "".join(texts.values())
    assert "&lt;script&gt;window.__pwned=&#39;script&#39;&lt;/script&gt;" in everything
    assert "⟨U+202E⟩evil" in everything                                   # bidi shown as a code point
    assert "&amp;lt;script&amp;gt;" in everything                         # pre-escaped text stays as typed
    # The model name: in the BibTeX entry every neuron page's script fills in (BibTeX-escaped, then JSON-escaped).
    assert r"\u003csvg onload=window.\\_\\_pwned='model'\u003e" in texts["atlas-site.json"]
    # The JSON keeps every string exactly, escaped only in form.
    tokens = set()
    for rel, text in texts.items():
        if re.fullmatch(r"neurons/\d+/\d+\.json", rel):
            data = with_vocab(json.loads(text), json.loads(texts["vocab.json"])["token"])
            tokens |= {r["token"] for r in table_rows(data, "decoded_tokens")}
            assert data["model"] == MODEL_NAME
    assert set(PAYLOADS) <= tokens, set(PAYLOADS) - tokens
    method = texts["method/index.html"]
    assert "href=\"javascript" not in method and "&#91;y&#93;&#40;javascript:" in method


@pytest.fixture(scope="module")
def browser_page(hostile_site, chromium):
    with served(hostile_site) as base:
        context = chromium.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        page.pwned, page.dialogs = [], []
        # A trap on the canary: any script that sets it, in any frame, at any time, is reported.
        page.add_init_script("""(() => {
            const hit = v => { try { console.error("PWNED:" + String(v)); } catch (e) {} };
            for (const w of [window, window.parent]) {
                try { Object.defineProperty(w, "__pwned", {configurable: false, get: () => undefined, set: hit}); }
                catch (e) {}
            }
        })();""")
        page.on("console", lambda m: page.pwned.append(m.text) if m.text.startswith("PWNED:") else None)
        page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
        page.base = base
        yield page
        context.close()


def _dom_problems(page) -> list[str]:
    return page.evaluate("""() => {
        const bad = [];
        for (const el of document.querySelectorAll("*")) {
            for (const a of el.attributes) {
                const name = a.name.toLowerCase(), value = a.value.trim().toLowerCase();
                if (name.startsWith("on") && !(name === "onsubmit" && value === "return false"))
                    bad.push(el.tagName + " has " + name);
                if (["href", "src", "action", "formaction", "xlink:href", "srcdoc", "poster", "data", "style"]
                        .includes(name) && (value.includes("javascript:") || value.includes("__pwned")))
                    bad.push(el.tagName + " " + name + "=" + value.slice(0, 60));
            }
            const own = el.tagName === "DETAILS" && el.className === "atlas-reads";   // atlas's own fold
            if (["IFRAME", "OBJECT", "EMBED", "DETAILS", "ANIMATE"].includes(el.tagName.toUpperCase()) && !own)
                bad.push("a " + el.tagName + " element");
            if (el.tagName === "SCRIPT" && el.textContent.includes("__pwned") && el.type !== "application/json")
                bad.push("a script that mentions __pwned");
        }
        return bad;
    }""")


@pytest.mark.browser
def test_the_canary_catches_a_script_that_runs(browser_page):
    page = browser_page
    page.goto(page.base)
    page.set_content("<img src=x onerror=\"window.__pwned='control'\">")
    page.wait_for_timeout(300)
    assert page.pwned == ["PWNED:control"]
    page.pwned.clear()


@pytest.mark.browser
def test_no_page_runs_injected_script(browser_page, hostile_site):
    page = browser_page
    pages = sorted(p.parent.relative_to(hostile_site).as_posix() for p in hostile_site.rglob("index.html"))
    assert len(pages) > 96 + 5                 # every neuron page, the frame, clusters and the map
    problems = {}
    for rel in pages:
        url = page.base + ("" if rel == "." else rel + "/")
        page.goto(url)
        if rel == "map":
            page.wait_for_selector("#atlas-map[data-ready]", timeout=60_000)   # drawn, and its handlers set
            _hover_every_point(page)
        if rel == "neurons/0/0":            # drawn from the JSON files, the model name as the BibTeX's text
            page.wait_for_selector("#atlas-bibtex:not([hidden])", timeout=10_000)
            assert r"<svg onload=window.\_\_pwned='model'>" in page.text_content("#atlas-bibtex")
        found = _dom_problems(page)
        if found:
            problems[rel] = found
    if (hostile_site / "search" / "index.html").is_file():      # the search page, where there is one
        for s in PAYLOADS:
            page.goto(page.base + "search/?q=" + urllib.parse.quote(s))
            page.wait_for_timeout(200)
            if found := _dom_problems(page):
                problems["search?q=" + s[:30]] = found
    page.wait_for_timeout(500)                  # late handlers (image errors, animations) have fired
    assert (problems, page.pwned, page.dialogs) == ({}, [], [])


def _hover_every_point(page) -> None:
    # The legend keeps a cluster to one line, however long its name (a payload of thousands of
    # characters once made it 6,000 px tall, pushing the map out of the window).
    assert page.locator("#atlas-map-legend").bounding_box()["height"] < 200
    page.locator("#atlas-map").scroll_into_view_if_needed()
    positions = page.evaluate("""() => {
        const el = document.getElementById("atlas-map"), n = Number(el.getAttribute("data-points"));
        return Array.from({length: n}, (_, i) => el.atlasScatter.project(i));
    }""")
    assert len(positions) == 96
    hovered = 0
    tip = "#atlas-map .atlas-scatter-tip"
    for x, y in positions:
        page.mouse.move(x, y)
        page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")   # hover picks per frame
        if page.locator(tip).is_visible():
            hovered += 1
            assert page.locator(f"{tip} script, {tip} img, {tip} a, {tip} iframe").count() == 0
    assert hovered > 48, hovered                 # most points show their hover (overlapping ones share one)
