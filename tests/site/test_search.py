"""Concept search: terms, the sharded index against a brute-force ranking, exemplar matches, the CLI."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import duckdb
import pytest

from atlas.stages.decode import DecodeConfig
from atlas.errors import AtlasError
from atlas.stages.exemplars import ExemplarConfig
from atlas.pipeline import Build
from atlas.config import RenderConfig
from atlas.site.render import render
from atlas.site.text import visible
from atlas.site.index_format import (DIRECTIONS, INDEX_DIR, META_NAME, SCHEMA, SOURCES, SRC_DIRECTION, normalise,
                                     query_terms, shard_name, shard_of)
from atlas.site.search import write_index
from atlas.site.search_query import score, search
from atlas.bench.synthetic import make_synthetic_store
from helpers import assert_one_line_error, atlas, hostile, packed_shards

SIDES = ("in", "gate", "out")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("search") / "atlas.duckdb", 2, 64, vocab_size=512)


@pytest.fixture(scope="module")
def site(store) -> Path:
    site = store.parent / "site"
    # Literal matches only: these tests check them against brute force (concept matches: test_concepts.py).
    render(store, site, RenderConfig(workers=1, search_postings=12, search_concepts=False), progress=False)
    return site


def brute_force(store: Path, with_exemplars: bool = False, directions: dict | None = None
                ) -> dict[str, list[tuple[int, int, int]]]:
    """Per term, (score x 100, layer, neuron) of every matching neuron, best first, from the raw rows.

    The score is the strength, times (0.5 + faithfulness) for a match on the top `out` tokens
    of a neuron that the clamp stage measured (rounded half up, in hundredths). ``directions``,
    where given, gets per (term, direction index) the neurons with a match of that direction."""
    best: dict[tuple[str, int, int], tuple] = {}
    with duckdb.connect(str(store), read_only=True) as con:
        clamp = con.execute("SELECT value FROM atlas_meta WHERE key = 'stage.clamp'").fetchone()
        clamped = clamp is not None and json.loads(clamp[0]).get("status") == "done"
        faith = dict(((r[0], r[1]), r[2]) for r in con.execute(
            "SELECT layer, neuron, faithfulness FROM neurons WHERE isfinite(faithfulness)").fetchall()) \
            if clamped else {}
        stats = {(r[0], r[1]): r[2:] for r in con.execute(
            "SELECT layer, neuron, in_logit_mean, in_logit_std, gate_logit_mean, gate_logit_std, "
            "out_logit_mean, out_logit_std, act_mean, act_std FROM neurons").fetchall()}
        rows = []       # ((term, src), layer, neuron, z, rank)
        for layer, neuron, side, polarity, rank, token, logit in con.execute(
                "SELECT layer, neuron, side, polarity, rank, token, logit FROM decoded_tokens").fetchall():
            mean, std = stats[(layer, neuron)][2 * SIDES.index(side):2 * SIDES.index(side) + 2]
            rows.append(((normalise(token), SOURCES.index(f"{side} {polarity}")), layer, neuron,
                         abs(logit - mean) / std, rank))
        if with_exemplars:
            vocab = dict(con.execute("SELECT token_id, token FROM vocab").fetchall())
            docs = dict(con.execute("SELECT doc_id, token_ids FROM corpus_docs").fetchall())
            for layer, neuron, polarity, rank, doc_id, pos, act in con.execute(
                    "SELECT layer, neuron, polarity, rank, doc_id, token_pos, activation FROM exemplars").fetchall():
                mean, std = stats[(layer, neuron)][6:8]
                rows.append(((normalise(vocab[docs[doc_id][pos]]), SOURCES.index(f"exemplar {polarity}")),
                             layer, neuron, abs(act - mean) / std, rank))
    for (term, src), layer, neuron, z, rank in rows:
        key = (term, layer, neuron)
        strength = math.floor(z * 100 + 0.5)
        f = faith.get((layer, neuron))
        if src == SOURCES.index("out top") and f is not None:
            # (0.5 + f) x strength, both in hundredths, rounded half up: exact in integers.
            score = (strength * (50 + math.floor(f * 100 + 0.5)) + 50) // 100
        else:
            score = strength
        if term and (key not in best or (-score, -z, src, rank) < best[key]):
            best[key] = (-score, -z, src, rank)
        if term and directions is not None:
            directions.setdefault((term, SRC_DIRECTION[src]), set()).add((layer, neuron))
    ranked = defaultdict(list)
    for (term, layer, neuron), (neg_score, *_) in best.items():
        ranked[term].append((-neg_score, layer, neuron))
    return {t: sorted(v, key=lambda s: (-s[0], s[1], s[2])) for t, v in ranked.items()}


def test_terms_fold_case_space_markers_and_edge_punctuation():
    for token in (" dog", "Dog", "DOG", "\u0120dog", "\u2581Dog", "dog.", "(dog)", "\tdog\n", "\uff44\uff4f\uff47"):
        assert normalise(token) == "dog", token
    assert normalise("don't") == "don't"               # inner punctuation stays
    assert normalise("\u0120\u0120") == "" and normalise("  ") == "" and normalise("") == ""
    assert normalise("dog\u0120") == "dog\u0121"      # Ġ marks a space only at the start (ġ lower-cased)
    assert normalise("<script>alert(1)</script>") == "script>alert(1)</script"
    assert query_terms("  Dog dog, CAT\u00a0water\u2028 ") == ["dog", "cat", "water"]
    assert len(query_terms(" ".join(f"w{i}" for i in range(20)))) == 8


def test_shard_hash_is_fnv1a():
    # Reference values of 32-bit FNV-1a: the search page computes the same function.
    assert shard_of("", 1 << 32) == 0x811C9DC5 and shard_of("a", 1 << 32) == 0xE40C292C
    assert shard_of("foobar", 1 << 32) == 0xBF9CF968
    assert shard_name(5, 256) == "05.json" and shard_name(0, 1) == "0.json"


def test_index_ranks_like_a_brute_force_recomputation(store, tmp_path):
    directions = {}
    expected = brute_force(store, directions=directions)
    with duckdb.connect(str(store), read_only=True) as con:
        info = write_index(con, tmp_path / INDEX_DIR, postings=7, concepts=False)
    meta = json.loads((tmp_path / INDEX_DIR / META_NAME).read_text())
    assert info["terms"] == len(expected) == meta["terms"]
    assert len(list((tmp_path / INDEX_DIR).glob("*.json"))) == meta["shards"] + 1
    for term, want in sorted(expected.items(), key=lambda kv: -len(kv[1]))[:40]:
        got = search(tmp_path, term, limit=100)
        assert got["counts"] == {term: len(want)}
        hits = [(round(h["score"] * 100), h["layer"], h["neuron"]) for h in got["hits"]]
        assert hits[:7] == want[:7], term
        # Beyond the 7 best, each direction's best 3 are kept too: still in the ranking's order.
        assert [w for w in want if w in hits] == hits, term
        # A neuron counts in every direction it has a match of (one that promotes a word and reads it in both).
        by_direction = [search(tmp_path, term, direction=d)["direction_counts"][term] for d in DIRECTIONS]
        assert by_direction == [len(directions.get((term, i), ())) for i in range(len(DIRECTIONS))], term
        assert sum(by_direction) >= len(want), term        # no descriptions here: every match has a direction


def test_clamp_check_weighs_top_out_matches(tmp_path):
    """With a clamp stage, top-`out` matches score strength x (0.5 + faithfulness), as brute force says."""
    store = make_synthetic_store(tmp_path / "atlas.duckdb", 2, 64, vocab_size=512, corpus=True, clamp=True)
    with duckdb.connect(str(store)) as con:       # a neuron whose check gave no figure counts as unmeasured
        con.execute("UPDATE neurons SET faithfulness = 'nan'::FLOAT WHERE layer = 1 AND neuron < 8")
    expected = brute_force(store, with_exemplars=True)
    with duckdb.connect(str(store), read_only=True) as con:
        write_index(con, tmp_path / INDEX_DIR, postings=7, concepts=False)
    meta = json.loads((tmp_path / INDEX_DIR / META_NAME).read_text())
    assert meta["clamp_weighted"] is True
    reweighted = unmeasured = 0
    for term, want in sorted(expected.items(), key=lambda kv: -len(kv[1]))[:40]:
        got = search(tmp_path, term, limit=100)
        hits = [(round(h["score"] * 100), h["layer"], h["neuron"]) for h in got["hits"]]
        assert hits[:7] == want[:7] and [w for w in want if w in hits] == hits, term
        for h in got["hits"]:
            # every synthetic neuron was measured, but for the eight given a NaN figure above
            assert (h["faithfulness"] is None) == (h["layer"] == 1 and h["neuron"] < 8)
            unmeasured += h["faithfulness"] is None
            out_top = [m for m in h["matches"] if m["source"] == "out top"]
            if out_top and round(h["score"] * 100) != round(out_top[0]["strength"] * 100):
                reweighted += 1
                factor = 0.5 + h["faithfulness"]
                assert h["score"] == pytest.approx(out_top[0]["strength"] * factor, abs=0.011)
    assert reweighted > 0 and unmeasured > 0          # the weighting changed some scores, and NaN checks met
    assert score(1000, SOURCES.index("out top"), 100) == 1500 and score(1000, SOURCES.index("out top"), 0) == 500
    assert score(1000, SOURCES.index("out top"), -1) == 1000 and score(1000, SOURCES.index("in top"), 100) == 1000


def test_variants_of_a_word_meet_in_one_term(site, store):
    with duckdb.connect(str(store), read_only=True) as con:
        token, = con.execute("SELECT token FROM decoded_tokens WHERE layer = 1 AND neuron = 3 AND side = 'out' "
                             "AND polarity = 'top' AND rank = 0").fetchone()
        variants = {t for (t,) in con.execute("SELECT DISTINCT token FROM decoded_tokens").fetchall()
                    if normalise(t) == normalise(token)}
    assert len(variants) >= 2                          # the synthetic vocab has "x" and " x"
    result = search(site, f"  {token.strip().upper()}  ")
    seen = {m["token"] for h in result["hits"] for m in h["matches"]}
    assert seen <= variants and len(seen) >= 2
    # The site was rendered with search_postings=12: the 12 best, then up to 6 more per direction.
    assert 12 <= len(result["hits"]) <= 12 + 3 * 6
    by_direction = [len(search(site, token, limit=100, direction=d)["hits"]) for d in DIRECTIONS]
    assert all(n >= min(6, c) for n, c in zip(by_direction, [search(site, token, direction=d)["direction_counts"]
                                                             [normalise(token)] for d in DIRECTIONS]))


def test_several_words_rank_neurons_matching_more_of_them_first(site):
    index = json.loads((site / INDEX_DIR / META_NAME).read_text())
    shard = json.loads((site / INDEX_DIR / shard_name(0, index["shards"])).read_text())
    a, b = sorted(shard, key=lambda t: -len(shard[t]["p"]))[:2]
    result = search(site, f"{a} {b}", limit=1000)
    words = [h["words"] for h in result["hits"]]
    assert words == sorted(words, reverse=True)
    both = {(h["layer"], h["neuron"]) for h in search(site, a, limit=1000)["hits"]} & \
        {(h["layer"], h["neuron"]) for h in search(site, b, limit=1000)["hits"]}
    assert {(h["layer"], h["neuron"]) for h in result["hits"] if h["words"] == 2} == both
    for h in result["hits"]:
        assert h["score"] == pytest.approx(sum(m["strength"] for m in h["matches"]))   # no clamp check here
    # After the neurons that match both, the words' best neurons alternate: neither word drowns the other.
    rest = [{m["term"] for m in h["matches"]} for h in result["hits"] if h["words"] == 1]
    assert {t for terms in rest[:2] for t in terms} == {a, b}


def test_hostile_tokens_are_searchable_and_escaped_in_the_index(site):
    result = search(site, "<script>alert(1)</script>")
    assert result["terms"] == ["script>alert(1)</script"]
    assert (0, 0) in {(h["layer"], h["neuron"]) for h in result["hits"]}
    for path in (site / INDEX_DIR).glob("*.json"):
        assert b"<" not in path.read_bytes(), path       # `<` is written \u003c in every shard


def test_exemplar_tokens_are_matched(tiny_model_dir, tmp_path):
    import random

    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(rng.choice(["dog", " dog", "cat", "Paris", "w5", "w9", "w13"]) for _ in range(1500)))
    out = tmp_path / "out"
    b = Build(out, str(tiny_model_dir("llama")), progress=False)
    b.decode(DecodeConfig(top_k=3, bottom_k=2))
    b.exemplars(ExemplarConfig(corpus=str(corpus), context=16, batch_size=4, k=5, attribution_rows=0))
    b.render(RenderConfig(workers=1, search_concepts=False))
    expected = brute_force(out / "atlas.duckdb", with_exemplars=True)
    result = search(out, "Dog", limit=1000)
    assert [(round(h["score"] * 100), h["layer"], h["neuron"]) for h in result["hits"]] == expected["dog"][:100]
    assert any(m["source"].startswith("exemplar") for h in result["hits"] for m in h["matches"])
    assert not (out / "site" / "pagefind").exists()   # no full-text index: one file per neuron


def test_cli_prints_the_same_ranking(site):
    proc = atlas("search", site.parent, "Kalo ta", "--limit", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == search(site.parent, "Kalo ta", limit=5)
    proc = atlas("search", site, "<script>alert(1)</script>", "--limit", "50")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    want = search(site, "<script>alert(1)</script>", limit=50)["hits"]
    assert lines[0].startswith("\u2018script>alert(1)</script\u2019: ")
    assert [line.split()[1] for line in lines[2:]] == [f"L{h['layer']}/N{h['neuron']}" for h in want]
    assert "L0/N0" in [line.split()[1] for line in lines[2:]]
    # Labels are text: their spaces stay spaces (a token's would be shown as ␣).
    assert all(f"  {visible(h['label'])} | " in line for h, line in zip(want, lines[2:]) if h["label"])
    assert any(" " in visible(h["label"]) for h in want)


def test_cli_errors_are_one_line(site, tmp_path):
    assert_one_line_error(atlas("search", tmp_path, "dog"), "no search index")
    assert_one_line_error(atlas("search", site, "!? \u2014"), "no words to search")
    (tmp_path / INDEX_DIR).mkdir(parents=True)
    (tmp_path / INDEX_DIR / META_NAME).write_text("{not json")
    assert_one_line_error(atlas("search", tmp_path, "dog"), "not valid JSON")
    # An index written before the packed postings (schema 4: JSON lists of integers) is refused in words.
    (tmp_path / INDEX_DIR / META_NAME).write_text(json.dumps({"schema": 4, "shards": 1}))
    (tmp_path / INDEX_DIR / shard_name(0, 1)).write_text(json.dumps({"dog": {"d": [1, 0, 0], "n": 1, "p": [0] * 7, "t": ["dog"]}}))
    assert_one_line_error(atlas("search", tmp_path, "dog"), "schema 4", f"reads {SCHEMA}", "render the site again")
    (tmp_path / INDEX_DIR / META_NAME).write_text("[]")
    assert_one_line_error(atlas("search", tmp_path, "dog"), "schema None")
    with pytest.raises(AtlasError, match="at least 1"):
        render(site.parent / "atlas.duckdb", tmp_path / "s", RenderConfig(search_postings=0), progress=False)


def test_label_files_keep_each_neuron_at_its_place(tmp_path):
    """labels/<layer>/<chunk>.json: a neuron's label at neuron % LABEL_CHUNK, null for gaps and unlabelled ones."""
    from atlas.site.index_format import LABEL_CHUNK
    from atlas.site.search import _write_labels

    con = duckdb.connect()
    con.execute(f"""CREATE TABLE neurons AS SELECT * FROM (VALUES (0, 0, 'a'), (0, 2, '<b>'), (0, {LABEL_CHUNK}, NULL),
                    (0, {LABEL_CHUNK + 1}, 'c'), (1, 5, 'd')) t(layer, neuron, label)""")
    sizes = _write_labels(con, tmp_path)
    read = {p.relative_to(tmp_path).as_posix(): json.loads(p.read_text()) for p in tmp_path.rglob("*.json")}
    assert read == {"0/0.json": ["a", None, "<b>"], "0/1.json": [None, "c"], "1/0.json": [None] * 5 + ["d"]}
    assert b"<" not in (tmp_path / "0/0.json").read_bytes() and len(sizes) == 3


