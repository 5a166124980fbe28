"""Concept matches for the search index, and concept names for labels: query words linked to
neurons whose decoded tokens mean something near them.

A literal match needs a neuron's token to spell the query word. A concept match needs
several of the neuron's top decoded `out` terms to lie near the word in a space of word
vectors (``atlas.wordvec``): "animal" finds the neuron that decodes to " bird",
" mammal", " monkey" although none of them is " animal". Definitions (on the search page
too):

- **query vocabulary**: the searchable terms of the model's vocabulary, the whole-word
  tokens of the word vectors' own vocabulary and the corpus's commonest ``CORPUS_WORDS``
  words (letters only, at least 3 of them);
- **word**: a term of the lexicon (``atlas.lexicon``) counted at least ``LEXICON_MIN``
  times, a whole-word token of the word vectors or a corpus word; a **function word**: one
  of the lexicon's ``FUNCTION_WORDS`` commonest words (without the lexicon: the corpus's);
- **evidence** of a neuron for a query word: each of its top ``RANKS`` decoded `out` terms
  (variants and a plural merged) that is a word and no function word, whose cosine with
  the query word is at least ``MIN_SIM``, that is not the query word itself, its plural or
  its singular (a literal match) and that shares no ``SPELLING`` letters in a row with it
  (word vectors pooled from sub-word tokens mistake spelling for meaning: "unanim" for
  "animal"); the ``EVIDENCE`` closest are shown;
- **strength** of a concept match: ``mean(strength) x gain`` over the evidence, the
  strength of a decoded token as for literal matches (σ from the mean logit), where
  ``gain = min(1 + (sum(cosine) - MIN_EVIDENCE x MIN_SIM) / REF_SIM, MAX_GAIN)``: the least
  evidence there can be weighs one literal match (one that writes the word itself:
  ``LITERAL_GAIN``), and each further ``REF_SIM`` of summed cosine one more. A category's
  members each lie only 0.15-0.35 from the category's name, but a neuron that writes many
  of them adds up to strong evidence; at least ``MIN_EVIDENCE`` evidence terms are needed;
- per word the ``POSTINGS`` strongest neurons are kept; how they rank beside literal matches
  (``LITERAL_GAIN``) is in ``atlas.site.search``.

The evidence terms travel with the posting, so a result says why it matched. The labels
stage names a neuron's concept from the same evidence (``concept_names``).

Every (term, word) pair is scored in chunks of words with numpy: the pairs at ``MIN_SIM``
or more are too many (14 million on the default atlas) for a join in DuckDB.
"""

from __future__ import annotations

import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

RANKS = 20
MIN_SIM = 0.15
EVIDENCE = 5
MIN_EVIDENCE = 2
POSTINGS = 50
REF_SIM = 0.15                  # summed cosine beyond the least evidence that adds one literal match's strength
MAX_GAIN = 10.0                 # the most a concept match can be, in multiples of a literal one
# A neuron that writes the query word itself (a top `out` token spelling it) has evidence at cosine 1,
# the most there is: on the concept matches' scale its match weighs the gain of summed cosine 1
# (about 5.7), so only a concept match whose evidence sums to more outranks it at equal strength.
LITERAL_GAIN = 1 + (1.0 - MIN_EVIDENCE * MIN_SIM) / REF_SIM
SPELLING = 4                    # letters in a row that make a pair alike in spelling, not meaning
CORPUS_WORDS = 30_000
LEXICON_MIN = 50                # lexicon count from which a term is a word
FUNCTION_WORDS = 200            # the lexicon's commonest words: never evidence, never a concept's name
LITERAL_SIM = 0.5               # what a name's own word among the neuron's terms adds to its summed cosine
GENERIC_SHARE = 0.002           # a term among the top terms of more neurons than this share names none
GENERIC_MIN = 20                # ... and of more than this many
CHUNK = 128                     # query words scored at once ([neurons, CHUNK] counts in memory)
_WORD = re.compile(r"[^\W\d_]{3,24}")


