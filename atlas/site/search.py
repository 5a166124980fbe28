"""Concept search: a sharded static index of the tokens each neuron decodes to or fires on.

Typing "dog" finds the neurons whose decoded tokens (any side, top or bottom) or whose
corpus exemplars are " dog", "Dog", "dog" ..., strongest first. The index is JSON under
``search/idx/`` in the site, its postings packed in strings (see "the shards' format" below),
sharded by a hash of the term, so a query fetches one small file per word however large the
model is. The search page's script (``site_templates/assets/atlas-search.js``) and
``atlas search`` read the same files and rank with the same rule; keep ``normalise``,
``query_terms``, ``shard_of``, ``entry_postings`` and ``rank`` in step with their
JavaScript twins.

Definitions (also on the search page):

- **term**: a token's text after NFKC, without leading space markers (space, GPT-2's
  ``Ġ``, SentencePiece's ``▁``) and without punctuation, symbols, spaces or control
  characters at either end, lower-cased. " Dog", "dog." and "▁DOG" are all ``dog``.
- **strength** of a decoded token: ``|logit - mean| / std``, the logit's distance from
  the mean of that side's logits over the whole vocabulary, in standard deviations.
  Of an exemplar token: ``|activation - mean| / std`` over the neuron's corpus activations.
- **score** of a match: its strength, except that a match on a neuron's top decoded
  ``out`` tokens is weighted by the neuron's clamp check where the clamp stage measured it:
  ``strength x (0.5 + faithfulness)``. Chance-level faithfulness (0.5) leaves it as it is,
  a decoding that pushing the neuron bears out (1.0) counts half as much again, one that it
  contradicts (0) half. Unmeasured neurons keep their strength. In integers, as stored:
  ``(strength100 x (50 + faithfulness100) + 50) // 100``.
- A word of a neuron's LLM description (describe stage) matches with strength
  ``10 x detection score`` (5 where it is not scored: chance), so a description that its
  scorer bore out ranks beside strong decoded tokens.
- A neuron's score for a term is its best match's; per term the index keeps the
  ``search_postings`` best neurons (and says how many matched in all).
- **best evidence**, with concept matches in the index: a neuron that writes the term (a
  top ``out`` token spelling it) has evidence at cosine 1, the most there is, so on the
  concept matches' scale its match weighs ``LITERAL_GAIN`` (the gain of summed cosine 1,
  about 5.7) times its score, plus the neuron's own concept match for the term where it
  has one; every other match weighs its score. A term's neurons are listed by that weight
  (the match shown is the one that gave it); without concept matches, by score.
- **direction** of a match: ``promotes`` (top ``out`` tokens, and concept matches read from
  them), ``suppresses`` (bottom ``out`` tokens) or ``reads`` (``in``/``gate``
  sides, corpus exemplars and concept matches of the tokens a neuron fires on: what makes the
  neuron fire); a description word has none. The index keeps a neuron's best match of each
  direction for a term, its best of all first (the one an unfiltered list shows; a direction
  filter shows the best of that direction: a neuron may promote a word and fire on it); per
  term it counts the neurons of each direction (a neuron in each of its directions), and keeps
  the ``search_postings // 2`` best of each beside the ``search_postings`` best overall, so a
  direction filter still fills a page.
- A query is whitespace-separated words; with several, the whole phrase (its terms joined
  by one space, a multi-word token or concept) is looked up too and a match on it counts as
  matching every word. Neurons rank by how many of the words they match, then by their best
  position in any one word's list (so the words' best neurons alternate: "new york" lists
  York neurons beside New ones), then by the sum of their scores, then by (layer, neuron).
  A direction filter keeps only the matches of that direction before ranking.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Callable

import pyarrow as pa

from atlas.errors import AtlasError
from atlas.site.concept_source import LITERAL_GAIN, concept_matches
from atlas.site.text import html_safe_json, show_token, to_json, visible
from atlas.store import finished_stage

INDEX_DIR = "search/idx"
META_NAME = "meta.json"
SCHEMA = 6              # 2: postings carry the clamp check (faithfulness); 3: concept and description matches;
                        # 4: per-direction counts and postings, neuron labels in labels/; 5: packed postings and evidence;
                        # 6: concept matches of the tokens a neuron fires on (src 10)
# Where a match was found: src codes 0-5 are (side, polarity) of decoded_tokens, 6-7 exemplars,
# 8 a concept match of the tokens a neuron writes (``atlas.site.concept_source``), whose "token"
# is its evidence terms, 9 a word of the neuron's description (the describe stage), 10 a concept
# match of the tokens it fires on in the corpus, its evidence as 8's.
SOURCES = ("in top", "in bottom", "gate top", "gate bottom", "out top", "out bottom", "exemplar max", "exemplar min",
           "concept", "description", "concept fires")
CONCEPT = 8
DESCRIPTION = 9
FIRES = 10
EVIDENCED = (CONCEPT, FIRES)        # the sources whose token is a list of evidence terms
DIRECTIONS = ("promotes", "suppresses", "reads")
SRC_DIRECTION = (2, 2, 2, 2, 0, 1, 2, 2, 0, None, 2)    # SOURCES -> DIRECTIONS index (None: no direction)
LABEL_CHUNK = 256       # neurons per label file, labels/<layer>/<neuron // LABEL_CHUNK>.json: a list of labels
# A posting's integers: strength x 100; rank, its rank in the source; variant, its token's place in the
# term's ``t`` (for a concept match, how many evidence words it has in ``e``); check, the faithfulness
# x 100 (-1: none). How they are packed: "the shards' format" below.
POSTING_FIELDS = ("layer", "neuron", "strength", "src", "rank", "variant", "check")
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"      # URL-safe base 64: JSON- and HTML-safe
SAFE_INT = 2 ** 53      # a JavaScript number holds every integer below it exactly: the limit of one packed group
OUT_TOP = 4             # the source whose matches the clamp check weighs (SOURCES[4])
SHARD_BYTES = 32_768    # aimed-at mean shard size; a query fetches one shard per word
MAX_WORDS = 8           # words of a query that are searched, which bounds its download
_MARKERS = ("\u0120", "\u2581")      # Ġ and ▁ count as a leading space; elsewhere they are letters


# -- terms ------------------------------------------------------------------------------
def _edge(ch: str) -> bool:
    """Punctuation, symbol, separator or control: stripped from both ends of a term."""
    return unicodedata.category(ch)[0] in "PSZC"


def normalise(text: str | None) -> str:
    """The search term of a token or query word ('' when nothing searchable is left)."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKC", text)
    i, j = 0, len(t)
    while i < j and (t[i] in _MARKERS or _edge(t[i])):
        i += 1
    while j > i and _edge(t[j - 1]):
        j -= 1
    return t[i:j].lower()


