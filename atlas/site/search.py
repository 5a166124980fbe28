"""Concept search: a sharded static index of the tokens each neuron decodes to or fires on.

Typing "dog" finds the neurons whose decoded tokens (any side, top or bottom) or whose
corpus exemplars are " dog", "Dog", "dog" ..., strongest first. The index is JSON under
``search/idx/`` in the site, its postings packed in strings (``atlas.site.index_format``:
the index's constants, terms, shards and packing), sharded by a hash of the term, so a query
fetches one small file per word however large the model is. This module writes it; the search
page's script (``site_templates/assets/atlas-search.js``) and ``atlas search``
(``atlas.site.search_query``) read the same files and rank with the same rule; keep
``normalise``, ``query_terms``, ``shard_of``, ``entry_postings`` and ``rank`` in step with
their JavaScript twins.

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
  matching every word. Neurons rank by how many of the words they match, then by their place
  in the phrase's own list where it has one (a known phrase is the concept asked for: "body
  part" lists its matches before neurons that write "part"), then by their best
  position in any one word's list (so the words' best neurons alternate: "new york" lists
  York neurons beside New ones), then by the sum of their scores, then by (layer, neuron).
  A direction filter keeps only the matches of that direction before ranking.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pyarrow as pa

from atlas.errors import AtlasError
from atlas.site.concept_source import EXEMPLAR_Z, LITERAL_GAIN, concept_matches
from atlas.site.index_format import (B64, CONCEPT, DESCRIPTION, EVIDENCED, FIRES, LABEL_CHUNK, META_NAME, OUT_TOP,
                                     POSTING_FIELDS, SCHEMA, SHARD_BYTES, SOURCES, normalise, posting_layout,
                                     query_terms_all, shard_name, shard_of)
from atlas.site.text import html_safe_json, to_json
from atlas.store import finished_stage

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
               {EXEMPLAR_Z} AS z, {check} AS "check", NULL::VARCHAR AS evidence
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