def _letters(term: str) -> bool:
    return len(term) >= 3 and term.isalpha()


def _corpus_counts(con) -> Counter:
    counts: Counter = Counter()
    cur = con.execute("SELECT text FROM corpus_docs")
    while rows := cur.fetchmany(1024):
        for (text,) in rows:
            counts.update(w.lower() for w in _WORD.findall(text or ""))
    return counts


@dataclass
class Vocabulary:
    query: list[str]            # words that get concept postings, sorted
    words: set[str]             # terms that are words (evidence may only be words)
    function: set[str]          # function words: never evidence, never a name
    source: dict                # what decided words and function words


def vocabulary(con, normalise, with_corpus: bool, vectors=None, lexicon=None) -> Vocabulary:
    """The query vocabulary, the words and the function words (see the module's docstring)."""
    whole = set(vectors.words()) if vectors is not None else set()
    query = set(whole)
    for (token,) in con.execute("SELECT token FROM vocab").fetchall():
        t = normalise(token)
        if _letters(t):
            query.add(t)
    counts = _corpus_counts(con) if with_corpus else Counter()
    corpus = {w for w, c in counts.most_common(CORPUS_WORDS) if c >= 2}
    query |= corpus
    words = whole | corpus
    if lexicon is not None:
        # The word vectors' "whole-word" tokens include word starts ("encourag", "janu"): with a
        # lexicon, words are its words and the corpus's.
        words = lexicon.words(LEXICON_MIN) | corpus
        # Word pieces of the model's vocabulary ("itarian") lie near words by spelling only:
        # they keep their literal matches and get no concept postings.
        query &= words | whole
        function = set(lexicon.commonest(FUNCTION_WORDS))
        source = {"words": f"{lexicon.source['name']} (count >= {LEXICON_MIN}), word vectors, corpus",
                  "function_words": f"{lexicon.source['name']}'s {FUNCTION_WORDS} commonest"}
    else:
        function = {w for w, _ in counts.most_common(FUNCTION_WORDS)}
        source = {"words": "word vectors, corpus (no lexicon)", "function_words": f"corpus's {FUNCTION_WORDS} commonest"}
    return Vocabulary(sorted(query), words, function, source)


@dataclass
class NeuronTerms:
    """Each neuron's evidence-capable terms: words, no function words, variants merged."""

    keys: list[tuple[int, int]]     # (layer, neuron), sorted
    terms: list[str]                # distinct terms, sorted
    index: np.ndarray               # [neurons, RANKS] int32: term index, -1 none
    z: np.ndarray                   # [neurons, RANKS] float64: the term's strength in the neuron
    rank: np.ndarray                # [neurons, RANKS] int32: its best rank


def neuron_terms(con, normalise, z_sql: str, vocab: Vocabulary) -> NeuronTerms:
    rows = con.execute(f"""
        SELECT d.layer, d.neuron, d.rank, d.token, {z_sql} AS z
        FROM decoded_tokens d JOIN neurons n USING (layer, neuron)
        WHERE d.side = 'out' AND d.polarity = 'top' AND d.rank < {RANKS}
        ORDER BY d.layer, d.neuron, d.rank""").fetchall()
    per: dict[tuple[int, int], dict[str, tuple[int, float]]] = {}
    for layer, neuron, rank, token, z in rows:
        t = normalise(token)
        if not _letters(t) or z is None or not np.isfinite(z):
            continue
        d = per.setdefault((layer, neuron), {})
        if t not in d or d[t][1] < z:
            d[t] = (min(rank, d[t][0]) if t in d else rank, z)
    for d in per.values():
        # A plural next to its singular is one term (" dog", "Dogs"): the singular stays, with the better strength.
        for t in sorted((t for t in d if t.endswith("s")), key=len, reverse=True):
            if t[:-1] not in d:
                continue
            r, z = d.pop(t)
            d[t[:-1]] = (min(r, d[t[:-1]][0]), max(z, d[t[:-1]][1]))
        for t in [t for t in d if t not in vocab.words or t in vocab.function]:
            del d[t]
    keys = sorted(k for k, d in per.items() if d)
    terms = sorted({t for k in keys for t in per[k]})
    at = {t: i for i, t in enumerate(terms)}
    index = np.full((len(keys), RANKS), -1, np.int32)
    z = np.zeros((len(keys), RANKS))
    rank = np.zeros((len(keys), RANKS), np.int32)
    for i, k in enumerate(keys):
        for j, (t, (r, s)) in enumerate(sorted(per[k].items(), key=lambda kv: kv[1][0])):
            index[i, j], z[i, j], rank[i, j] = at[t], s, r
    return NeuronTerms(keys, terms, index, z, rank)


