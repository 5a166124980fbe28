"""Concept matches for the search index: query words linked to neurons whose tokens mean something near them.

A literal match needs a neuron's token to spell the query word. A concept match needs
several of the neuron's top decoded `out` tokens to lie near the word in a space of word
vectors (``atlas.wordvec``): "animal" finds the neuron that decodes to " bird",
" mammal", " monkey" although none of them is " animal". Definitions (on the search page
too):

- **query vocabulary**: the searchable terms of the model's vocabulary, the whole-word
  tokens of the word vectors' own vocabulary and the corpus's commonest ``CORPUS_WORDS``
  words (letters only, at least 3 of them);
- **evidence** of a neuron for a word: its top ``RANKS`` decoded `out` terms (letters
  only, at least 3, other than the word itself, which is a literal match, and sharing no
  ``SPELLING`` letters in a row with it, which word vectors built from sub-word tokens
  mistake for meaning: "unanim" for "animal") whose cosine with the word is at least
  ``MIN_SIM`` and that has the word among its ``RELATED`` nearest query words; the
  ``EVIDENCE`` closest are shown;
- **strength** of a concept match: ``mean(strength) x min(sum(cosine) / REF_SIM, MAX_GAIN)``
  over the evidence, the strength of a decoded token as for literal matches (σ from the
  mean logit): two evidence terms at cosine 0.2 weigh as much as one literal match of
  their strength, four at 0.3 three times as much (a neuron whose tokens are many members
  of a category is better evidence than one token that spells the word); at least
  ``MIN_EVIDENCE`` evidence terms are needed (a plural and its singular are one);
- per word the ``POSTINGS`` strongest neurons are kept; a (word, neuron) pair that also
  matches literally keeps its better match.

The evidence terms travel with the posting, so a result says why it matched.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import numpy as np
import pyarrow as pa

RANKS = 10
MIN_SIM = 0.2
EVIDENCE = 5
MIN_EVIDENCE = 2
POSTINGS = 50
REF_SIM = 0.4                   # summed cosine at which a concept match is as strong as a literal one
MAX_GAIN = 5.0                  # ... and the most it can be, in multiples of a literal one
SPELLING = 4                    # letters in a row that make a pair alike in spelling, not meaning
RELATED = 32                    # query words kept per neuron term before the join
CORPUS_WORDS = 30_000
_WORD = re.compile(r"[^\W\d_]{3,24}")


def _letters(term: str) -> bool:
    return len(term) >= 3 and term.isalpha()


def query_vocabulary(con, normalise, with_corpus: bool, vectors=None) -> list[str]:
    """Model vocabulary terms (letters only, 3+), the word vectors' own whole-word tokens and the corpus's
    commonest words, sorted: the words that get concept postings."""
    words = set(vectors.words()) if vectors is not None else set()
    for (token,) in con.execute("SELECT token FROM vocab").fetchall():
        t = normalise(token)
        if len(t) >= 3 and t.isalpha():
            words.add(t)
    if with_corpus:
        counts: Counter = Counter()
        cur = con.execute("SELECT text FROM corpus_docs")
        while rows := cur.fetchmany(1024):
            for (text,) in rows:
                counts.update(w.lower() for w in _WORD.findall(text or ""))
        words.update(w for w, c in counts.most_common(CORPUS_WORDS) if c >= 2)
    return sorted(words)


def neuron_terms(con, normalise, z_sql: str) -> pa.Table:
    """(term, layer, neuron, rank, z): each neuron's top `out` terms, letters only, variants merged."""
    rows = con.execute(f"""
        SELECT d.layer, d.neuron, d.rank, d.token, {z_sql} AS z
        FROM decoded_tokens d JOIN neurons n USING (layer, neuron)
        WHERE d.side = 'out' AND d.polarity = 'top' AND d.rank < {RANKS}""").fetchall()
    best: dict[tuple, tuple] = {}
    for layer, neuron, rank, token, z in rows:
        t = normalise(token)
        if not _letters(t) or z is None or not np.isfinite(z):
            continue
        key = (t, layer, neuron)
        if key not in best or best[key][1] < z:
            best[key] = (rank, z)
    # A plural next to its singular is one term (" dog", "Dogs"): the singular stays.
    keys = sorted(k for k in best if not (k[0].endswith("s") and (k[0][:-1], k[1], k[2]) in best))
    return pa.table({"term": pa.array([k[0] for k in keys], pa.string()),
                     "layer": pa.array([k[1] for k in keys], pa.int16()),
                     "neuron": pa.array([k[2] for k in keys], pa.int32()),
                     "rank": pa.array([best[k][0] for k in keys], pa.int16()),
                     "z": pa.array([float(best[k][1]) for k in keys], pa.float64())})


