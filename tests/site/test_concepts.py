"""Concept search and concept labels on a small store whose neurons decode to known words (real word vectors)."""

from __future__ import annotations

import json

import duckdb
import pytest

from atlas import wordvec
from atlas.config import LabelsConfig, RenderConfig
from atlas.site.render import render
from atlas.site.index_format import INDEX_DIR, META_NAME
from atlas.site.search import write_index
from atlas.site.search_query import match_words, search, status_line
from atlas.stages import STAGES
from atlas.stages.contract import Context
from atlas.stages.labels import merged_tokens
from atlas.store import Store
from helpers import CONCEPT_NEURONS, concept_store, result_links, search_page, served

pytestmark = pytest.mark.skipif(wordvec.package_dir() is None, reason="wordllama is not installed (scripts/setup)")
# These stores are synthetic, with no model behind them to ask for examples: word vectors only.
WORD_VECTORS_ONLY = LabelsConfig(label_examples=0)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    store = concept_store(tmp_path_factory.mktemp("concepts") / "atlas.duckdb")
    with duckdb.connect(str(store)) as con:
        # A neuron that writes " animal" weakly: 16th of its top `out` tokens, at its own logit there.
        con.execute("UPDATE decoded_tokens SET token = v.token, token_id = v.token_id FROM vocab v "
                    "WHERE v.token = ' animal' AND layer = 0 AND neuron = 50 AND side = 'out' AND polarity = 'top' "
                    "AND rank = 15")
    with Store(store) as s:
        STAGES["labels"].run(Context(s, STAGES["labels"], "sha256:0", get_lm=None, progress=False), WORD_VECTORS_ONLY)
    render(store, store.parent / "site", RenderConfig(workers=1, exports=False),
           progress=False)
    return store.parent / "site"


def hits(site, query):
    return {(h["layer"], h["neuron"]): h for h in search(site, query, limit=50)["hits"]}


def test_a_category_finds_neurons_whose_tokens_are_its_members(site):
    found = hits(site, "animal")
    animals = found[(1, 5)]                               # bird, mammal, monkey ...: no token spells "animal"
    concept = [m for m in animals["matches"] if m["source"] == "concept"]
    assert concept and {"bird", "mammal"} <= set(concept[0]["token"].split(", "))
    assert found[(0, 7)]["matches"][0]["source"] == "out top"     # decodes to " animal" itself
    colour = hits(site, "colour")                         # British spelling; tokens red, blue, ...
    assert (1, 9) in colour and colour[(1, 9)]["matches"][0]["source"] == "concept"
    assert (1, 9) not in found and (1, 5) not in colour
    # " eleph", "itarian", " veterin" ... are pieces of animal words, near "animal" in the word
    # vectors by spelling: not words, so no evidence of anything.
    assert (1, 30) not in found


def test_literal_matches_come_first_when_they_are_the_best_evidence(site):
    found = hits(site, "animal")
    # (0, 7) writes " animal" at the top; (1, 5)'s five members at about that strength sum to
    # less cosine with "animal" than the word itself (1): the literal match first, the concept next.
    assert list(found)[:2] == [(0, 7), (1, 5)]
    assert [m["source"] for m in found[(0, 7)]["matches"]] == ["out top"]
    assert [m["source"] for m in found[(1, 5)]["matches"]] == ["concept"]
    # A concept match whose evidence is overwhelming beside a weak spelling still wins: (0, 50)
    # writes " animal" only 16th, at 2-3 sigma.
    assert found[(0, 50)]["matches"][0]["source"] == "out top" and found[(0, 50)]["matches"][0]["rank"] == 15
    order = list(found)
    assert order.index((1, 5)) < order.index((0, 50))
    # " bird" is (1, 5)'s top token: it comes first for "bird", with its literal match shown
    # (its concept evidence for "bird" adds to it), ahead of any concept match.
    bird = hits(site, "bird")
    first = next(iter(bird.values()))
    assert (first["layer"], first["neuron"]) == (1, 5) and first["matches"][0]["source"] == "out top"
    assert first["matches"][0]["token"] == " bird"


def test_concept_matches_need_words_that_are_no_function_words(site):
    from atlas import lexicon
    from atlas.site.concept_source import vocabulary
    from atlas.site.index_format import normalise

    if lexicon.load()[0] is None:
        pytest.skip("pyspellchecker is not installed (scripts/setup)")
    with duckdb.connect(str(site.parent / "atlas.duckdb"), read_only=True) as con:
        vocab = vocabulary(con, normalise, True, wordvec.load()[0], lexicon.load()[0])
    assert {"monkey", "mammal", "shark"} <= vocab.words and not {"eleph", "itarian", "veterin"} & vocab.words
    assert {"which", "might", "the"} <= vocab.function and "animal" not in vocab.function
    # A word piece gets no concept postings of its own; a whole word of the word vectors does ("colour").
    assert "itarian" not in vocab.query and {"animal", "colour"} <= set(vocab.query)
    for word in ("which", "might"):             # the function-word neuron L1/N40 matches only literally
        assert all(m["source"] != "concept" for h in hits(site, word).values() for m in h["matches"])


