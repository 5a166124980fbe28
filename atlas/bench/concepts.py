"""Concept search, judged: recall and precision in the top 20 for category queries, before and after.

    python -m atlas.bench.concepts STORE [--wordnet DIR] [--json FILE]

The queries and their judges are in ``data/concepts.json`` (``bench_categories``): per
category a query word ("animal") and a WordNet noun synset (animal, sense 1). A neuron is
**judged** to be about the category when at least ``MIN_MEMBERS`` distinct terms among its
top ``RANKS`` decoded `out` tokens (letters only, 3 or more, plurals to their lemma) are nouns whose commonest sense falls under that synset
in WordNet's hypernym tree (``atlas.bench.wordnet``). A term counts only from a token that
starts a word (a leading space), not written in capitals, whose lemma has 3 letters or more:
WordNet reads the word piece "als" and the acronym "ALS" as aluminium, "ras" as radium. The
judge reads WordNet only; concept search reads word vectors and the model's own examples,
and of WordNet only the names of categories of several words (``atlas.phrases``: which
phrases get matches of their own, never what belongs to them), so neither is tuned to the other.

For each query the store's search index is written twice, **before** (literal matches
only, as in the atlas up to now) and **after** (with concept matches), and the query's
top 20 are scored:

- precision@20: judged neurons in the top 20 / 20;
- recall@20: judged neurons in the top 20 / min(20, judged neurons).

The ``tune`` part is the one whose numbers guided the concept search's settings; the
``held_out`` part was not looked at until they were fixed, and is reported apart, as is
``held_out_2``, written after they were fixed, and ``held_out_phrases``, two-word categories
written before WordNet's category phrases joined the query vocabulary.

The same judge reads the tokens a neuron fires on (its top ``RANKS`` exemplars' peak tokens),
and a second summary scores each query against the neurons judged either way: concept search
finds neurons by the tokens they fire on too.

**Other languages** (``bench_other_languages``): the same categories asked in French,
Spanish, German and Italian ("tier" for animal), each judged by its English query's judged
neurons, written before any was searched and never tuned on. A word reaches concept search
where the word vectors know it as a whole token (the query vocabulary), and where the model
read it as an English word (the labels stage's ``concept_translations``, ``--label-languages``);
each row says which.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from atlas.bench.wordnet import DEFAULT_DIR, WordNet
from atlas.errors import AtlasError
from atlas.resources import data_json
from atlas.site.concept_source import exemplar_rows
from atlas.site.index_format import INDEX_DIR, normalise, shard_name
from atlas.site.search import write_index
from atlas.site.search_query import rank, read_meta
from atlas.store import Store

RANKS = 20
MIN_MEMBERS = 3
TOP = 20


OTHER = "other languages"
WHOLE = "other languages, word-vector words"


def categories() -> dict[str, list[tuple[str, str, int]]]:
    parts = data_json("concepts.json")["bench_categories"]
    return {part: [tuple(c) for c in cats] for part, cats in parts.items()}


def other_languages() -> list[tuple[str, str, str]]:
    """(word, language, the English query whose judged neurons judge it)."""
    return [tuple(r) for r in data_json("concepts.json")["bench_other_languages"]]


def judged_neurons(con, wn: WordNet, cats: list[tuple[str, str, int]], fires_on: bool = False
                   ) -> dict[str, set[tuple[int, int]]]:
    """Per query, the neurons judged to be about its category (see the module's docstring), from
    the tokens they write or, ``fires_on``, those they fire on (the labels stage's ``exemplar_rows``)."""
    rows = [(layer, neuron, token) for layer, neuron, _, token, _ in exemplar_rows(con)] if fires_on else \
        con.execute(f"SELECT layer, neuron, token FROM decoded_tokens "
                    f"WHERE side = 'out' AND polarity = 'top' AND rank < {RANKS}").fetchall()
    terms: dict[tuple[int, int], set[str]] = {}
    for layer, neuron, token in rows:
        t = normalise(token)
        # "in", "at", "be" are an inch, astatine and beryllium to WordNet; so are word pieces and
        # acronyms ("als": aluminium, "ALS": a disease): a term counts from a token that starts a
        # word (a leading space), not in capitals, with a lemma of 3 letters or more.
        if len(t) >= 3 and t.isalpha() and token[:1].isspace() and not token.strip().isupper():
            lemma = wn.lemma(t) or t
            if len(lemma) >= 3:
                terms.setdefault((layer, neuron), set()).add(lemma)
    vocabulary = sorted(set().union(*terms.values())) if terms else []
    judged = {}
    for query, lemma, sense in cats:
        synset = wn.synset(lemma, sense)
        members = {t for t in vocabulary if wn.belongs(t, synset)}
        judged[query] = {key for key, ts in terms.items() if len(ts & members) >= MIN_MEMBERS}
    return judged


def _searcher(idx: Path):
    meta = read_meta(idx)
    shards: dict[int, dict] = {}

    def load(b: int) -> dict:
        if b not in shards:
            shards[b] = json.loads((idx / shard_name(b, meta["shards"])).read_text(encoding="utf-8"))
        return shards[b]
    return lambda q: rank(q, meta, load, TOP)


def score(hits: list[dict], judged: set) -> dict:
    top = {(h["layer"], h["neuron"]) for h in hits[:TOP]}
    found = len(top & judged)
    return {"found": found, "precision": found / TOP, "recall": found / min(TOP, len(judged)) if judged else None}


def run(store_path: str, wordnet: str | Path = DEFAULT_DIR, postings: int = 100, keep: Path | None = None) -> dict:
    wn = WordNet(wordnet)
    parts = categories()
    with Store(store_path, read_only=True) as store, tempfile.TemporaryDirectory() as tmp:
        tmp = keep or tmp
        con = store.con
        judged = judged_neurons(con, wn, [c for cats in parts.values() for c in cats])
        fires = judged_neurons(con, wn, [c for cats in parts.values() for c in cats], fires_on=True) \
            if {"exemplars", "corpus_docs"} <= {t for (t,) in con.execute("SHOW TABLES").fetchall()} else {}
        info = {}
        for name, concepts in (("before", False), ("after", True)):
            info[name] = write_index(con, Path(tmp) / name / INDEX_DIR, postings, concepts)
        search = {name: _searcher(Path(tmp) / name / INDEX_DIR) for name in ("before", "after")}
        rows = []
        for part, cats in parts.items():
            for query, lemma, sense in cats:
                j = judged[query]
                either = j | fires.get(query, set())
                row = {"part": part, "query": query, "synset": f"{lemma}.n.{sense:02d}", "judged": len(j),
                       "judged_either": len(either)}
                for name in ("before", "after"):
                    hits = search[name](query)["hits"]
                    row[name], row[f"{name}_either"] = score(hits, j), score(hits, either)
                rows.append(row)
        known = _whole_words()
        for word, lang, query in other_languages():
            j = judged[query]
            row = {"part": OTHER, "query": word, "lang": lang, "category": query, "judged": len(j),
                   "whole_word": word in known}
            for name in ("before", "after"):
                found = search[name](word)
                row[name] = score(found["hits"], j)
            row["read_as"] = (found["aliases"].get(word) or [None])[0]
            rows.append(row)
        coherence = cluster_coherence(con)
    either = {part: _means([r for r in rows if r["part"] == part and r["judged_either"]], "_either") for part in parts}
    summary = {part: _means([r for r in rows if (r["part"] == part or part == WHOLE and r.get("whole_word"))
                             and r["judged"]]) for part in [*parts, OTHER, WHOLE]}
    return {"rows": rows, "summary": summary, "summary_either": either, "concepts": info["after"].get("concepts"), "coherence": coherence,
            "translations": info["after"].get("translations", 0),
            "judge": {"wordnet": str(wn.root), "ranks": RANKS, "min_members": MIN_MEMBERS}}


def _means(scored: list[dict], suffix: str = "") -> dict:
    """The mean precision and recall, before and after, of rows scored against their judged
    neurons (``suffix`` "_either": against those judged either way)."""
    out = {"queries": len(scored)}
    for name in ("before", "after"):
        for m in ("precision", "recall"):
            out[f"{m}_{name}"] = round(statistics.mean(r[name + suffix][m] for r in scored), 3) if scored else None
    return out


def _whole_words() -> set[str]:
    """The word vectors' whole-word tokens, as the query vocabulary takes them (empty without them)."""
    from atlas import wordvec
    vectors, _ = wordvec.load()
    return set(vectors.words()) if vectors is not None else set()


def table(result: dict) -> str:
    lines = ["| part | query | judged | P@20 before | R@20 before | P@20 after | R@20 after |",
             "|---|---|---|---|---|---|---|"]
    fmt = (lambda v: "–" if v is None else f"{v:.2f}")
    for r in result["rows"]:
        query = r["query"] if r["part"] != OTHER else (f"{r['query']} ({r['lang']}, {r['category']}"
                                                       + ("" if r["whole_word"] else "; not a word-vector word")
                                                       + (f"; read as {r['read_as']}" if r.get("read_as") else "") + ")")
        lines.append(f"| {r['part']} | {query} | {r['judged']} | {fmt(r['before']['precision'])} | "
                     f"{fmt(r['before']['recall'])} | {fmt(r['after']['precision'])} | {fmt(r['after']['recall'])} |")
    for part, s in result["summary"].items():
        lines.append(f"| **{part}, mean of {s['queries']}** | | | {fmt(s['precision_before'])} | "
                     f"{fmt(s['recall_before'])} | {fmt(s['precision_after'])} | {fmt(s['recall_after'])} |")
    return "\n".join(lines)


def either_table(result: dict) -> str:
    """Per part, the means when a neuron is judged by the tokens it writes or by those it fires on."""
    fmt = (lambda v: "–" if v is None else f"{v:.2f}")
    lines = ["judged by the tokens a neuron writes or those it fires on (its top 20 exemplars' peak tokens):",
             "| part | queries | P@20 before | R@20 before | P@20 after | R@20 after |", "|---|---|---|---|---|---|"]
    for part, s in result.get("summary_either", {}).items():
        lines.append(f"| {part} | {s['queries']} | {fmt(s['precision_before'])} | {fmt(s['recall_before'])} | "
                     f"{fmt(s['precision_after'])} | {fmt(s['recall_after'])} |")
    return "\n".join(lines)


def report(result: dict) -> str:
    """What ``atlas bench concepts`` prints: the table, the cluster coherence, and how many foreign
    queries the model read as an English word."""
    read = [r for r in result["rows"] if r["part"] == OTHER and r.get("read_as")]
    return "\n".join([table(result), either_table(result), coherence_line(result["coherence"]),
                      f"other languages: {len(read)} of {sum(r['part'] == OTHER for r in result['rows'])} queries read "
                      f"by the model as an English word ({result['translations']:,} readings in the index, from the "
                      "labels stage's concept_translations)"])


def coherence_line(c: dict) -> str:
    if not c.get("pairs"):
        return "cluster coherence: no clusters"
    return (f"cluster coherence: members share {c['within']:.4f} of their top-20 `out` terms (Jaccard), random pairs "
            f"{c['random']:.4f}: {c['ratio']}x random ({c['pairs']:,} pairs each)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--wordnet", default=str(DEFAULT_DIR), help="folder of WordNet 3.0's dict files")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--keep", type=Path, help="write the two indexes here (before/, after/) and keep them")
    args = ap.parse_args(argv)
    result = run(args.store, args.wordnet, keep=args.keep)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def cluster_coherence(con, pairs: int = 20_000, seed: int = 0) -> dict:
    """How much two members of one cluster share of their top-20 `out` terms, against two random neurons.

    Jaccard of the two neurons' sets of top-20 decoded `out` terms (search terms, so casing
    and spacing variants are one), averaged over ``pairs`` pairs drawn inside clusters
    (a cluster drawn in proportion to its number of pairs) and over as many random pairs.
    """
    import numpy as np

    rows = con.execute("""
        SELECT n.layer, n.neuron, n.cluster_id, list(d.token) FROM neurons n JOIN decoded_tokens d USING (layer, neuron)
        WHERE d.side = 'out' AND d.polarity = 'top' AND n.cluster_id IS NOT NULL
        GROUP BY n.layer, n.neuron, n.cluster_id ORDER BY n.layer, n.neuron""").fetchall()
    if len(rows) < 2:
        return {"pairs": 0}
    sets = [frozenset(filter(None, map(normalise, r[3]))) for r in rows]
    return coherence_of(sets, np.array([r[2] for r in rows]), pairs, seed)


def coherence_of(sets: list[frozenset], cluster, pairs: int = 20_000, seed: int = 0) -> dict:
    """``cluster_coherence`` on given term sets and cluster ids (one per neuron)."""
    import numpy as np

    cluster = np.asarray(cluster)
    rng = np.random.default_rng(seed)

    def jaccard(i, j):
        a, b = sets[i], sets[j]
        return len(a & b) / len(a | b) if a or b else 0.0

    order = np.argsort(cluster, kind="stable")
    ids, starts, sizes = np.unique(cluster[order], return_index=True, return_counts=True)
    weight = sizes * (sizes - 1.0)
    if weight.sum() == 0:
        return {"pairs": 0}
    picks = rng.choice(len(ids), pairs, p=weight / weight.sum())
    within = []
    for c in picks:
        i, j = rng.choice(sizes[c], 2, replace=False)
        within.append(jaccard(order[starts[c] + i], order[starts[c] + j]))
    random_pairs = [jaccard(*rng.choice(len(sets), 2, replace=False)) for _ in range(pairs)]
    w, r = float(np.mean(within)), float(np.mean(random_pairs))
    return {"pairs": pairs, "within": round(w, 4), "random": round(r, 4), "ratio": round(w / r, 1) if r else None}


if __name__ == "__main__":
    try:
        main()
    except AtlasError as e:
        sys.exit(f"error: {e}")