def related_terms(vectors, words: list[str], terms: list[str], min_sim: float = MIN_SIM, chunk: int = 1024) -> pa.Table:
    """(word, term, sim): per neuron term the query words at cosine >= MIN_SIM, the RELATED closest.

    Each term nominates the words nearest it (" mammal" -> animal, species ...), rather than
    each word its nearest terms: a broad word such as "animal" has hundreds of member terms,
    and a cut per word would keep only the closest few.
    """
    W, T = vectors.embed(words), vectors.embed(terms)              # [words, dim], [terms, dim]
    out_w, out_t, out_s = [], [], []
    for lo in range(0, len(terms), chunk):
        S = T[lo:lo + chunk] @ W.T                                   # [chunk, words]
        # Few pairs reach MIN_SIM: rank only those (a partition of every row cost 20 s here).
        rows, cols = np.nonzero(S >= min_sim)
        sims = S[rows, cols]
        order = np.lexsort((cols, -sims, rows))                      # by term, closest word first
        rows, cols, sims = rows[order], cols[order], sims[order]
        starts = np.searchsorted(rows, rows, side="left")
        keep = np.arange(len(rows)) - starts < RELATED
        out_t.append(rows[keep] + lo)
        out_w.append(cols[keep])
        out_s.append(sims[keep])
    wi = np.concatenate(out_w) if out_w else np.zeros(0, int)
    ti = np.concatenate(out_t) if out_t else np.zeros(0, int)
    si = np.concatenate(out_s) if out_s else np.zeros(0, np.float32)
    # Word vectors pool sub-word tokens, so "unanim" lies near "animal" by spelling alone:
    # a pair sharing SPELLING letters in a row is left out.
    word_grams, term_grams = [_grams(w) for w in words], [_grams(t) for t in terms]
    keep = [word_grams[w].isdisjoint(term_grams[t]) for w, t in zip(wi.tolist(), ti.tolist())]
    wi, ti, si = wi[keep], ti[keep], si[keep]
    words_a, terms_a = np.array(words, dtype=object), np.array(terms, dtype=object)
    return pa.table({"word": pa.array(words_a[wi].tolist(), pa.string()),
                     "term": pa.array(terms_a[ti].tolist(), pa.string()),
                     "sim": pa.array(np.round(si.astype(np.float64), 4), pa.float64())})


def _grams(text: str) -> frozenset[str]:
    """Every run of SPELLING letters in ``text``: two texts are alike in spelling when they
    share one (the word itself and its plural included); a text shorter than that has none."""
    return frozenset(text[i:i + SPELLING] for i in range(len(text) - SPELLING + 1))