def test_index_says_which_resource_made_its_concept_matches(site, tmp_path):
    meta = json.loads((site / INDEX_DIR / META_NAME).read_text())
    assert meta["concepts"]["resource"]["name"] == "wordllama" and meta["concepts"]["postings"] > 0
    store = site.parent / "atlas.duckdb"
    with duckdb.connect(str(store), read_only=True) as con:
        info = write_index(con, tmp_path / INDEX_DIR, postings=10, concepts=False)
    assert "concepts" not in info
    assert json.loads((tmp_path / INDEX_DIR / META_NAME).read_text())["concepts"] is None


def test_concept_matches_are_the_labels_stages_rows_and_need_them(site, tmp_path):
    """The index's concept matches are the store's concept_postings, which the labels stage writes;
    a store whose labels ran before there were any says to rerun them, and the stage would."""
    import shutil

    store = tmp_path / "atlas.duckdb"
    shutil.copy(site.parent / "atlas.duckdb", store)
    with duckdb.connect(str(store), read_only=True) as con:
        kept = con.execute("SELECT count(*), count(DISTINCT word) FROM concept_postings").fetchone()
        animal = con.execute("SELECT layer, neuron, evidence FROM concept_postings WHERE word = 'animal' "
                             "ORDER BY z DESC").fetchall()
    meta = json.loads((site / INDEX_DIR / META_NAME).read_text())
    assert kept[0] > 0 and (meta["concepts"]["postings"], meta["concepts"]["words"]) == kept
    assert any("mammal" in evidence.split(", ") for _, _, evidence in animal)
    with Store(store) as s:
        labels = STAGES["labels"]
        ctx = Context(s, labels, "sha256:0", get_lm=None, progress=False)
        record = ctx.record()
        # As a labels stage of v4 left it: no postings, and a fingerprint made without them.
        old = {**{k: v for k, v in record.items() if k != "concept_postings"}, "fingerprint": "0" * 16}
        s.set_meta("stage.labels", old)
        with s.transaction() as con:
            con.execute("DELETE FROM concept_postings")
    with duckdb.connect(str(store), read_only=True) as con:
        info = write_index(con, tmp_path / INDEX_DIR, postings=10)
    assert "run `atlas labels` again" in info["concepts"]["missing"]
    with Store(store) as s:
        assert STAGES["labels"].run(Context(s, STAGES["labels"], "sha256:0", get_lm=None, progress=False),
                                    WORD_VECTORS_ONLY).get("skipped") is None
        assert s.count("concept_postings") == kept[0]


def test_labels_name_the_concept_merge_variants_and_are_stored(site):
    assert merged_tokens([" dog", " Dogs", "Dogs", "dog.", " cat"]) == ["dog", "cat"]
    with duckdb.connect(str(site.parent / "atlas.duckdb"), read_only=True) as con:
        rows = {(r[0], r[1]): r[2:] for r in con.execute(
            "SELECT layer, neuron, label, concept, evidence, tokens, method FROM neuron_labels").fetchall()}
        public = dict(((r[0], r[1]), r[2]) for r in con.execute("SELECT layer, neuron, label FROM neurons").fetchall())
        record = json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = 'stage.labels'").fetchone()[0])
    assert len(rows) == 128 and all(public[k] == v[0] for k, v in rows.items())
    label, concept, evidence, tokens, method = rows[(1, 9)]
    assert concept and label == f"{concept}: {', '.join(evidence[:3])}" and {"red", "blue"} & set(evidence)
    assert method == "word vectors" and tokens == [t.strip() for t in CONCEPT_NEURONS[(1, 9)]] + tokens[5:]
    assert rows[(1, 20)][3][:1] == ["dog"] and "Dogs" not in rows[(1, 20)][3]
    assert any(v[0].startswith("no clear concept: ") and v[1] is None for v in rows.values())
    # Neither word pieces nor function words name a concept, and no name is a function word.
    assert rows[(1, 30)][1] is None and rows[(1, 40)][1] is None
    assert not {v[1] for v in rows.values()} & {"which", "might", "both", "would", "the"}
    assert record["resource"]["name"] == "wordllama" and record["resource"]["version"]


@pytest.mark.browser
def test_search_page_lists_the_animal_neurons_with_their_evidence(site, browser):
    with served(site) as base:
        page = search_page(browser, base, "animal")
        hrefs = [href for href, _ in result_links(page)]
        assert hrefs[:2] == ["../neurons/0/7/", "../neurons/1/5/"]    # the literal match first
        text = page.locator("#atlas-search-results li", has_text="L1 / N5").inner_text()
        assert "promotes words near \u2018animal\u2019 via" in text and "bird" in text and "mammal" in text
        assert "concept #0" in text
        assert "../neurons/1/30/" not in hrefs                  # word pieces are no evidence
        assert page.errors == []