def query_terms(query: str) -> list[str]:
    """Distinct terms of a query, in order; words are split at separators and control characters."""
    return query_terms_all(query)[:MAX_WORDS]


def query_terms_all(query: str) -> list[str]:
    """Every distinct term of a text, in order (``query_terms`` keeps the first ``MAX_WORDS``)."""
    words, word = [], []
    for ch in query:
        cat = unicodedata.category(ch)
        if cat[0] == "Z" or cat == "Cc":
            words.append("".join(word))
            word = []
        else:
            word.append(ch)
    words.append("".join(word))
    terms: list[str] = []
    for w in words:
        t = normalise(w)
        if t and t not in terms:
            terms.append(t)
    return terms


def shard_of(term: str, n_shards: int) -> int:
    """FNV-1a (32 bit) of the term's UTF-8 bytes, modulo the shard count."""
    h = 0x811C9DC5
    for b in term.encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % n_shards


def shard_name(shard: int, n_shards: int) -> str:
    width = max(1, len(f"{n_shards - 1:x}"))
    return f"{shard:0{width}x}.json"


# -- building the index ------------------------------------------------------------------
def _tables(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def _term_table(con) -> pa.Table:
    """token_id -> term for every token with a searchable term (a vocabulary is a few 100k rows)."""
    rows = con.execute("SELECT token_id, token FROM vocab").fetchall()
    if not rows:    # a store written before the vocab table: the decoded tokens name themselves
        rows = con.execute("SELECT DISTINCT token_id, token FROM decoded_tokens").fetchall()
    ids, terms = [], []
    for token_id, token in rows:
        term = normalise(token)
        if term:
            ids.append(token_id)
            terms.append(term)
    return pa.table({"token_id": pa.array(ids, pa.int32()), "term": pa.array(terms, pa.string())})


def _side_stat(stat: str) -> str:
    return (f"CAST(CASE d.side WHEN 'in' THEN n.in_{stat} WHEN 'gate' THEN n.gate_{stat} "
            f"ELSE n.out_{stat} END AS DOUBLE)")


def score(strength: int, src: int, check: int) -> int:
    """A match's score from its strength and its neuron's faithfulness (both x 100; -1: not measured)."""
    return (strength * (50 + check) + 50) // 100 if src == OUT_TOP and check >= 0 else strength


def _check_sql(con) -> str:
    """The neurons' faithfulness x 100 as an integer, -1 where the clamp stage did not measure one."""
    has = con.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'neurons' "
                      "AND column_name = 'faithfulness'").fetchone()[0] and finished_stage(con, "clamp") is not None
    # NaN (a neuron without decoded `out` tokens to check) counts as not measured, like NULL.
    return ("CASE WHEN isfinite(n.faithfulness) THEN CAST(floor(CAST(n.faithfulness AS DOUBLE) * 100 + 0.5) "
            "AS INTEGER) ELSE -1 END" if has else "-1")


def _description_terms(con) -> pa.Table | None:
    """(term, layer, neuron, z): each distinct word of each description, z = 10 x its score (5 unscored)."""
    if "descriptions" not in _tables(con):
        return None
    rows = {}
    for layer, neuron, text, sc in con.execute("SELECT layer, neuron, description, score FROM descriptions "
                                               "WHERE description IS NOT NULL ORDER BY layer, neuron").fetchall():
        z = 5.0 if sc is None or sc != sc else 10.0 * float(sc)
        for term in query_terms_all(text):
            if len(term) >= 3:          # "a", "of", "to": every description has them
                rows[(term, layer, neuron)] = z
    if not rows:
        return None
    keys = list(rows)
    return pa.table({"term": pa.array([k[0] for k in keys], pa.string()),
                     "layer": pa.array([k[1] for k in keys], pa.int16()),
                     "neuron": pa.array([k[2] for k in keys], pa.int32()),
                     "z": pa.array(list(rows.values()), pa.float64())})