def _masks(texts: list[str]) -> np.ndarray:
    """[len, 2] uint64: two 64-bit hashes of each text's runs of SPELLING letters, to rule out
    most pairs that share none before the exact test."""
    out = np.zeros((len(texts), 2), np.uint64)
    for i, text in enumerate(texts):
        a = b = 0
        for gram in _grams(text):
            h = zlib.crc32(gram.encode("utf-8"))
            a |= 1 << (h & 63)
            b |= 1 << ((h >> 6) & 63)
        out[i] = (a, b)
    return out


def _grams(text: str) -> frozenset[str]:
    """Every run of SPELLING letters in ``text``: two texts are alike in spelling when they
    share one (the word itself and its plural included); a text shorter than that has none."""
    return frozenset(text[i:i + SPELLING] for i in range(len(text) - SPELLING + 1))


class _Scan:
    """Every (query word, neuron) pair's evidence count, summed cosine and summed strength, a chunk of words at a time."""

    def __init__(self, vectors, words: list[str], nt: NeuronTerms, min_sim: float, literal_counts: bool = False):
        self.words, self.nt, self.min_sim, self.literal_counts = words, nt, min_sim, literal_counts
        self.W, self.T = vectors.embed(words), vectors.embed(nt.terms)       # [words, dim], [terms, dim]
        self.wmask, self.tmask = _masks(words), _masks(nt.terms)
        # A text of SPELLING letters or fewer has at most one run of them, but may start another
        # ("pet", "petals"): such pairs get the exact test whatever their masks say.
        self.wshort = np.array([len(w) <= SPELLING for w in words], bool)
        self.tshort = np.array([len(t) <= SPELLING for t in nt.terms], bool)
        # One text is a prefix of the other (both have 3 letters or more) only if they share their first 3.
        self.whead = np.array([zlib.crc32(w[:3].encode("utf-8")) for w in words], np.int64)
        self.thead = np.array([zlib.crc32(t[:3].encode("utf-8")) for t in nt.terms], np.int64)
        self.wgrams: dict[int, frozenset] = {}
        self.tgrams: dict[int, frozenset] = {}
        at = {w: i for i, w in enumerate(words)}
        # The query words that are a term itself, its plural or its singular: literal, never evidence.
        self.same = np.array([[at.get(t, -1), at.get(t + "s", -1), at.get(t[:-1], -1) if t.endswith("s") else -1]
                              for t in nt.terms], np.int64).reshape(-1, 3)
        member = nt.index >= 0
        rows, cols = np.nonzero(member)
        term = nt.index[rows, cols]
        order = np.argsort(term, kind="stable")                 # memberships by term, for the expansion
        self.m_neuron, self.m_z = rows[order], nt.z[rows, cols][order]
        self.ptr = np.searchsorted(term[order], np.arange(len(nt.terms) + 1))
        self.pairs = 0

    def _grams_of(self, cache: dict, texts: list[str], i: int) -> frozenset:
        if i not in cache:
            cache[i] = _grams(texts[i])
        return cache[i]

    def chunks(self, chunk: int = CHUNK, with_z: bool = True):
        """Yield (first word, S, n, sim_sum, z_sum): S [terms, chunk] cosines with pairs that may not be
        evidence set to -1; n, sim_sum, z_sum [neurons, chunk] over each pair's evidence (z_sum None
        without ``with_z``)."""
        n_neurons = len(self.nt.keys)
        for lo in range(0, len(self.words), chunk):
            hi = min(lo + chunk, len(self.words))
            S = self.T @ self.W[lo:hi].T                                        # [terms, chunk]
            r, c = np.nonzero(S >= self.min_sim)
            if self.literal_counts:
                # The name's own word among the neuron's terms is the best evidence there is.
                lr, lc = np.nonzero((self.same[:, :, None] == np.arange(lo, hi)[None, None, :]).any(1))
                S[lr, lc] = LITERAL_SIM
                r, c = np.nonzero(S >= self.min_sim)
                literal = (self.same[r] == (c + lo)[:, None]).any(1)
                bad = np.zeros(len(r), bool)
            else:
                literal = (self.same[r] == (c + lo)[:, None]).any(1)
                bad = literal.copy()
            short = (self.tshort[r] | self.wshort[c + lo]) & (self.thead[r] == self.whead[c + lo])
            maybe = (((self.tmask[r, 0] & self.wmask[c + lo, 0]) != 0) & ((self.tmask[r, 1] & self.wmask[c + lo, 1]) != 0)
                     | short) & ~literal
            terms, words = self.nt.terms, self.words
            for i in np.flatnonzero(maybe).tolist():
                t, w = terms[int(r[i])], words[int(c[i]) + lo]
                if t.startswith(w) or w.startswith(t) or not self._grams_of(self.tgrams, terms, int(r[i])).isdisjoint(
                        self._grams_of(self.wgrams, words, int(c[i]) + lo)):
                    bad[i] = True
            S[r[bad], c[bad]] = -1
            r, c = r[~bad], c[~bad]
            self.pairs += len(r)
            # Each (term, word) pair counts for every neuron that has the term.
            deg = self.ptr[r + 1] - self.ptr[r]
            pair = np.repeat(np.arange(len(r)), deg)
            within = np.arange(len(pair)) - np.repeat(np.cumsum(deg) - deg, deg)
            member = self.ptr[r][pair] + within
            flat = self.m_neuron[member] * (hi - lo) + c[pair]
            size = n_neurons * (hi - lo)
            n = np.bincount(flat, minlength=size).reshape(n_neurons, hi - lo)
            sims = np.bincount(flat, weights=S[r, c][pair], minlength=size).reshape(n_neurons, hi - lo)
            zs = np.bincount(flat, weights=self.m_z[member], minlength=size).reshape(n_neurons, hi - lo) \
                if with_z else None
            yield lo, S, n, sims, zs

    def evidence(self, S: np.ndarray, neurons: np.ndarray, cols: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
        """Per (neuron, column of S) pair: its evidence terms, closest first, and the best rank among them."""
        idx = self.nt.index[neurons]                                            # [pairs, RANKS]
        sims = np.where(idx >= 0, S[idx.clip(0), cols[:, None]], -1.0)
        sims = np.where(sims >= self.min_sim, sims, -np.inf)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :EVIDENCE]
        best_rank = np.where(np.isfinite(sims), self.nt.rank[neurons], 1 << 30).min(1)
        terms = self.nt.terms
        out = []
        for row, o, s in zip(idx.tolist(), order.tolist(), np.take_along_axis(sims, order, 1).tolist()):
            out.append([terms[row[j]] for j, v in zip(o, s) if v != -np.inf])
        return out, best_rank