def test_clusters_by_term_profile_share_more_words_than_by_out_direction(tmp_path):
    from atlas.bench.concepts import cluster_coherence
    from atlas.bench.synthetic import synthetic_directions
    from atlas.config import ClusterConfig
    from atlas.stages.cluster import cluster_store

    store = concept_store(tmp_path / "atlas.duckdb")
    ratios = {}
    with Store(store) as s:
        for on in ("out", "terms"):
            ctx = Context(s, STAGES["cluster"], "sha256:0", get_lm=None, progress=False)
            cluster_store(ctx, ClusterConfig(n_clusters=8, cluster_on=on, neighbours=2),
                          lambda: synthetic_directions(2, 64, 32, seed=1))
            ratios[on] = cluster_coherence(s.con, pairs=2000)
            assert json.loads(s.con.execute("SELECT value FROM atlas_meta WHERE key = 'stage.cluster'")
                              .fetchone()[0])["grouped_by"] == on
    # The synthetic tokens are drawn apart from the directions: only the term profiles see them
    # (measured: 0.050 against 0.041 and 0.040 for random pairs; the default atlas's figures are in the README).
    assert ratios["terms"]["within"] > 1.15 * ratios["out"]["within"], ratios
    assert abs(ratios["out"]["ratio"] - 1) < 0.1


FAMILY = [" father", " mother", " sister", " brother", " parents"]


def _fires_on(con, neuron: tuple[int, int], tokens: list[str], exemplars: int = 20) -> None:
    """The neuron's top ``exemplars`` peak on ``tokens`` in turn (the rest of its exemplars keep their made-up words)."""
    doc = con.execute("SELECT max(doc_id) + 1 FROM corpus_docs").fetchone()[0]
    ids = []
    for token in tokens:
        found = con.execute("SELECT token_id FROM vocab WHERE token = ?", [token]).fetchone()
        if found is None:
            found = con.execute("SELECT max(token_id) + 1 FROM vocab").fetchone()
            con.execute("INSERT INTO vocab VALUES (?, ?, ?)", [found[0], token, token])
        ids.append(found[0])
    con.execute("INSERT INTO corpus_docs (doc_id, source, text, token_ids) VALUES (?, 'test', ?, ?)",
                [doc, "".join(tokens), ids])
    for rank in range(exemplars):
        con.execute("UPDATE exemplars SET doc_id = ?, token_pos = ? WHERE layer = ? AND neuron = ? "
                    "AND polarity = 'max' AND rank = ?", [doc, rank % len(tokens), *neuron, rank])


def test_a_neuron_that_writes_no_concept_is_named_by_the_words_it_fires_on(tmp_path):
    store = concept_store(tmp_path / "atlas.duckdb", corpus=True)
    labels = STAGES["labels"]
    with Store(store) as s:
        con = s.con
        # The synthetic corpus's made-up words would be words of the query vocabulary ("supa"): no text.
        con.execute("UPDATE corpus_docs SET text = ''")
        _fires_on(con, (0, 3), FAMILY)                 # all 20 exemplars on family words
        _fires_on(con, (1, 9), FAMILY)                 # writes colours: its `out` terms come first
        _fires_on(con, (0, 4), FAMILY[:3], exemplars=3)   # 3 of 20: too few of its exemplars for a name
        labels.run(Context(s, labels, "sha256:0", get_lm=None, progress=False), WORD_VECTORS_ONLY)
        rows = {(r[0], r[1]): r[2:] for r in con.execute(
            "SELECT layer, neuron, label, concept, evidence, method FROM neuron_labels").fetchall()}
        record = json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = 'stage.labels'").fetchone()[0])
        label, concept, evidence, method = rows[(0, 3)]
        assert method == "exemplars: word vectors" and concept, rows[(0, 3)]
        assert label == f"fires on {concept}: {', '.join(evidence[:3])}" and len(evidence) >= 2
        assert set(evidence) <= {t.strip() for t in FAMILY} | {"parent"}, evidence
        assert con.execute("SELECT label FROM neurons WHERE layer = 0 AND neuron = 3").fetchone()[0] == label
        assert rows[(1, 9)][3] == "word vectors" and not rows[(1, 9)][0].startswith("fires on")
        assert rows[(0, 4)][1] is None and rows[(0, 4)][0].startswith("no clear concept: ")
        fired = [k for k, v in rows.items() if v[3].startswith("exemplars")]
        assert record["concept_from_exemplars"] == len(fired) >= 1
        assert record["concepts_exemplar_names"] >= len(fired)
        # Without them the stage runs again (its fingerprint differs) and the neuron has no concept.
        labels.run(Context(s, labels, "sha256:0", get_lm=None, progress=False),
                   LabelsConfig(label_examples=0, label_exemplars=False))
        assert con.execute("SELECT concept, method FROM neuron_labels WHERE layer = 0 AND neuron = 3").fetchone() \
            == (None, "word vectors: none")