def test_shard_text_from_duckdb_is_what_the_site_json_writer_writes():
    """The shards' JSON is written by DuckDB (search._SHARDS_SQL); for every hostile string and
    every control character it must come out as ``to_json`` writes it: same bytes, same safety."""
    from atlas.site.search import _json_text
    from atlas.site.text import to_json

    texts = [*hostile("tokens"), *hostile("labels"), *hostile("payloads"), "".join(map(chr, range(32))) + "\\u001F \\\\u001F \x7f"]
    con = duckdb.connect()
    for text in texts:
        (written,) = con.execute("SELECT to_json(struct_pack(t := [?::VARCHAR]))", [text]).fetchone()
        assert _json_text(written) == to_json({"t": [text]}), repr(text)


def test_packed_shards_decode_to_the_postings_written(tmp_path):
    """Every term's packed postings, variants, evidence words and reading (a word of another
    language) read back as the rows they were written from, hostile text included, with field ranges that take two packed groups."""
    from atlas.site.index_format import SAFE_INT, entry_postings, shard_of

    folder, layout, expected = packed_shards(tmp_path / "idx")
    assert len(layout["groups"]) >= 2          # 80 x 131,072 neurons and 31-bit strengths do not fit one number
    first = 0
    for count, digits in layout["groups"]:
        product = math.prod(layout["radix"][first:first + count])
        assert product <= SAFE_INT and 64 ** digits >= product
        first += count
    forms = set()
    for term, want in expected.items():
        path = folder / shard_name(shard_of(term, 4), 4)
        assert b"<" not in path.read_bytes() and b"\x00" not in path.read_bytes()
        entry = json.loads(path.read_text(encoding="utf-8"))[term]
        assert (entry["n"], entry["d"]) == (want["n"], want["d"]), term
        assert entry_postings(entry, layout) == want["postings"], term
        assert entry.get("a") == want.get("a"), term          # what the model read a foreign word as
        forms.add(type(entry.get("w")).__name__)
    assert forms == {"str", "list", "NoneType"}     # words joined by spaces, a list where one holds a space, none