def _matches_sql(with_exemplars: bool, check: str = "-1") -> str:
    # In double precision, so that a recomputation in Python gives the same numbers. Without
    # the moments (an old store) a raw |logit| or |normalised activation| ranks instead.
    decoded = f"""
        SELECT t.term, d.layer, d.neuron,
               (list_position(['in', 'gate', 'out'], d.side) - 1) * 2
                 + CASE WHEN d.polarity = 'bottom' THEN 1 ELSE 0 END AS src,
               d.rank, d.token_id,
               coalesce(abs(CAST(d.logit AS DOUBLE) - {_side_stat('logit_mean')})
                          / nullif({_side_stat('logit_std')}, 0), abs(CAST(d.logit AS DOUBLE))) AS z,
               {check} AS "check", NULL::VARCHAR AS evidence
        FROM decoded_tokens d JOIN search_terms t USING (token_id) JOIN neurons n USING (layer, neuron)"""
    if not with_exemplars:
        return decoded
    return decoded + f"""
        UNION ALL
        SELECT t.term, e.layer, e.neuron, CASE WHEN e.polarity = 'max' THEN 6 ELSE 7 END AS src,
               e.rank, t.token_id,
               coalesce(abs(CAST(e.activation AS DOUBLE) - CAST(n.act_mean AS DOUBLE))
                          / nullif(CAST(n.act_std AS DOUBLE), 0), abs(CAST(e.norm_activation AS DOUBLE))) AS z,
               {check} AS "check", NULL::VARCHAR AS evidence
        FROM exemplars e JOIN corpus_docs c USING (doc_id) JOIN neurons n USING (layer, neuron)
        JOIN search_terms t ON t.token_id = c.token_ids[e.token_pos + 1]"""


def extra_sources(con, check: str, concepts: bool) -> tuple[list[str], dict]:
    """SELECTs of match sources beyond the literal ones, each with the literal matches' columns
    and ``evidence``, and what each reported. New sources (an LLM's description words ...) join here."""
    selects, info = [], {}
    if concepts:
        select, info["concepts"] = concept_matches(con, check, CONCEPT, FIRES)
        if select is not None:
            selects.append(select)
    described = _description_terms(con)
    if described is not None:
        con.register("search_descriptions", described)
        selects.append(f"""SELECT s.term, s.layer, s.neuron, {DESCRIPTION} AS src, 0 AS rank, NULL AS token_id, s.z,
                                  {check} AS "check", NULL::VARCHAR AS evidence
                           FROM search_descriptions s JOIN neurons n USING (layer, neuron)""")
        info["descriptions"] = {"words": described.num_rows}
    return selects, info