def test_a_word_finds_the_neurons_that_fire_on_its_members_and_says_so(tmp_path):
    """Concept matches of the tokens a neuron fires on: 'family' finds the neuron whose exemplars
    peak on father, mother, sister ..., in the reads direction, with those words as its evidence."""
    store = concept_store(tmp_path / "atlas.duckdb", corpus=True)
    labels = STAGES["labels"]
    with Store(store) as s:
        con = s.con
        con.execute("UPDATE corpus_docs SET text = ''")     # no made-up corpus words in the vocabulary
        _fires_on(con, (0, 3), FAMILY)
        _fires_on(con, (1, 5), [" dog", " cat", " horse", " puppy"])     # writes animals, fires on them too
        labels.run(Context(s, labels, "sha256:0", get_lm=None, progress=False), WORD_VECTORS_ONLY)
        stored = {(r[0], r[1], r[2]): r[3] for r in con.execute(
            "SELECT side, layer, neuron, evidence FROM concept_postings WHERE word = 'family'").fetchall()}
        sides = dict(con.execute("SELECT side, count(*) FROM concept_postings GROUP BY side").fetchall())
    family = {t.strip() for t in FAMILY} | {"parent"}
    assert set(stored[("exemplars", 0, 3)].split(", ")) <= family and sides["out"] and sides["exemplars"]
    assert ("out", 0, 3) not in stored            # it writes no family words
    render(store, store.parent / "site", RenderConfig(workers=1, exports=False), progress=False)
    site = store.parent / "site"
    # The method page says how labels are made, and how many came from each side here.
    with duckdb.connect(str(store), read_only=True) as con:
        named, fired = con.execute("SELECT count(concept), count(concept) FILTER (WHERE method LIKE 'exemplars%') "
                                   "FROM neuron_labels").fetchone()
    method = " ".join((site / "method" / "index.html").read_text(encoding="utf-8").split())
    assert "From the tokens it fires on" in method and fired >= 1
    assert f"Here: {named} of 128 neurons have a concept, {fired} of them from the tokens they fire on." in method
    match = next(m for m in hits(site, "family")[(0, 3)]["matches"] if m["source"] == "concept fires")
    assert match["direction"] == "reads" and set(match["token"].split(", ")) <= family
    assert match_words(match).startswith("fires on words near \u2018family\u2019 in the corpus via ")
    assert match_words(match).endswith(f", concept fires #{match['rank']}, strength {match['strength']:.2f}")
    found = {d: {(h["layer"], h["neuron"]) for h in search(site, "family", limit=50, direction=d)["hits"]}
             for d in ("reads", "promotes")}
    assert (0, 3) in found["reads"] and (0, 3) not in found["promotes"]
    # A neuron that writes a category's members and fires on them is in both directions' lists,
    # each with its match of that direction, and once, with its best match, in the whole list.
    animal = {d: {(h["layer"], h["neuron"]): h for h in search(site, "animal", limit=50, direction=d)["hits"]}
              for d in (None, "reads", "promotes")}
    assert [m["source"] for m in animal["promotes"][(1, 5)]["matches"]] == ["concept"]
    assert [m["source"] for m in animal["reads"][(1, 5)]["matches"]] == ["concept fires"]
    assert len(animal[None][(1, 5)]["matches"]) == 1


def test_a_cluster_is_named_by_the_concept_its_members_share(tmp_path):
    from atlas.bench.synthetic import synthetic_directions
    from atlas.config import ClusterConfig
    from atlas.stages.cluster import cluster_store, write_labels
    from atlas.stages.labels import cluster_names, name_clusters

    store = concept_store(tmp_path / "atlas.duckdb")
    colours = CONCEPT_NEURONS[(1, 9)]
    with Store(store) as s:
        con = s.con
        # Two more neurons write the same colours in other orders: three members share them.
        for neuron, order in ((6, [2, 0, 4, 1, 3]), (7, [4, 3, 0, 2, 1])):
            for rank, i in enumerate(order):
                con.execute("UPDATE decoded_tokens SET token = v.token, token_id = v.token_id FROM vocab v "
                            "WHERE v.token = ? AND layer = 1 AND neuron = ? AND side = 'out' AND polarity = 'top' "
                            "AND rank = ?", [colours[i], neuron, rank])
        ctx = Context(s, STAGES["cluster"], "sha256:0", get_lm=None, progress=False)
        cluster_store(ctx, ClusterConfig(n_clusters=8, neighbours=2), lambda: synthetic_directions(2, 64, 32, seed=1))
        # The three in a cluster of their own and a fourth member, the animal neuron, which shares nothing.
        con.execute("UPDATE neurons SET cluster_id = 8 WHERE layer = 1 AND neuron IN (5, 6, 7, 9)")
        con.execute("INSERT INTO clusters (cluster_id, size) VALUES (8, 4)")
        write_labels(con, exemplars=False)                  # the cluster stage's token labels of these members
        token_labels = dict(con.execute("SELECT cluster_id, label FROM clusters").fetchall())
        con.execute("UPDATE clusters SET label = 'stale'")
        STAGES["labels"].run(Context(s, STAGES["labels"], "sha256:0", get_lm=None, progress=False), WORD_VECTORS_ONLY)
        labels = dict(con.execute("SELECT cluster_id, label FROM clusters").fetchall())
        record = json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = 'stage.labels'").fetchone()[0])
        name = labels[8]
        word, rest = name.split(" (", 1)
        # The concept, the members with an evidence term (3 of the 4), then evidence that is not the concept.
        assert rest.startswith("3 of 4): ") and word not in rest, name
        evidence = rest.split("): ")[1].split(", ")
        assert len(evidence) == 3 and set(evidence) <= {c.strip() for c in colours}, name
        assert record["clusters_named"] == sum(" of " in v for v in labels.values()) >= 1
        # Clusters without a shared concept keep the cluster stage's token labels (none stays stale).
        assert all(labels[c] == token_labels[c] for c in labels if " of " not in labels[c])
        # A name never outlives its concept: naming again without it gives the token label back.
        name_clusters(con, cluster_names({}), exemplar_votes=False)
        assert con.execute("SELECT label FROM clusters WHERE cluster_id = 8").fetchone()[0] == token_labels[8] != name