def _strength(n, sims, zs) -> np.ndarray:
    """Mean strength of the evidence x its gain: 1 for the least evidence there can be
    (MIN_EVIDENCE terms at MIN_SIM), one more per further REF_SIM of summed cosine, at most MAX_GAIN."""
    gain = np.minimum(np.maximum(sims - MIN_EVIDENCE * MIN_SIM, 0) / REF_SIM + 1, MAX_GAIN)
    return zs / np.maximum(n, 1) * gain


def _prepare(con, vectors, normalise, z_sql: str, with_corpus: bool, lexicon):
    vocab = vocabulary(con, normalise, with_corpus, vectors, lexicon)
    return vocab, neuron_terms(con, normalise, z_sql, vocab)


def concept_postings(con, vectors, normalise, z_sql: str, with_corpus: bool, lexicon=None,
                     min_sim: float = MIN_SIM, min_evidence: int = MIN_EVIDENCE,
                     postings: int = POSTINGS) -> tuple[pa.Table, dict]:
    """Per query word its ``postings`` strongest concept matches: (word, layer, neuron, n_ev, sim_sum, z, rank, evidence)."""
    start = time.perf_counter()
    vocab, nt = _prepare(con, vectors, normalise, z_sql, with_corpus, lexicon)
    cols = {k: [] for k in ("word", "layer", "neuron", "n_ev", "sim_sum", "z", "rank", "evidence")}
    scan = _Scan(vectors, vocab.query, nt, min_sim) if nt.terms and vocab.query else None
    keys = np.array(nt.keys, np.int64).reshape(-1, 2)
    for lo, S, n, sims, zs in scan.chunks() if scan else ():
        neuron, col = np.nonzero(n >= min_evidence)
        z = _strength(n[neuron, col], sims[neuron, col], zs[neuron, col])
        order = np.lexsort((neuron, -z, col))                   # per word, strongest first, ties by (layer, neuron)
        neuron, col, z = neuron[order], col[order], z[order]
        first = np.searchsorted(col, col, side="left")
        keep = np.arange(len(col)) - first < postings
        neuron, col, z = neuron[keep], col[keep], z[keep]
        evidence, best_rank = scan.evidence(S, neuron, col)
        cols["word"] += [vocab.query[lo + c] for c in col.tolist()]
        cols["layer"].append(keys[neuron, 0])
        cols["neuron"].append(keys[neuron, 1])
        cols["n_ev"].append(n[neuron, col])
        cols["sim_sum"].append(sims[neuron, col])
        cols["z"].append(z)
        cols["rank"].append(best_rank)
        cols["evidence"] += [", ".join(e) for e in evidence]
    cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    table = pa.table({"word": pa.array(cols["word"], pa.string()),
                      "layer": pa.array(cat(cols["layer"], np.int16)), "neuron": pa.array(cat(cols["neuron"], np.int32)),
                      "n_ev": pa.array(cat(cols["n_ev"], np.int32)),
                      "sim_sum": pa.array(np.round(cat(cols["sim_sum"], np.float64), 4)),
                      "z": pa.array(cat(cols["z"], np.float64)), "rank": pa.array(cat(cols["rank"], np.int32)),
                      "evidence": pa.array(cols["evidence"], pa.string())})
    return table, {"vocabulary": len(vocab.query), "neuron_terms": len(nt.terms),
                   "related_pairs": scan.pairs if scan else 0, "seconds": round(time.perf_counter() - start, 2),
                   "resource": vectors.source, "word_lists": vocab.source}