def test_a_synthetic_store_with_concept_postings_indexes_them(tmp_path):
    """The benchmarks' synthetic stores carry concept postings shaped like the default atlas's,
    and the index takes them from the store as it does a built atlas's."""
    store = make_synthetic_store(tmp_path / "atlas.duckdb", 2, 64, vocab_size=512, concepts=200)
    with duckdb.connect(str(store), read_only=True) as con:
        rows, words = con.execute("SELECT count(*), count(DISTINCT word) FROM concept_postings").fetchone()
        best = {side: con.execute("SELECT word, layer, neuron FROM concept_postings WHERE side = ? ORDER BY z DESC "
                                  "LIMIT 1", [side]).fetchone() for side in ("out", "exemplars")}
        info = write_index(con, tmp_path / INDEX_DIR, postings=100)
    # 50 a word of each side: the tokens a neuron writes, and those it fires on
    assert (rows, words) == (2 * 50 * 200, 200) and info["concepts"]["postings"] == rows
    assert info["concepts"]["fires_on"] == rows // 2
    assert info["concepts"]["resource"] == {"name": "atlas.synthetic"}
    for side, source in (("out", "concept"), ("exemplars", "concept fires")):
        word, layer, neuron = best[side]
        hit = next(h for h in search(tmp_path, word, limit=100)["hits"] if (h["layer"], h["neuron"]) == (layer, neuron))
        assert any(m["source"] == source for m in hit["matches"]), (side, hit)


