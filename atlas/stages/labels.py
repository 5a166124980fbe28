"""Labels stage: name each neuron's concept where it has one, and each cluster by its members' concepts.

A neuron's **tokens** are its top ``TOKENS`` decoded `out` tokens with casing, spacing and
a plural ``s`` merged (" dog", " Dogs", "Dogs" are one, shown as the first-ranked
spelling), so the old label "dog · Dogs · Dogs" becomes "dog".

Its **concept** is the whole word of the word vectors' vocabulary near which its top `out` terms lie
in the word vectors (cosine >= ``label_min_sim``), counting only terms other than the
word itself (a plural and its singular count once) and needing at least
``label_min_evidence`` of them; the largest summed cosine wins. The label is then "animal: bird, mammal, monkey" (the word, then its
evidence); without such a word it is "no clear concept: dog · cat" (the merged tokens),
never an invented name. ``neuron_labels`` keeps label, concept, evidence, tokens, method
and score; ``neurons.label`` gets the label. The same scan gives the concept matches of
search, kept in ``concept_postings`` for the render's index (``atlas.site.concept_source``).

A **cluster's name** comes from the same scan with the cluster in the place of a neuron and
its shared terms (the terms among the top terms of two or more members, most shared first)
in the place of a neuron's top terms: "months (31 of 227): month, days, year", 31 being the
members that have one of the evidence terms. Without such a concept the cluster keeps the
cluster stage's token label.

Without the word vectors (wordllama not installed) every neuron gets its merged tokens
only, with method ``tokens``, and the stage record says why.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import pyarrow as pa

from atlas import faults, lexicon as lexicon_mod, wordvec
from atlas.config import LabelsConfig
from atlas.site.concept_source import POSTINGS, concepts
from atlas.site.search import normalise
from atlas.stages.contract import Context, insert_arrow, update_from_arrow
from atlas.store import finished_stage

TOKENS = 10             # top `out` tokens read per neuron
SHOWN = 3               # tokens or evidence terms shown in a label
NO_CONCEPT = "no clear concept"
STAGE = "labels"
_OUT_Z = ("coalesce(abs(CAST(d.logit AS DOUBLE) - CAST(n.out_logit_mean AS DOUBLE)) "
          "/ nullif(CAST(n.out_logit_std AS DOUBLE), 0), abs(CAST(d.logit AS DOUBLE)))")


def merged_tokens(tokens: list[str]) -> list[str]:
    """Tokens in rank order with casing/spacing variants and a plural ``s`` merged, each its first spelling."""
    shown: dict[str, str] = {}
    for token in tokens:
        key = normalise(token)
        if not key:
            continue
        stem = key[:-1] if key.endswith("s") and key[:-1] in shown else key
        if stem in shown:
            continue
        if key + "s" in shown:          # the plural came first: keep it, under the singular's key
            continue
        shown[stem] = normalise_spelling(token)
    return list(shown.values())


def normalise_spelling(token: str) -> str:
    """The token as a reader sees it: ends trimmed like a search term, case kept."""
    term = normalise(token)
    lower = token.lower()
    i = lower.find(term)
    return token[i:i + len(term)] if i >= 0 else term


def compute_labels(con, cfg: LabelsConfig, vectors, lexicon=None,
                   clustered: bool = False) -> tuple[pa.Table, pa.Table | None, pa.Table, dict]:
    """One row per neuron (label, concept, evidence, tokens, method, score), the concept postings
    for search made by the same scan (None without word vectors), the clusters' concept names
    (``cluster_names``; only when ``clustered``) and what the scan reported."""
    rows = con.execute(f"""
        SELECT layer, neuron, list(token ORDER BY rank) FROM decoded_tokens
        WHERE side = 'out' AND polarity = 'top' AND rank < {TOKENS}
        GROUP BY layer, neuron ORDER BY layer, neuron""").fetchall()
    concept: dict[tuple[int, int], tuple[str, list[str], float]] = {}
    postings, info, groups = None, {}, {}
    if vectors is not None:
        with_corpus = con.execute("SELECT count(*) FROM corpus_docs").fetchone()[0] > 0
        members = {(layer, neuron): c for layer, neuron, c in con.execute(
            "SELECT layer, neuron, cluster_id FROM neurons WHERE cluster_id IS NOT NULL").fetchall()} if clustered else None
        found = concepts(con, vectors, normalise, _OUT_Z, with_corpus, lexicon,
                         cfg.label_min_sim, cfg.label_min_evidence, cfg.label_min_centroid, groups=members)
        concept, postings, info, groups = found.names, found.postings, found.info, found.group_names
    out = {k: [] for k in ("layer", "neuron", "label", "concept", "evidence", "tokens", "method", "score")}
    for layer, neuron, tokens in rows:
        merged = merged_tokens(tokens)
        found = concept.get((layer, neuron))
        if found:
            word, evidence, sim = found
            evidence = [t for t in evidence if t != word]         # the name itself is in the label already
            label, method = f"{word}: {', '.join(evidence[:SHOWN])}", "word vectors"
        else:
            word, evidence, sim = None, [], None
            label = f"{NO_CONCEPT}: {' · '.join(merged[:SHOWN])}" if vectors is not None else " · ".join(merged[:SHOWN])
            method = "tokens" if vectors is None else "word vectors: none"
        for key, value in (("layer", layer), ("neuron", neuron), ("label", label), ("concept", word),
                           ("evidence", evidence), ("tokens", merged), ("method", method),
                           ("score", None if sim is None else round(float(sim), 4))):
            out[key].append(value)
    table = pa.table({"layer": pa.array(out["layer"], pa.int16()), "neuron": pa.array(out["neuron"], pa.int32()),
                      "label": pa.array(out["label"], pa.string()), "concept": pa.array(out["concept"], pa.string()),
                      "evidence": pa.array(out["evidence"], pa.list_(pa.string())),
                      "tokens": pa.array(out["tokens"], pa.list_(pa.string())),
                      "method": pa.array(out["method"], pa.string()), "score": pa.array(out["score"], pa.float32())})
    return table, postings, cluster_names(groups), {f"concepts_{k}": v for k, v in info.items() if k != "resource"}


def cluster_names(group_names: dict) -> pa.Table:
    """One row per cluster that has a concept: its name, "months (31 of 227): month, days, year"
    (the concept, how many members have an evidence term among their top terms, of how many,
    and the strongest evidence terms other than the concept itself)."""
    ids, labels = [], []
    for cluster_id, (word, evidence, _, with_evidence, size) in sorted(group_names.items()):
        shown = [t for t in evidence if t != word][:SHOWN]
        ids.append(cluster_id)
        labels.append(f"{word} ({with_evidence} of {size})" + (f": {', '.join(shown)}" if shown else ""))
    return pa.table({"cluster_id": pa.array(ids, pa.int32()), "label": pa.array(labels, pa.string())})


def name_clusters(con, names: pa.Table, exemplar_votes: bool) -> int:
    """Clusters get the cluster stage's token labels back (a name from an earlier run never
    stays), then those with a concept get its name; returns how many."""
    from atlas.stages.cluster import write_labels
    write_labels(con, exemplar_votes)
    if names.num_rows:
        update_from_arrow(con, "clusters", names, keys=("cluster_id",))
    return names.num_rows


def run(ctx: Context, cfg: LabelsConfig) -> dict:
    cfg.validate()
    ctx.require("decode", "the decoded tokens to label")
    vectors, why = wordvec.load()
    lexicon, lexicon_why = lexicon_mod.load()
    source = vectors.source if vectors is not None else {"missing": why}
    source = {**source, "lexicon": lexicon.source if lexicon is not None else {"missing": lexicon_why}}
    fingerprint = ctx.fingerprint(cfg=asdict(cfg), resource=source, tokens=TOKENS, concept_postings=POSTINGS,
                                 cluster_names="shared terms")
    if ctx.is_done(fingerprint):
        return {"skipped": True}
    start = time.perf_counter()
    store = ctx.store
    cluster = finished_stage(store.con, "cluster")
    table, postings, names, info = compute_labels(store.con, cfg, vectors, lexicon, clustered=cluster is not None)
    faults.point(STAGE, "labels computed")
    with store.transaction() as con:
        con.execute("DELETE FROM neuron_labels")
        insert_arrow(con, "neuron_labels", table, order="layer, neuron")
        con.execute("DELETE FROM concept_postings")
        if postings is not None:
            insert_arrow(con, "concept_postings", postings, order="word, layer, neuron")
        update_from_arrow(con, "neurons", table.select(["layer", "neuron", "label"]))
        named = name_clusters(con, names, bool(cluster.get("exemplar_labels"))) if cluster is not None else 0
        with_concept = con.execute("SELECT count(*) FROM neuron_labels WHERE concept IS NOT NULL").fetchone()[0]
        seconds = round(time.perf_counter() - start, 2)
        ctx.finish(fingerprint, cfg, resource=source, seconds=seconds, neurons=table.num_rows,
                   with_concept=with_concept, clusters_named=named,
                   concept_postings=0 if postings is None else postings.num_rows, **info)
        faults.point(STAGE, "written, not committed")
    faults.point(STAGE, "committed")
    if vectors is None:
        print(f"labels: {why}")
    return {"seconds": seconds, "neurons": table.num_rows, "with_concept": with_concept, "clusters_named": named,
            "resource": source}