def write_index(con, out_dir: str | Path, postings: int = 100, concepts: bool = True) -> dict:
    """Write the concept index of the store on ``con`` into ``out_dir`` (replaced whole); returns sizes.

    ``concepts``: add concept matches beside the literal ones, from the concept postings the
    labels stage kept; the result says which resource made them or why there are none.
    """
    if postings < 1:
        raise AtlasError("--search-postings must be at least 1")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    with_exemplars = finished_stage(con, "exemplars") is not None and {"exemplars", "corpus_docs"} <= _tables(con)
    check = _check_sql(con)
    con.register("search_terms", _term_table(con))
    aliases = _aliases(con, concepts)
    con.register("search_aliases", aliases)
    extra, sources_info = [], {}
    try:
        extra, sources_info = extra_sources(con, check, concepts)
        union = " UNION ALL ".join([_matches_sql(with_exemplars, check)] + extra)
        # A word of another language that the model reads as an English word (the labels stage's
        # concept_translations) has that word's matches beside its own; a description's word stays
        # the English one it said (its token).
        union = f"""WITH found AS ({union})
                    SELECT * FROM found UNION ALL
                    SELECT a.term, f.* EXCLUDE (term, evidence),
                           CASE WHEN f.src = {DESCRIPTION} THEN f.term ELSE f.evidence END AS evidence
                    FROM found f JOIN search_aliases a ON f.term = a.target"""
        # With concept matches in the index, a top `out` token that spells the term (the neuron
        # writes the word itself) weighs LITERAL_GAIN on their scale, and a neuron that also has
        # a concept match for the term adds the two: the word joins its evidence (see the README,
        # "best evidence"). Without them every match ranks by its score, as before.
        gain = round(LITERAL_GAIN * 100) if "concepts" in sources_info and "missing" not in sources_info["concepts"] else 100
        # One row per (term, neuron): its strongest match, then the term's strongest neurons.
        # Ties break on (layer, neuron), so the kept list is the ranking's own order.
        # The score is ``score()`` in SQL: integer arithmetic, so both give the same numbers.
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE search_kept AS
            WITH matches AS (
                SELECT term, layer, neuron, src, rank, token_id, z, "check", evidence,
                       CAST(floor(z * 100 + 0.5) AS INTEGER) AS strength
                FROM ({union}) WHERE z IS NOT NULL AND isfinite(z)
            ), scored AS (
                SELECT *, CASE WHEN src = {OUT_TOP} AND "check" >= 0
                               THEN (strength * (50 + "check") + 50) // 100 ELSE strength END AS score
                FROM matches
            ), weighed AS (
                SELECT *, CASE WHEN src = {OUT_TOP} THEN (score * {gain} + 50) // 100 ELSE score END AS weight
                FROM scored
            ), joint AS (
                SELECT *, weight + CASE WHEN src = {OUT_TOP} THEN coalesce(max(CASE WHEN src = {CONCEPT} THEN weight END)
                                        OVER (PARTITION BY term, layer, neuron), 0) ELSE 0 END AS rank_score
                FROM weighed
            ), directed AS (
                SELECT *, CASE WHEN src IN ({OUT_TOP}, {CONCEPT}) THEN 0 WHEN src = 5 THEN 1 WHEN src = {DESCRIPTION} THEN 3
                               ELSE 2 END AS dir
                FROM joint
            ), best AS (
                -- A neuron's best match of each direction (a neuron may promote a word and read it)
                SELECT * FROM directed
                QUALIFY row_number() OVER (PARTITION BY term, layer, neuron, dir
                                           ORDER BY rank_score DESC, score DESC, z DESC, src, rank) = 1
            ), firsts AS (
                -- ... and its best of all, the one an unfiltered list shows
                SELECT *, row_number() OVER (PARTITION BY term, layer, neuron
                                             ORDER BY rank_score DESC, score DESC, z DESC, src, rank) = 1 AS first
                FROM best
            ), counted AS (
                SELECT *, row_number() OVER (PARTITION BY term, first ORDER BY rank_score DESC, layer, neuron) AS first_pos,
                       row_number() OVER (PARTITION BY term, dir ORDER BY rank_score DESC, layer, neuron) AS dir_pos,
                       sum(CASE WHEN first THEN 1 ELSE 0 END) OVER (PARTITION BY term) AS n_total,
                       sum(CASE WHEN dir = 0 THEN 1 ELSE 0 END) OVER (PARTITION BY term) AS n_promotes,
                       sum(CASE WHEN dir = 1 THEN 1 ELSE 0 END) OVER (PARTITION BY term) AS n_suppresses,
                       sum(CASE WHEN dir = 2 THEN 1 ELSE 0 END) OVER (PARTITION BY term) AS n_reads
                FROM firsts
            ), kept AS (
                SELECT *, (first AND first_pos <= {int(postings)}) OR (dir < 3 AND dir_pos <= {max(1, int(postings) // 2)})
                          AS keep
                FROM counted
            ), chosen AS (
                -- A neuron kept for one direction keeps its best match too, which an unfiltered list reads first.
                SELECT * FROM kept QUALIFY keep OR (first AND bool_or(keep) OVER (PARTITION BY term, layer, neuron))
            )
            SELECT * EXCLUDE (first_pos, keep),
                   row_number() OVER (PARTITION BY term ORDER BY rank_score DESC, layer, neuron, first DESC, dir) AS pos
            FROM chosen""")
        n_postings, n_terms = con.execute("SELECT count(*), count(DISTINCT term) FROM search_kept").fetchone()
        # About 15 bytes a posting (8 of packed fields on the default atlas, the rest its share of the
        # evidence words) and 50 a term; shards a power of two so the count is easy to reason about.
        n_shards = 1
        while n_shards < 65_536 and (n_postings * 15 + n_terms * 50) / n_shards > SHARD_BYTES:
            n_shards *= 2
        terms = [t for (t,) in con.execute("SELECT DISTINCT term FROM search_kept").fetchall()]
        con.register("search_buckets", pa.table({"term": pa.array(terms, pa.string()),
                                                 "bucket": pa.array([shard_of(t, n_shards) for t in terms],
                                                                    pa.int32())}))
        sizes, layout = _write_shards(con, out_dir, n_shards)
        label_sizes = _write_labels(con, out_dir / "labels")
    finally:
        con.execute("DROP TABLE IF EXISTS search_kept")
        for name in ("search_terms", "search_buckets", "search_descriptions", "search_aliases"):
            try:
                con.unregister(name)
            except Exception:       # never registered: the build failed before that point
                pass
    n_neurons = con.execute("SELECT count(*) FROM neurons").fetchone()[0]
    meta = {"schema": SCHEMA, "hash": "fnv1a-32", "shards": n_shards, "postings": postings, "terms": n_terms,
            "clamp_weighted": check != "-1",
            "neurons": n_neurons, "sources": list(SOURCES), "exemplars": with_exemplars, "label_chunk": LABEL_CHUNK,
            "posting": layout,
            "concepts": _concept_meta(sources_info.get("concepts"))}
    (out_dir / META_NAME).write_text(to_json(meta), encoding="utf-8")
    return {"terms": n_terms, "postings": n_postings, "shards": n_shards, "bytes": sum(sizes),
            "largest_shard": max(sizes, default=0), "label_bytes": sum(label_sizes), "label_files": len(label_sizes),
            "seconds": round(time.perf_counter() - start, 3), "translations": aliases.num_rows,
            **sources_info}


def _aliases(con, concepts: bool) -> pa.Table:
    """(term, target, language): each word of another language that the model reads as the English
    word ``target`` (its likeliest accepted reading), by the language's English name; empty
    without concept matches or readings."""
    from atlas.lexicon import LANGUAGES

    rows = []
    if concepts and "concept_translations" in _tables(con):
        rows = con.execute("""SELECT word, term, language FROM concept_translations WHERE accepted
                              QUALIFY row_number() OVER (PARTITION BY word ORDER BY prob DESC, language, term) = 1
                              ORDER BY word""").fetchall()
    return pa.table({"term": pa.array([r[0] for r in rows], pa.string()),
                     "target": pa.array([r[1] for r in rows], pa.string()),
                     "language": pa.array([LANGUAGES.get(r[2], r[2]) for r in rows], pa.string())})


def _concept_meta(info: dict | None):
    """What the index's meta.json says of its concept matches: the resource, or why there are none."""
    if info is None:
        return None
    if "missing" in info:
        return {"missing": info["missing"]}
    return {"resource": info["resource"], "postings": info["postings"], "words": info["words"],
            "word_lists": info.get("word_lists")}


# -- the shards' format -------------------------------------------------------------------
# A shard is a JSON object, term -> entry, and an entry is
#   n: neurons matching the term in all; d: of them, how many promote, suppress, read it;
#   p: the kept postings, best first, packed: per posting a fixed number of base-64 digits
#      (``B64``) holding its ``POSTING_FIELDS`` in mixed radix, laid out by meta.json's
#      ``posting`` (``posting_layout``);
#   t: the token variants of its literal and description matches, in order of first use (a
#      posting's ``variant`` is its place there);
#   w, e (only with concept matches): the words of their evidence lists, the most used first,
#      as one string joined by spaces (a list where a word holds a space), and the concept
#      matches' evidence in posting order, each word as its index in w, a base-64 varint
#      (``_varint_sql``); a concept posting's ``variant`` is its number of evidence words.
# On the default atlas a posting takes 8 characters where the JSON lists of integers took
# 21, and the concept matches' evidence 19.2 MB (words 14.7, indices 4.5) where its text took 28.2.
def _digits(n: int) -> int:
    """Base-64 digits that hold the numbers 0 to n - 1 (at least one)."""
    d = 1
    while 64 ** d < n:
        d += 1
    return d


def posting_layout(low: list[int], high: list[int]) -> dict:
    """The packing of postings whose ``POSTING_FIELDS`` range over ``low``..``high``.

    Each field is stored as value - min in its radix (max - min + 1; a constant field takes
    none), fields after fields in groups whose product of radices stays below ``SAFE_INT``, so
    JavaScript unpacks a group exactly; ``groups`` is per group (fields, digits).
    """
    radix = [h - lo + 1 for lo, h in zip(low, high)]
    groups, product, count = [], 1, 0
    for r in radix:
        if count and product * r > SAFE_INT:
            groups.append([count, _digits(product)])
            product, count = 1, 0
        product, count = product * r, count + 1
    groups.append([count, _digits(product)])
    return {"fields": list(POSTING_FIELDS), "min": list(low), "radix": radix, "groups": groups}


_B64_VALUE = {c: i for i, c in enumerate(B64)}


def unpack(text: str, layout: dict) -> list[list[int]]:
    """The postings of a packed ``p``: per posting its ``POSTING_FIELDS``, best first."""
    low, radix, groups = layout["min"], layout["radix"], layout["groups"]
    width = sum(d for _, d in groups)
    out = []
    for start in range(0, len(text), width):
        values, at, f = [], start, 0
        for count, digits in groups:
            x = 0
            for ch in text[at:at + digits]:
                x = x * 64 + _B64_VALUE[ch]
            at += digits
            group = []
            for r in reversed(radix[f:f + count]):
                x, v = divmod(x, r)
                group.append(v)
            values.extend(reversed(group))
            f += count
        out.append([v + m for v, m in zip(values, low)])
    return out


def entry_postings(entry: dict, layout: dict) -> list[tuple]:
    """(layer, neuron, strength, src, rank, check, token) per kept posting of a term's entry, best first;
    a concept match's token is its evidence, "bird, mammal, monkey"."""
    words = entry.get("w", [])
    words = words.split(" ") if isinstance(words, str) else words
    evidence, at = entry.get("e", ""), 0
    out = []
    for layer, neuron, strength, src, rank, variant, check in unpack(entry["p"], layout):
        if src in EVIDENCED:
            picked = []
            for _ in range(variant):        # a concept match's variant: how many evidence words
                x = 0
                while (d := _B64_VALUE[evidence[at]]) >= 32:     # varint digits: 32 and up, more follow
                    x, at = x * 32 + d - 32, at + 1
                x, at = x * 32 + d, at + 1
                picked.append(words[x])
            token = ", ".join(picked)
        else:
            token = entry["t"][variant]
        out.append((layer, neuron, strength, src, rank, check, token))
    return out


def _b64_sql(expr: str, digits: int) -> str:
    """SQL: the non-negative integer ``expr`` in ``digits`` base-64 digits, most significant first."""
    return " || ".join(f"substr('{B64}', CAST(({expr}) // {64 ** k} % 64 AS INTEGER) + 1, 1)"
                       for k in reversed(range(digits)))


def _varint_sql(expr: str, most: int = 6) -> str:
    """SQL: the non-negative integer ``expr`` as a base-64 varint, 5 bits a digit, most significant
    first, every digit but the last 32 and up: 0-31 take one digit, up to 1,023 two ..."""
    cases = []
    for n in range(1, most + 1):
        digits = [f"substr('{B64}', CAST(({expr}) // {32 ** k} % 32 AS INTEGER) + {33 if k else 1}, 1)"
                  for k in reversed(range(n))]
        cases.append(f"WHEN ({expr}) < {32 ** n} THEN " + " || ".join(digits))
    return "CASE " + " ".join(cases) + " END"


def _packed_sql(layout: dict) -> str:
    """SQL: a posting's packed digits (columns named as ``POSTING_FIELDS``), as ``unpack`` reads them."""
    parts, f = [], 0
    for count, digits in layout["groups"]:
        x = "0"
        for name, low, r in list(zip(POSTING_FIELDS, layout["min"], layout["radix"]))[f:f + count]:
            x = f"({x}) * {r} + (CAST(\"{name}\" AS BIGINT) - {low})"
        parts.append(_b64_sql(x, digits))
        f += count
    return " || ".join(parts)


# A term's rows with their token variant numbered (temp table ``search_kept`` joined to its
# shard); a concept match carries its evidence apart from the variants.
_ROWS_SQL = f"""
    CREATE OR REPLACE TEMP TABLE search_rows AS
    WITH rows AS (
        SELECT b.bucket, k.term, k.pos, k.n_total, k.n_promotes, k.n_suppresses, k.n_reads,
               k.layer, k.neuron, k.strength, k.src, k.rank, k."check",
               CASE WHEN k.src IN {EVIDENCED} THEN NULL ELSE coalesce(k.evidence, v.token, k.term) END AS token,
               CASE WHEN k.src IN {EVIDENCED} THEN string_split(coalesce(k.evidence, k.term), ', ') END AS evidence
        FROM search_kept k JOIN search_buckets b USING (term) LEFT JOIN vocab v USING (token_id)
    ), variants AS (
        SELECT term, token, row_number() OVER (PARTITION BY term ORDER BY min(pos)) - 1 AS variant
        FROM rows WHERE token IS NOT NULL GROUP BY term, token
    )
    SELECT r.*, CASE WHEN r.src IN {EVIDENCED} THEN len(r.evidence) ELSE x.variant END AS variant
    FROM rows r LEFT JOIN variants x USING (term, token)"""

# One JSON object per term of a shard, built in DuckDB: a default atlas has about three million
# postings, and turning them into Python rows took 13 s of a 25 s index (the query 0.5 s).
_SHARDS_SQL = """
    WITH packed AS (
        SELECT bucket, term, any_value(n_total) AS n,
               CAST([any_value(n_promotes), any_value(n_suppresses), any_value(n_reads)] AS BIGINT[]) AS d,
               string_agg({packed}, '' ORDER BY pos) AS p
        FROM search_rows GROUP BY bucket, term
    ), variants AS (
        SELECT term, list(token ORDER BY variant) AS t
        FROM (SELECT DISTINCT term, token, variant FROM search_rows WHERE token IS NOT NULL) GROUP BY term
    ), uses AS (
        SELECT term, pos, unnest(evidence) AS word, unnest(range(len(evidence))) AS i
        FROM search_rows WHERE src IN {concept}
    ), words AS (
        SELECT term, word, row_number() OVER (PARTITION BY term ORDER BY count(*) DESC, word) - 1 AS w
        FROM uses GROUP BY term, word
    ), concept AS (
        SELECT u.term, string_agg({varint_w}, '' ORDER BY u.pos, u.i) AS e
        FROM uses u JOIN words USING (term, word) GROUP BY u.term
    ), word_lists AS (
        SELECT term, CASE WHEN bool_or(contains(word, ' ')) THEN to_json(list(word ORDER BY w))
                          ELSE to_json(string_agg(word, ' ' ORDER BY w)) END AS w
        FROM words GROUP BY term
    ), entries AS (
        SELECT p.bucket, p.term,
               '{{"d":' || to_json(p.d) || ',"n":' || CAST(p.n AS VARCHAR) || ',"p":' || to_json(p.p)
               || ',"t":' || to_json(coalesce(v.t, [])::VARCHAR[])
               || coalesce(',"w":' || wl.w || ',"e":' || to_json(c.e), '')
               || CASE WHEN al.target IS NULL THEN '' ELSE ',"a":' || to_json([al.target, al.language]) END || '}}' AS entry
        FROM packed p LEFT JOIN variants v USING (term) LEFT JOIN concept c USING (term)
        LEFT JOIN word_lists wl USING (term) LEFT JOIN search_aliases al USING (term)
    )
    SELECT bucket, '{{' || string_agg(to_json(term) || ':' || entry, ',' ORDER BY term) || '}}'
    FROM entries GROUP BY bucket ORDER BY bucket"""


def _json_text(text: str) -> str:
    """DuckDB's JSON text as ``to_json`` writes it: lower-case ``\\u`` escapes, ``html_safe_json``."""
    if "\\u00" in text:
        text = _UPPER_ESCAPE.sub(lambda m: m.group().lower() if m.group().startswith("\\u") else m.group(), text)
    return html_safe_json(text) + "\n"


_UPPER_ESCAPE = re.compile(r"\\(?:u00[0-9A-F]{2}|.)")     # an escape pair at a time, so "\\\\u" is left alone


def _write_shards(con, out_dir: Path, n_shards: int) -> tuple[list[int], dict]:
    """One JSON file per bucket of the kept postings (temp tables ``search_kept``, ``search_buckets``,
    ``search_aliases``);
    returns the files' sizes and the postings' layout (meta.json's ``posting``)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    sizes: list[int] = []
    written = set()
    try:
        con.execute(_ROWS_SQL)
        bounds = con.execute("SELECT " + ", ".join(f'min("{f}"), max("{f}")' for f in POSTING_FIELDS)
                             + " FROM search_rows").fetchone()
        layout = posting_layout([b or 0 for b in bounds[0::2]], [b or 0 for b in bounds[1::2]])
        cur = con.execute(_SHARDS_SQL.format(packed=_packed_sql(layout), concept=EVIDENCED, varint_w=_varint_sql("w")))
        while rows := cur.fetchmany(256):
            for bucket, text in rows:
                data = _json_text(text).encode("utf-8")
                (out_dir / shard_name(bucket, n_shards)).write_bytes(data)
                sizes.append(len(data))
                written.add(bucket)
    finally:
        con.execute("DROP TABLE IF EXISTS search_rows")
    # Every bucket gets a file, so a query never meets a 404 (which browsers log as an error).
    empty = to_json({}).encode("utf-8")
    for b in range(n_shards):
        if b not in written:
            (out_dir / shard_name(b, n_shards)).write_bytes(empty)
            sizes.append(len(empty))
    return sizes, layout


def _write_labels(con, out_dir: Path) -> list[int]:
    """The neurons' labels in files of ``LABEL_CHUNK`` neurons, a JSON list each (null: no label yet).

    Apart from the term shards because there a label would be repeated in every shard that
    lists its neuron (measured on a 4 x 2,048 synthetic: 25.1 MB of shards with labels inside,
    9.1 MB without); the page fetches only the files of the hits it shows.
    """
    sizes: list[int] = []
    key, labels = None, []

    def flush():
        if key is not None:
            path = out_dir / str(key[0]) / f"{key[1]}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = to_json(labels).encode("utf-8")
            path.write_bytes(data)
            sizes.append(len(data))

    cur = con.execute("SELECT layer, neuron, label FROM neurons ORDER BY layer, neuron")
    while rows := cur.fetchmany(65_536):
        for layer, neuron, label in rows:
            if (layer, neuron // LABEL_CHUNK) != key:
                flush()
                key, labels = (layer, neuron // LABEL_CHUNK), []
            # A neuron missing from the store leaves a null in its place, so places stay neuron % chunk.
            labels.extend([None] * (neuron % LABEL_CHUNK - len(labels)))
            labels.append(label)
    flush()
    return sizes


# -- querying ------------------------------------------------------------------------------
def rank(query: str, meta: dict, load: Callable[[int], dict], limit: int = 20, direction: str | None = None,
         labels: Callable[[int, int], list] | None = None) -> dict:
    """Rank the neurons for ``query`` from shards that ``load(shard_number)`` returns.

    ``direction``: one of ``DIRECTIONS`` to keep only matches of that direction, or None for all.
    ``labels(layer, chunk)``: a label file's list, to label the hits returned (None: no labels).
    Returns the query's terms, per term how many neurons match in all (``counts``) and in
    the direction (``direction_counts``), the whole phrase and its count where the index
    has it, how many neurons match any word among the kept postings and how many match
    every word, and the first ``limit`` hits, best first, each with its label.
    """
    if direction is not None and direction not in DIRECTIONS:
        raise AtlasError(f"direction {direction!r}: give one of {', '.join(DIRECTIONS)}")
    want = None if direction is None else DIRECTIONS.index(direction)
    terms = query_terms(query)
    phrase = " ".join(terms) if len(terms) > 1 else None
    shards: dict[int, dict] = {}
    hits: dict[tuple[int, int], dict] = {}
    counts: dict[str, int] = {}
    direction_counts: dict[str, int] = {}
    aliases: dict[str, list[str]] = {}      # term -> [the English word the model reads it as, its language]
    for term in terms + ([phrase] if phrase else []):
        b = shard_of(term, meta["shards"])
        if b not in shards:
            shards[b] = load(b)
        entry = shards[b].get(term)
        if entry and entry.get("a"):
            aliases[term] = entry["a"]
        counts[term] = entry["n"] if entry else 0
        direction_counts[term] = (entry["d"][want] if entry else 0) if want is not None else counts[term]
        if not entry:
            continue
        position = 0        # the neuron's place in this term's list (after the filter)
        seen = set()        # a neuron's first posting of a term is its best match, the others its best of other directions
        for layer, neuron, strength, src, rk, check, token in entry_postings(entry, meta["posting"]):
            if want is not None and SRC_DIRECTION[src] != want or want is None and (layer, neuron) in seen:
                continue
            seen.add((layer, neuron))
            hit = hits.get((layer, neuron))
            if hit is None:
                hit = hits[(layer, neuron)] = {"layer": layer, "neuron": neuron, "label": None, "words": set(),
                                               "best": position, "score": 0,
                                               "faithfulness": check / 100 if check >= 0 else None, "matches": []}
            hit["words"].update(terms if term == phrase else [term])
            hit["best"] = min(hit["best"], position)
            hit["score"] += score(strength, src, check)
            d = SRC_DIRECTION[src]
            hit["matches"].append({"term": term, "token": token, "source": meta["sources"][src],
                                   "direction": DIRECTIONS[d] if d is not None else None,
                                   "rank": rk, "strength": strength / 100})
            position += 1
    for h in hits.values():
        h["words"] = len(h["words"])
    ordered = sorted(hits.values(), key=lambda h: (-h["words"], h["best"], -h["score"], h["layer"], h["neuron"]))
    for h in ordered:
        h["score"] /= 100
        h["url"] = f"neurons/{h['layer']}/{h['neuron']}/"
        del h["best"]
    chunks: dict[tuple[int, int], list] = {}
    for h in ordered[:limit] if labels else []:
        key = (h["layer"], h["neuron"] // meta["label_chunk"])
        if key not in chunks:
            chunks[key] = labels(*key)
        h["label"] = chunks[key][h["neuron"] % meta["label_chunk"]]
    if phrase:      # the phrase is a lookup, not a word: report it apart
        phrase_count = counts.pop(phrase), direction_counts.pop(phrase)
    return {"terms": terms, "direction": direction, "counts": counts, "direction_counts": direction_counts,
            "aliases": aliases,
            "phrase": {"text": phrase, "count": phrase_count[0], "direction_count": phrase_count[1]} if phrase else None,
            "shards": sorted(shards), "matched": len(ordered),
            "match_all": sum(1 for h in ordered if h["words"] == len(terms)), "hits": ordered[:limit]}


def index_dir(path: str | Path) -> Path:
    """The concept index of a site: ``path`` is the build directory (holding site/) or the site itself."""
    path = Path(path)
    for candidate in (path / "site" / INDEX_DIR, path / INDEX_DIR):
        if (candidate / META_NAME).is_file():
            return candidate
    raise AtlasError(f"no search index at {path} (expected {path / 'site' / INDEX_DIR / META_NAME}); "
                     "run `atlas render` first")


def read_meta(idx: Path) -> dict:
    """The meta.json of the index in ``idx``, refused in words when this atlas cannot read its layout."""
    try:
        meta = json.loads((idx / META_NAME).read_text(encoding="utf-8"))
    except ValueError as e:
        raise AtlasError(f"{idx / META_NAME} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise AtlasError(f"{idx} holds a search index of schema {meta.get('schema') if isinstance(meta, dict) else None}; "
                         f"this atlas reads {SCHEMA}: render the site again")
    return meta


def search(path: str | Path, query: str, limit: int = 20, direction: str | None = None) -> dict:
    """Search the built site at ``path`` as its search page does; see ``rank``."""
    if limit < 1:
        raise AtlasError(f"--limit {limit}: give at least 1 (the neurons to list)")
    idx = index_dir(path)
    meta = read_meta(idx)
    if not query_terms(query):
        raise AtlasError(f"the query {query!r} has no words to search for")

    def load(b: int) -> dict:
        path = idx / shard_name(b, meta["shards"])
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def labels(layer: int, chunk: int) -> list:
        return json.loads((idx / "labels" / str(layer) / f"{chunk}.json").read_text(encoding="utf-8"))

    return rank(query, meta, load, limit, direction, labels)


def match_words(m: dict) -> str:
    """One match in words: its direction, the token, and why it matched (word, side, rank, strength)."""
    token, src = show_token(m["token"]), m["source"]
    if src == SOURCES[CONCEPT]:
        what = f"promotes words near \u2018{m['term']}\u2019 via {m['token']}"
    elif src == SOURCES[FIRES]:
        what = f"fires on words near \u2018{m['term']}\u2019 in the corpus via {m['token']}"
    elif src == SOURCES[DESCRIPTION]:
        what = f"its description says \u2018{m['token']}\u2019"     # the word itself, or what a reading copied
    elif src.startswith("exemplar"):
        what = f"fires {'on' if src.endswith('max') else 'most negatively on'} {token} in the corpus"
    elif src.startswith("out"):
        what = f"{'promotes' if src.endswith('top') else 'suppresses'} {token}"
    else:
        side = src.split()[0]
        what = f"reads {token}{' negatively' if src.endswith('bottom') else ''} ({side} side)"
    return f"{what}: \u2018{m['term']}\u2019, {src} #{m['rank']}, {shown_strength(m)}"


def shown_strength(m: dict) -> str:
    """A literal or exemplar match's strength is in standard deviations of the neuron's own
    distribution ("8.42σ"); a concept or description match's is a score made from such
    strengths ("strength 51.85"), not a number of σ. atlas-search.js writes it the same way."""
    if m["source"] in (SOURCES[CONCEPT], SOURCES[DESCRIPTION], SOURCES[FIRES]):
        return f"strength {m['strength']:.2f}"
    return f"{m['strength']:.2f}\u03c3"


def status_line(result: dict) -> str:
    """What matched, in one sentence whose numbers agree with the list; the search page's statusLine twin."""
    terms, d = result["terms"], result["direction"]
    verb = {"promotes": "promote", "suppresses": "suppress", "reads": "read"}.get(d)
    parts = []
    for t in terms:
        read = result.get("aliases", {}).get(t)
        part = (f"\u2018{t}\u2019" + (f" (the model's {read[1]} for \u2018{read[0]}\u2019)" if read else "")
                + f": {result['counts'][t]:,} neurons match")
        parts.append(part + (f", {result['direction_counts'][t]:,} {verb} it" if verb else ""))
    ph = result["phrase"]
    if ph and ph["count"]:
        parts.append(f"the phrase \u2018{ph['text']}\u2019: {ph['count']:,}" + (f", {ph['direction_count']:,} {verb} it" if verb else ""))
    line = "; ".join(parts)
    if len(terms) > 1:
        line += f"; {result['match_all']:,} of those kept match every word"
    shown = len(result["hits"])
    if not shown:
        return line + "; none to show" + (f" that {verb} these words" if verb else "")
    return line + f"; showing the best {shown:,}" + (f" that {verb} them" if verb else "")


def format_hits(result: dict) -> list[str]:
    """The lines ``atlas search`` prints: the status line, then one line per neuron."""
    lines = [status_line(result)]
    if not result["hits"]:
        return lines
    lines.append(f"{'#':>3}  {'neuron':<12}{'score':>7}  {'pushed':>6}  label | why it matched")
    for i, h in enumerate(result["hits"], 1):
        why = " · ".join(match_words(m) for m in h["matches"])
        pushed = "–" if h["faithfulness"] is None else f"{h['faithfulness']:.2f}"
        label = visible(h["label"]) or "(no label)"          # text on one line, its spaces as spaces
        lines.append(f"{i:>3}  {'L%d/N%d' % (h['layer'], h['neuron']):<12}{h['score']:>7.2f}  {pushed:>6}  "
                     f"{label} | {why}")
    return lines