def test_a_cluster_without_a_concept_is_named_by_the_kind_of_token_its_members_write(tmp_path):
    """Three members write standard-library module names (no word vector links them to a
    concept): the cluster is "Python names (3 of 4): ...", and clusters.named_by says how each
    cluster was named; the map names it before bigger clusters named by their tokens."""
    from atlas.bench.synthetic import synthetic_directions
    from atlas.config import ClusterConfig
    from atlas.stages.cluster import cluster_store

    store = concept_store(tmp_path / "atlas.duckdb")
    modules = [" pathlib", " hashlib", " tempfile", " shutil", " functools"]
    with Store(store) as s:
        con = s.con
        next_id = con.execute("SELECT max(token_id) + 1 FROM vocab").fetchone()[0]
        for i, token in enumerate(modules):
            con.execute("INSERT INTO vocab VALUES (?, ?, ?)", [next_id + i, token, token])
        for neuron, order in ((10, [0, 1, 2, 3, 4]), (11, [2, 4, 1, 0, 3]), (12, [4, 3, 2, 1, 0])):
            for rank, i in enumerate(order):
                con.execute("UPDATE decoded_tokens SET token = ?, token_id = ? WHERE layer = 0 AND neuron = ? "
                            "AND side = 'out' AND polarity = 'top' AND rank = ?", [modules[i], next_id + i, neuron, rank])
        ctx = Context(s, STAGES["cluster"], "sha256:0", get_lm=None, progress=False)
        cluster_store(ctx, ClusterConfig(n_clusters=8, neighbours=2), lambda: synthetic_directions(2, 64, 32, seed=1))
        con.execute("UPDATE neurons SET cluster_id = 8 WHERE layer = 0 AND neuron IN (10, 11, 12, 13)")
        con.execute("INSERT INTO clusters (cluster_id, size, x, y) VALUES (8, 4, 0, 0)")
        STAGES["labels"].run(Context(s, STAGES["labels"], "sha256:0", get_lm=None, progress=False), WORD_VECTORS_ONLY)
        rows = {c: (label, by) for c, label, by in con.execute("SELECT cluster_id, label, named_by FROM clusters").fetchall()}
        record = json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = 'stage.labels'").fetchone()[0])
    label, by = rows[8]
    assert by == "token kind" and label.startswith("Python names (3 of 4): "), label
    assert set(label.split(": ", 1)[1].split(", ")) <= {m.strip() for m in modules}
    assert record["clusters_named_by_kind"] == sum(b == "token kind" for _, b in rows.values())
    assert record["clusters_named"] == sum(b is not None for _, b in rows.values())
    # Every name says how it was made: a kind's name starts with its kind, a token label has none.
    assert all((by is None) == (" of " not in label) for label, by in rows.values()), rows
    render(store, store.parent / "site", RenderConfig(workers=1, exports=False, search_concepts=False), progress=False)
    html = (store.parent / "site" / "map" / "index.html").read_text()
    data = json.loads(html.split('<script id="atlas-map-data" type="application/json">', 1)[1].split("</script>", 1)[0])
    named = data["clusters"]["named"]
    assert named[8] == "k" and all(named[c] == {"concept": "c", "token kind": "k", None: ""}[rows[c][1]] for c in rows)
    # The cluster's page says how it was named, and the method page how many were named each way.
    page = (store.parent / "site" / "clusters" / "8" / "index.html").read_text()
    assert "named by the kind of token its members write" in page
    method = (store.parent / "site" / "method" / "index.html").read_text()
    counts = {k: sum(b == v for _, b in rows.values()) for k, v in (("concept", "concept"), ("kind", "token kind"),
                                                                    ("tokens", None))}
    assert (f"Here: {counts['concept']} by a concept, {counts['kind']} by a kind of token, "
            f"{counts['tokens']} by their tokens.") in " ".join(method.split())
    assert "grouped by <strong>what they write</strong>" in method


DISEASES = [" pneumonia", " diabetes", " cancer", " malaria", " bras"]   # word vectors: 0.15-0.32 from "disease"