def test_the_page_and_python_share_the_index_constants():
    """atlas-search.js reads what search.py writes: the schema, the sources whose token is their
    evidence, and each source's direction, written twice (a source added to one alone would be
    shown in the wrong direction or decoded as a token variant)."""
    import re

    from atlas.resources import TEMPLATES
    from atlas.site.index_format import CONCEPT, FIRES, SCHEMA, SOURCES, SRC_DIRECTION
    from atlas.site.search_query import NOT_IN_PHRASE

    js = (TEMPLATES / "assets" / "atlas-search.js").read_text(encoding="utf-8")
    consts = dict(re.findall(r"\b(SCHEMA|CONCEPT|FIRES|NOT_IN_PHRASE) = (\d+)", js))
    assert {k: int(v) for k, v in consts.items()} == {"SCHEMA": SCHEMA, "CONCEPT": CONCEPT, "FIRES": FIRES,
                                                      "NOT_IN_PHRASE": NOT_IN_PHRASE}
    directions = re.search(r"SRC_DIRECTION = \[([^\]]*)\]", js).group(1)
    assert [None if v.strip() == "null" else int(v) for v in directions.split(",")] == list(SRC_DIRECTION)
    assert len(SRC_DIRECTION) == len(SOURCES) and SOURCES[FIRES] == "concept fires"
    assert f'src === "{SOURCES[FIRES]}"' in js and f'src === "{SOURCES[CONCEPT]}"' in js