def concept_names(con, vectors, normalise, z_sql: str, with_corpus: bool, lexicon=None, min_sim: float = MIN_SIM,
                  min_evidence: int = 3, min_centroid: float = 0.45) -> tuple[dict, dict]:
    """Per neuron the word that names its concept: {(layer, neuron): (word, evidence, centroid cosine)}.

    Names are words of the query vocabulary that are words (see the module's docstring) and
    no function words. A neuron's candidate is the name whose evidence (at least
    ``min_evidence`` terms, the name itself among them counting with cosine ``LITERAL_SIM``) has the
    largest summed cosine; it names the neuron when its cosine with the centroid of all the
    neuron's terms (words, no function words) is at least ``min_centroid``.
    """
    start = time.perf_counter()
    vocab, nt = _prepare(con, vectors, normalise, z_sql, with_corpus, lexicon)
    # Words the model writes from everywhere ("themselves", "however", "both": among the top
    # terms of more than GENERIC_SHARE of the neurons) say little about any one neuron: no names.
    spread = np.bincount(nt.index[nt.index >= 0], minlength=len(nt.terms))
    generic = {t for t, k in zip(nt.terms, spread.tolist()) if k > max(GENERIC_MIN, GENERIC_SHARE * len(nt.keys))}
    names = [w for w in vocab.query if w in vocab.words and w not in vocab.function and w not in generic]
    found: dict = {}
    if not nt.terms or not names:
        return found, {"names": len(names), "seconds": round(time.perf_counter() - start, 2)}
    scan = _Scan(vectors, names, nt, min_sim, literal_counts=True)
    best = np.full(len(nt.keys), -np.inf)
    found: dict[int, tuple[int, list[str]]] = {}
    for lo, S, n, sims, _ in scan.chunks(with_z=False):
        score = np.where(n >= min_evidence, sims, -np.inf)
        col = score.argmax(1)                                   # the first of equals: the word sorted first
        top = score[np.arange(len(col)), col]
        better = np.flatnonzero(top > best)
        if not len(better):
            continue
        best[better] = top[better]
        evidence, _ = scan.evidence(S, better, col[better])
        for i, c, e in zip(better.tolist(), col[better].tolist(), evidence):
            found[i] = (lo + c, e)
    # A name sums many near terms, but a neuron whose terms are about other things too (or about
    # nothing: "encourag, advoc, affili") has no clear concept: its terms' centroid must lie near the name.
    named = sorted(found)
    idx = nt.index[named]                                                   # [named, RANKS]
    centroid = np.where((idx >= 0)[..., None], scan.T[idx.clip(0)], 0).sum(1)
    centroid /= np.maximum(np.linalg.norm(centroid, axis=1, keepdims=True), 1e-9)
    cos = (centroid * scan.W[[found[i][0] for i in named]]).sum(1)
    found = {nt.keys[i]: (names[found[i][0]], found[i][1], round(float(c), 4))
             for i, c in zip(named, cos.tolist()) if c >= min_centroid}
    return found, {"names": len(names), "generic": len(generic), "neuron_terms": len(nt.terms), "related_pairs": scan.pairs,
                   "seconds": round(time.perf_counter() - start, 2), "resource": vectors.source, "word_lists": vocab.source}


def concept_matches(con, vectors, normalise, z_sql: str, check_sql: str, src: int,
                    with_corpus: bool, lexicon=None) -> tuple[str, dict]:
    """Concept matches as the SELECT of a search source, and what making them took.

    The SELECT gives the columns of the literal matches (term, layer, neuron, src, rank,
    token_id, z, check) plus ``evidence``; it reads the temp table ``search_concepts``,
    which the caller drops.
    """
    table, info = concept_postings(con, vectors, normalise, z_sql, with_corpus, lexicon)
    con.register("concept_postings", table)
    try:
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE search_concepts AS
            SELECT word AS term, layer, neuron, {src} AS src, rank, -1 AS token_id, z, evidence FROM concept_postings""")
    finally:
        con.unregister("concept_postings")
    info["postings"], info["words"] = table.num_rows, len(set(table.column("word").to_pylist()))
    # The clamp check joins here, as for literal matches.
    select = f"""
        SELECT c.term, c.layer, c.neuron, c.src, c.rank, c.token_id, c.z, {check_sql} AS "check", c.evidence
        FROM search_concepts c JOIN neurons n USING (layer, neuron)"""
    return select, info