def _disease_neuron(store, neuron: int = 50) -> None:
    with duckdb.connect(str(store)) as con:
        next_id = con.execute("SELECT max(token_id) + 1 FROM vocab").fetchone()[0]
        for rank, token in enumerate(DISEASES):
            con.execute("INSERT INTO vocab VALUES (?, ?, ?)", [next_id + rank, token, token])
            con.execute("UPDATE decoded_tokens SET token = ?, token_id = ? WHERE layer = 1 AND neuron = ? "
                        "AND side = 'out' AND polarity = 'top' AND rank = ?", [token, next_id + rank, neuron, rank])


def test_the_models_examples_of_a_word_count_as_its_evidence(tmp_path):
    """A term the model names as an example of the word counts as evidence at cosine
    EXAMPLE_SIM or its own, whichever is more; the other terms keep their cosine."""
    from atlas import lexicon as lexicon_mod
    from atlas.site.concept_source import EXAMPLE_SIM, concepts
    from atlas.site.index_format import normalise
    from atlas.stages.labels import _OUT_Z

    store = concept_store(tmp_path / "atlas.duckdb")
    _disease_neuron(store)
    vectors, _ = wordvec.load()
    lexicon, _ = lexicon_mod.load()
    # A plural finds its singular; "brass" is no plural of the neuron's "bras".
    examples = {"disease": ["pneumonia", "diabetes", "cancers", "brass"]}
    with duckdb.connect(str(store), read_only=True) as con:
        found = {}
        for name, ex in (("plain", None), ("asked", examples)):
            p = concepts(con, vectors, normalise, _OUT_Z, True, lexicon, examples=ex).postings.to_pylist()
            found[name] = {(r["layer"], r["neuron"]): r for r in p if r["word"] == "disease"}
    terms = [t.strip() for t in DISEASES]
    cos = dict(zip(terms, (vectors.embed(terms) @ vectors.embed(["disease"])[0]).tolist()))
    plain, asked = found["plain"].get((1, 50)), found["asked"][(1, 50)]
    named = ("pneumonia", "diabetes", "cancer")
    want = sum(max(c, EXAMPLE_SIM) if t in named else c for t, c in cos.items() if t in named or c >= 0.15)
    assert asked["sim_sum"] == pytest.approx(want, abs=1e-3)
    assert asked["evidence"].split(", ")[:3] == ["pneumonia", "diabetes", "cancer"]   # examples first, by rank
    assert cos["bras"] < 0.15 and "bras" not in asked["evidence"].split(", ")
    assert plain is None or asked["z"] > plain["z"] and asked["sim_sum"] > plain["sim_sum"] + 1
    # Only the word asked about: no other word's evidence changed.
    assert {k: v for k, v in found["asked"].items() if k != (1, 50)} == \
        {k: v for k, v in found["plain"].items() if k != (1, 50)}


def _labels_on_a_concept_store(model_dir, path, rows_sql: str, meta_key: str):
    """run(cfg): the labels stage on a concept store at ``path`` with the tiny model at
    ``model_dir``, returning (its result, ``rows_sql``'s rows, atlas_meta[meta_key], the stage
    record); and the list that grows by one each time the stage loads the model."""
    from atlas.model.load import load_model

    lm = load_model(str(model_dir), device="cpu")
    loads = []

    def get_lm():
        loads.append(1)
        return lm

    store = concept_store(path)
    labels = STAGES["labels"]

    def run(cfg):
        with Store(store) as s:
            out = labels.run(Context(s, labels, "sha256:0", get_lm=get_lm, progress=False), cfg)
            return out, s.con.execute(rows_sql).fetchall(), s.meta(meta_key), s.meta("stage.labels")
    return run, loads


def test_the_labels_stage_keeps_the_models_examples_and_asks_again_only_for_another_question(tiny_model_dir, tmp_path):
    from atlas.model_examples import TEMPLATE

    run, loads = _labels_on_a_concept_store(tiny_model_dir(), tmp_path / "atlas.duckdb", "SELECT word, term, prob, rank "
                                            "FROM concept_examples ORDER BY word, rank", "concept_examples")

    # (WordNet's category phrases, asked besides the commonest words, are another test's: left out)
    out, rows, kept, record = run(LabelsConfig(label_category_phrases=False, label_examples=40))
    assert len(loads) == 1 and len({r[0] for r in rows}) == 40 and len(rows) <= 40 * 50
    assert kept["words"] == record["examples"]["words"] == 40 and kept["template"] == TEMPLATE
    assert all(0 <= r[2] <= 1 and r[1] for r in rows)
    # Another setting, the same question: labels run again and read the store's examples.
    out, again, kept_again, _ = run(LabelsConfig(label_category_phrases=False, label_examples=40, label_min_centroid=0.5))
    assert out.get("skipped") is None and len(loads) == 1 and again == rows and kept_again == kept
    # Another question asks again; none empties the table.
    _, more, _, _ = run(LabelsConfig(label_category_phrases=False, label_examples=41))
    assert len(loads) == 2 and len({r[0] for r in more}) == 41
    _, none, kept_none, record = run(LabelsConfig(label_category_phrases=False, label_examples=0))
    assert none == [] and kept_none is None and record["examples"] == {"words": 0} and len(loads) == 2