def score_concepts(con, vectors, normalise, z_sql: str, with_corpus: bool, min_sim: float = MIN_SIM,
                   min_evidence: int = MIN_EVIDENCE, keep: str = "") -> dict:
    """Create the temp table ``concept_scores``: per (query word, neuron) with evidence, its evidence.

    Columns: word, layer, neuron, n_ev (evidence terms), sim_sum (their summed cosine),
    z (strength as defined above), rank (best rank among them), evidence (terms, closest
    first, joined by ", "); the word itself, its plural or singular never counts as its own evidence.
    ``keep``, SQL that follows ``SELECT * FROM scores`` (a WHERE, a QUALIFY ...), picks the rows
    the caller wants; only they get their evidence list. Returns what it took.
    """
    start = time.perf_counter()
    terms_t = neuron_terms(con, normalise, z_sql)
    terms = sorted(set(terms_t.column("term").to_pylist()))
    words = query_vocabulary(con, normalise, with_corpus, vectors)
    related = related_terms(vectors, words, terms, min_sim) if terms and words else \
        pa.table({"word": pa.array([], pa.string()), "term": pa.array([], pa.string()),
                  "sim": pa.array([], pa.float64())})
    con.register("concept_neuron_terms", terms_t)
    con.register("concept_related", related)
    other = "t.term <> r.word AND t.term || 's' <> r.word AND r.word || 's' <> t.term"
    try:
        # No window over the joined rows (tens of millions on a default atlas): sums first, and
        # the evidence lists only for the rows kept (all of them cost 9 of 12 s here).
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE concept_scores AS
            WITH scores AS (
                SELECT r.word, t.layer, t.neuron, count(*) AS n_ev, sum(r.sim) AS sim_sum,
                       avg(t.z) * least(sum(r.sim) / {REF_SIM}, {MAX_GAIN}) AS z, min(t.rank) AS rank
                FROM concept_related r JOIN concept_neuron_terms t USING (term)
                -- the word itself (or its plural or singular) is a literal match, not evidence of a concept
                WHERE {other}
                GROUP BY r.word, t.layer, t.neuron HAVING count(*) >= {int(min_evidence)}
            ), kept AS (SELECT * FROM scores {keep}
            ), evidence AS (
                SELECT k.word, k.layer, k.neuron,
                       array_to_string(list(t.term ORDER BY r.sim DESC, t.term)[1:{EVIDENCE}], ', ') AS evidence
                FROM kept k JOIN concept_neuron_terms t USING (layer, neuron)
                JOIN concept_related r ON r.term = t.term AND r.word = k.word
                WHERE {other}
                GROUP BY k.word, k.layer, k.neuron
            )
            SELECT k.*, e.evidence FROM kept k JOIN evidence e USING (word, layer, neuron)""")
    finally:
        con.unregister("concept_neuron_terms")
        con.unregister("concept_related")
    return {"vocabulary": len(words), "neuron_terms": len(terms), "related_pairs": related.num_rows,
            "seconds": round(time.perf_counter() - start, 2), "resource": vectors.source}


def concept_matches(con, vectors, normalise, z_sql: str, check_sql: str, src: int,
                    with_corpus: bool) -> tuple[str, dict]:
    """Concept matches as the SELECT of a search source, and what making them took.

    The SELECT gives the columns of the literal matches (term, layer, neuron, src, rank,
    token_id, z, check) plus ``evidence``; it reads the temp table ``search_concepts``,
    which the caller drops.
    """
    info = score_concepts(con, vectors, normalise, z_sql, with_corpus, keep=(
        f"QUALIFY row_number() OVER (PARTITION BY word ORDER BY z DESC, layer, neuron) <= {POSTINGS}"))
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE search_concepts AS
        SELECT word AS term, layer, neuron, {src} AS src, rank, -1 AS token_id, z, evidence FROM concept_scores""")
    con.execute("DROP TABLE concept_scores")
    info["postings"], info["words"] = con.execute("SELECT count(*), count(DISTINCT term) FROM search_concepts").fetchone()
    # The clamp check joins here, as for literal matches.
    select = f"""
        SELECT c.term, c.layer, c.neuron, c.src, c.rank, c.token_id, c.z, {check_sql} AS "check", c.evidence
        FROM search_concepts c JOIN neurons n USING (layer, neuron)"""
    return select, info