@pytest.mark.slow
def test_the_default_model_names_the_members_of_a_category_in_a_batch_as_alone(default_lm):
    """Batched after one copy of the shared prefix, each prompt's answers are those of the whole
    prompt run alone; and they are the category's members."""
    from atlas.model_examples import ask

    words = ["metal", "disease", "musical instrument", "a"]        # prompts of different lengths, padded
    batch, _ = ask(default_lm, words, 30, progress=False)
    rows = batch.to_pylist()
    for word in words:
        alone, _ = ask(default_lm, [word], 30, progress=False, reuse_prefix=False)
        mine = [r for r in rows if r["word"] == word]
        assert [r["term"] for r in mine] == [r["term"] for r in alone.to_pylist()], word
        assert [r["prob"] for r in mine] == pytest.approx([r["prob"] for r in alone.to_pylist()], abs=1e-3)
    named = {w: {r["term"] for r in rows if r["word"] == w} for w in words}
    assert len(named["metal"] & {"iron", "copper", "steel", "silver", "gold", "aluminum", "zinc", "nickel"}) >= 4
    assert len(named["disease"] & {"cancer", "pneumonia", "diabetes", "malaria", "influenza", "tuberculosis"}) >= 2


def test_a_listed_phrase_gets_concept_matches_of_its_own(tmp_path):
    """--label-phrases: each listed concept of several words joins the query vocabulary as
    search reads it (words normalised, one space) and gets concept matches of its own, which a
    query of those words finds as its phrase."""
    store = concept_store(tmp_path / "atlas.duckdb")
    listed = tmp_path / "phrases.txt"
    listed.write_text("# concepts to search for\nbright colour\n\n  Bright   COLOUR \n", encoding="utf-8")
    with Store(store) as s:
        labels = STAGES["labels"]
        labels.run(Context(s, labels, "sha256:0", get_lm=None, progress=False),
                   LabelsConfig(label_examples=0, label_phrases=str(listed)))
        record = s.meta("stage.labels")
        rows = s.con.execute("SELECT layer, neuron, evidence FROM concept_postings WHERE word = 'bright colour' "
                             "ORDER BY z DESC").fetchall()
        names = {r[0] for r in s.con.execute("SELECT concept FROM neuron_labels").fetchall()}
    assert record["phrases"] == 1 and "bright colour" not in names          # a phrase names nothing
    assert rows[0][:2] == (1, 9) and {"red", "blue"} & set(rows[0][2].split(", "))
    with duckdb.connect(str(store), read_only=True) as con:
        write_index(con, tmp_path / INDEX_DIR, postings=10)
    found = search(tmp_path, "bright colour", limit=5)
    assert found["phrase"]["count"] == len(rows)
    assert (found["hits"][0]["layer"], found["hits"][0]["neuron"]) == (1, 9)
    assert any(m["term"] == "bright colour" and m["source"] == "concept" for m in found["hits"][0]["matches"])


def test_the_labels_stage_asks_the_model_what_words_of_other_languages_mean(tiny_model_dir, tmp_path):
    """--label-translations N: the model's first reading of the N commonest words of each of
    --label-languages that are not English words too, kept with whether it was accepted, and read
    again while the model and the words are the same."""
    from atlas.lexicon import load
    from atlas.model_examples import TRANSLATE
    from atlas.stages.labels import ENGLISH_MIN

    if load()[0] is None or load("fr")[0] is None:
        pytest.skip("pyspellchecker is not installed")
    run, loads = _labels_on_a_concept_store(tiny_model_dir(), tmp_path / "atlas.duckdb", "SELECT word, language, term, "
                                            "prob, accepted FROM concept_translations ORDER BY language, word",
                                            "concept_translations")
    _, rows, kept, record = run(LabelsConfig(label_examples=0, label_translations=6, label_languages="fr,es"))
    assert len(loads) == 1 and [r[1] for r in rows] == ["es"] * 6 + ["fr"] * 6
    english, french = load()[0], load("fr")[0]
    want = [w for w in french.commonest(100) if len(w) >= 3 and english.counts.get(w, 0) < ENGLISH_MIN][:6]
    assert sorted(want) == [r[0] for r in rows if r[1] == "fr"]        # the commonest, less English words
    assert all(len(r[0]) >= 3 and 0 <= r[3] <= 1 and isinstance(r[4], bool) for r in rows)
    assert kept["template"] == TRANSLATE and kept["languages"] == {"fr": 6, "es": 6}
    assert record["translations"]["accepted"] == sum(r[4] for r in rows)
    # Another setting, the same words: read from the store, the model not loaded again.
    _, again, _, _ = run(LabelsConfig(label_examples=0, label_translations=6, label_languages="fr,es",
                                      label_min_centroid=0.5))
    assert again == rows and len(loads) == 1
    _, none, kept_none, record = run(LabelsConfig(label_examples=0, label_translations=0))
    assert none == [] and kept_none is None and len(loads) == 1


def test_a_reading_is_accepted_only_when_it_is_an_english_word_the_model_is_sure_of():
    import pyarrow as pa

    from atlas.site.concept_source import Vocabulary
    from atlas.stages.labels import TRANSLATION_MIN, accepted_translations

    vocab = Vocabulary(["animal", "city", "imp", "music", "the"], {"animal", "city", "imp", "music", "the"},
                       {"the"}, {})
    rows = [("animale", "animal", 0.9), ("ciudad", "city", TRANSLATION_MIN), ("stadt", "city", TRANSLATION_MIN - 0.01),
            ("imposible", "imp", 0.9),        # the model copying the word's start
            ("musique", "music", 0.6),        # a cognate: 5 of its 7 letters
            ("dont", "the", 0.9),             # a function word
            ("chien", "dogg", 0.9),           # no word
            ("city", "city", 0.9)]            # itself
    table = pa.table({"word": [r[0] for r in rows], "term": [r[1] for r in rows], "prob": [r[2] for r in rows]})
    got = dict(zip(table.column("word").to_pylist(), accepted_translations(table, vocab).column("accepted").to_pylist()))
    assert got == {"animale": True, "ciudad": True, "stadt": False, "imposible": False, "musique": True,
                   "dont": False, "chien": False, "city": False}


def test_a_word_the_model_reads_as_english_finds_that_words_neurons(tmp_path):
    """An accepted reading gives the word the matches of the English word beside its own, and the
    result says what it was read as; a reading not accepted gives nothing."""
    store = concept_store(tmp_path / "atlas.duckdb")
    with Store(store) as s:
        labels = STAGES["labels"]
        labels.run(Context(s, labels, "sha256:0", get_lm=None, progress=False), LabelsConfig(label_examples=0))
        s.con.execute("INSERT INTO concept_translations VALUES ('animale', 'it', 'animal', 0.8, true), "
                      "('bestia', 'it', 'animal', 0.2, false), "
                      # one word of two languages, read alike: the likelier reading, once
                      "('rosso', 'it', 'red', 0.7, true), ('rosso', 'es', 'blue', 0.7, true)")
        # A neuron whose description says "animal": a reading copies what it said, not the word read.
        s.con.execute("INSERT INTO descriptions (layer, neuron, description, score) VALUES (0, 3, 'an animal word', 0.9)")
    with duckdb.connect(str(store), read_only=True) as con:
        info = write_index(con, tmp_path / INDEX_DIR, postings=10)
    assert info["translations"] == 2
    assert search(tmp_path, "rosso", limit=1)["aliases"] == {"rosso": ["blue", "Spanish"]}   # a tie: es before it
    described = [m for h in search(tmp_path, "animale", limit=50)["hits"] for m in h["matches"]
                 if m["source"] == "description"]
    assert [(m["term"], m["token"]) for m in described] == [("animale", "animal")]
    assert match_words(described[0]).startswith("its description says \u2018animal\u2019")
    english, italian = search(tmp_path, "animal", limit=10), search(tmp_path, "animale", limit=10)
    assert italian["aliases"] == {"animale": ["animal", "Italian"]} and english["aliases"] == {}
    assert [(h["layer"], h["neuron"]) for h in italian["hits"]] == [(h["layer"], h["neuron"]) for h in english["hits"]]
    assert {(1, 5), (0, 7)} <= {(h["layer"], h["neuron"]) for h in italian["hits"]}
    assert status_line(italian).startswith("\u2018animale\u2019 (the model's Italian for \u2018animal\u2019): ")
    assert search(tmp_path, "bestia", limit=10)["counts"] == {"bestia": 0}
    # Without concept matches the index has no readings either.
    with duckdb.connect(str(store), read_only=True) as con:
        assert write_index(con, tmp_path / "plain" / INDEX_DIR, postings=10, concepts=False)["translations"] == 0


def test_the_lexicon_wheel_reads_other_languages_and_says_why_not():
    from atlas.lexicon import LANGUAGES, load

    english, _ = load()
    if english is None:
        pytest.skip("pyspellchecker is not installed")
    for code in ("fr", "es", "de", "it"):
        found, why = load(code)
        assert found is not None and why == "" and code in LANGUAGES, code
        assert found.source["file"] == f"resources/{code}.json.gz" and len(found.counts) > 50_000
        assert all(w == w.lower() for w in found.commonest(500))
    assert "famille" in load("fr")[0].counts and "stadt" in load("de")[0].counts
    missing, why = load("xx")
    assert missing is None and "resources/xx.json.gz" in why


@pytest.mark.slow
def test_the_default_model_reads_spanish_words_of_the_tune_list(default_lm):
    """The default model's first answers to the translation prompt, for tune words it reads with
    confidence: the rules of concept_translations were chosen on these."""
    from atlas.model_examples import translate

    table, _ = translate(default_lm, ["agua", "libro", "guerra", "escuela"], "Spanish", progress=False)
    got = {r["word"]: (r["term"], r["prob"]) for r in table.to_pylist()}
    assert {w: t for w, (t, _) in got.items()} == {"agua": "water", "libro": "book", "guerra": "war", "escuela": "school"}
    assert all(p >= 0.35 for _, p in got.values()), got
