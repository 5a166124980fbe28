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
  "animal"); the ``EVIDENCE`` closest are shown. One of **the model's own examples** of the
  word (``atlas.model_examples``: its likeliest next words after "The most common kinds of
  metal are", the ``EXAMPLE_TOP`` first, less those that follow more than ``EXAMPLE_GENERIC``
  of the words asked) counts with cosine ``EXAMPLE_SIM`` where its own is less: word vectors
  put "pneumonia" 0.15 from "disease", the model names it the second kind of disease. Names
  (labels) read the word vectors only, as their centroid test does;
- **strength** of a concept match: ``mean(strength) x gain`` over the evidence, the
  strength of a decoded token as for literal matches (σ from the mean logit), where
  ``gain = min(1 + (sum(cosine) - MIN_EVIDENCE x MIN_SIM) / REF_SIM, MAX_GAIN)``: the least
  evidence there can be weighs one literal match (one that writes the word itself:
  ``LITERAL_GAIN``), and each further ``REF_SIM`` of summed cosine one more. A category's
  members each lie only 0.15-0.35 from the category's name, but a neuron that writes many
  of them adds up to strong evidence; at least ``MIN_EVIDENCE`` evidence terms are needed;
- per word the ``POSTINGS`` strongest neurons are kept; how they rank beside literal matches
  (``LITERAL_GAIN``) is in ``atlas.site.search``.

The evidence terms travel with the posting, so a result says why it matched. One scan
(``concepts``, run by the labels stage) gives both the postings, which the stage keeps in
``concept_postings`` for the search index, and each neuron's concept name from the same
evidence. A second scan does both from the tokens each neuron fires on in the corpus
(``exemplar_rows``) instead of the tokens it writes: postings of side ``EXEMPLARS``, whose
strengths are scaled so that both sides' medians agree, and names for labels.

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
import pyarrow.compute as pc
from scipy import sparse

from atlas.store import finished_stage

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
GROUP_MIN = 2                   # a group's (cluster's) term is among the top terms of this many members
CHUNK = 1024                    # query words scored at once ([terms, CHUNK] cosines in memory)
EXAMPLE_SIM = 0.6               # the cosine one of the model's examples of a word counts as, at least
EXAMPLE_TOP = 30                # the model's likeliest examples of a word that may be evidence
EXEMPLAR_SHARE = 0.25            # of a neuron's top exemplars, the share whose peak token a name from them must cover
EXAMPLE_GENERIC = 0.01          # an example among the EXAMPLE_TOP of more than this share of the words asked is none
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
    common: list[str] = None    # the query words that are words and no function words, commonest first

    def commonest(self, n: int) -> list[str]:
        """The ``n`` commonest words of ``common`` (all of them for n < 0)."""
        return list(self.common if n < 0 else self.common[:n])


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
        order = {w: i for i, w in enumerate(lexicon.commonest(len(lexicon.counts)))}
        source = {"words": f"{lexicon.source['name']} (count >= {LEXICON_MIN}), word vectors, corpus",
                  "function_words": f"{lexicon.source['name']}'s {FUNCTION_WORDS} commonest"}
    else:
        function = {w for w, _ in counts.most_common(FUNCTION_WORDS)}
        order = {w: i for i, (w, _) in enumerate(counts.most_common())}
        source = {"words": "word vectors, corpus (no lexicon)", "function_words": f"corpus's {FUNCTION_WORDS} commonest"}
    common = sorted((w for w in query if w in words and w not in function), key=lambda w: (order.get(w, len(order)), w))
    return Vocabulary(sorted(query), words, function, source, common)


def read_phrases(path: str, normalise) -> list[str]:
    """The concepts listed in a text file, one a line (blank lines and lines starting with # skipped),
    each as search reads a query: its words normalised and joined by one space."""
    from pathlib import Path

    from atlas.errors import AtlasError

    if not path:
        return []
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AtlasError(f"cannot read --label-phrases {path}: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            words = [w for w in (normalise(t) for t in line.split()) if w]
            if words and " ".join(words) not in out:
                out.append(" ".join(words))
    return out


def with_phrases(vocab: Vocabulary, phrases: list[str]) -> Vocabulary:
    """``vocab`` with ``phrases`` in its query vocabulary: they get concept postings, never a name."""
    return Vocabulary(sorted(set(vocab.query) | set(phrases)), vocab.words, vocab.function, vocab.source, vocab.common)


def example_sets(rows: list[tuple[str, str, int]], asked: int, top: int = EXAMPLE_TOP,
                 generic: float = EXAMPLE_GENERIC) -> dict[str, list[str]]:
    """{word: its examples that may be evidence} from the model's answers (word, term, rank): the
    ``top`` likeliest terms of 3 letters or more, less those among the ``top`` of more than
    ``generic`` x ``asked`` words ("used", "known", "typically" follow any word)."""
    kept = [(w, t) for w, t, r in rows if r < top and _letters(t)]
    spread = Counter(t for _, t in kept)
    out: dict[str, list[str]] = {}
    for w, t in kept:
        if spread[t] <= max(1, generic * asked):
            out.setdefault(w, []).append(t)
    return out


@dataclass
class NeuronTerms:
    """Each neuron's evidence-capable terms: words, no function words, variants merged."""

    keys: list[tuple[int, int]]     # (layer, neuron), sorted
    terms: list[str]                # distinct terms, sorted
    index: np.ndarray               # [neurons, RANKS] int32: term index, -1 none
    z: np.ndarray                   # [neurons, RANKS] float64: the term's strength in the neuron
    rank: np.ndarray                # [neurons, RANKS] int32: its best rank


def neuron_terms(con, normalise, z_sql: str, vocab: Vocabulary) -> NeuronTerms:
    """Each neuron's top ``RANKS`` decoded `out` terms."""
    return _terms(con.execute(f"""
        SELECT d.layer, d.neuron, d.rank, d.token, {z_sql} AS z
        FROM decoded_tokens d JOIN neurons n USING (layer, neuron)
        WHERE d.side = 'out' AND d.polarity = 'top' AND d.rank < {RANKS}
        ORDER BY d.layer, d.neuron, d.rank""").fetchall(), normalise, vocab)


# An exemplar's strength, here and in search's exemplar matches: σ from the neuron's mean activation.
EXEMPLAR_Z = ("coalesce(abs(CAST(e.activation AS DOUBLE) - CAST(n.act_mean AS DOUBLE)) / nullif(CAST(n.act_std AS DOUBLE), 0), "
              "abs(CAST(e.norm_activation AS DOUBLE)))")


def exemplar_rows(con) -> list[tuple]:
    """(layer, neuron, rank, token, strength) of the tokens each neuron fires on most in the corpus
    (its top ``RANKS`` exemplars' peak tokens, a token once per exemplar), strength ``EXEMPLAR_Z``."""
    return con.execute(f"""
        SELECT e.layer, e.neuron, e.rank, v.token, {EXEMPLAR_Z} AS z
        FROM exemplars e JOIN corpus_docs c USING (doc_id) JOIN vocab v ON v.token_id = c.token_ids[e.token_pos + 1]
        JOIN neurons n USING (layer, neuron)
        WHERE e.polarity = 'max' AND e.rank < {RANKS}
        ORDER BY e.layer, e.neuron, e.rank""").fetchall()


def _terms(rows, normalise, vocab: Vocabulary) -> NeuronTerms:
    per: dict[tuple[int, int], dict[str, tuple[int, float]]] = {}
    term: dict[str, str | None] = {}                # each token's term, None for no letters: tokens repeat
    for layer, neuron, rank, token, z in rows:
        if token not in term:
            t = normalise(token)
            term[token] = t if _letters(t) else None
        t = term[token]
        if t is None or z is None or not np.isfinite(z):
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


class _Spelling:
    """Which (term, word) pairs are alike in spelling, tested exactly and in numpy: every run of
    ``SPELLING`` letters and every prefix of every text gets an integer id."""

    BATCH = 65_536                  # pairs compared at once

    def __init__(self, terms: list[str], words: list[str]):
        ids: dict[str, int] = {}
        longest = max(map(len, terms + words), default=0)

        def prefixes(texts):        # [texts, longest + 1]: the id of text[:k], -1 past its end
            out = np.full((len(texts), longest + 1), -1, np.int32)
            for i, text in enumerate(texts):
                out[i, 1:len(text) + 1] = [ids.setdefault(text[:k], len(ids)) for k in range(1, len(text) + 1)]
            return out

        def grams(texts, pad):      # [texts, most runs]: the ids of its runs, ``pad`` past the last
            runs = [[ids.setdefault(g, len(ids)) for g in _grams(text)] for text in texts]
            out = np.full((len(texts), max(map(len, runs), default=0) + 1), pad, np.int32)
            for i, row in enumerate(runs):
                out[i, :len(row)] = row
            return out

        self.tlen, self.wlen = (np.array([len(t) for t in texts], np.int64) for texts in (terms, words))
        self.tpre, self.wpre = prefixes(terms), prefixes(words)
        self.tgram, self.wgram = grams(terms, -1), grams(words, -2)     # unequal pads never match
        self.tn, self.wn = (self.tgram >= 0).sum(1), (self.wgram >= 0).sum(1)

    def alike(self, terms: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Per pair: one text starts with the other, or they share a run of SPELLING letters."""
        tl, wl = self.tlen[terms], self.wlen[words]
        out = ((wl <= tl) & (self.tpre[terms, wl] == self.wpre[words, wl])
               | (tl <= wl) & (self.wpre[words, tl] == self.tpre[terms, tl]))
        for lo in range(0, len(terms), self.BATCH):
            t, w = terms[lo:lo + self.BATCH], words[lo:lo + self.BATCH]
            if not len(t):
                break
            a = self.tgram[t, :max(int(self.tn[t].max()), 1)]
            b = self.wgram[w, :max(int(self.wn[w].max()), 1)]
            out[lo:lo + self.BATCH] |= (a[:, :, None] == b[:, None, :]).any((1, 2))
        return out


@dataclass
class _Chunk:
    S: np.ndarray               # [terms, words of the chunk] cosines, -1 where a pair may not be evidence
    n: sparse.csr_matrix        # [neurons, words]: evidence terms
    sims: sparse.csr_matrix     # ... their summed cosine
    zs: sparse.csr_matrix       # ... their summed strength


class _Scan:
    """Every (query word, neuron) pair's evidence count, summed cosine and summed strength, a chunk of words at a time."""

    def __init__(self, vectors, words: list[str], nt: NeuronTerms, min_sim: float, examples: dict | None = None):
        self.words, self.nt, self.min_sim = words, nt, min_sim
        self.W, self.T = vectors.embed(words), vectors.embed(nt.terms)       # [words, dim], [terms, dim]
        # [terms, words]: the model's examples of each word among the terms (a plural or its
        # singular too, as the terms merge them; "brass" is no plural of "bras"), whose cosine
        # counts as at least EXAMPLE_SIM.
        at, r, c = {t: i for i, t in enumerate(nt.terms)}, [], []
        for j, w in enumerate(words):
            for t in (examples or {}).get(w, ()):
                singular = t[:-1] if t.endswith("s") and not t.endswith("ss") else t
                for i in {at.get(v) for v in (t, singular, t + "s")} - {None}:
                    r.append(i)
                    c.append(j)
        self.E = sparse.csc_matrix((np.ones(len(r)), (r, c)), shape=(len(nt.terms), len(words))) if r else None
        self.wmask, self.tmask = _masks(words), _masks(nt.terms)
        # A text of SPELLING letters or fewer has at most one run of them, but may start another
        # ("pet", "petals"): such pairs get the exact test whatever their masks say.
        self.wshort = np.array([len(w) <= SPELLING for w in words], bool)
        self.tshort = np.array([len(t) <= SPELLING for t in nt.terms], bool)
        # One text is a prefix of the other (both have 3 letters or more) only if they share their first 3.
        self.whead = np.array([zlib.crc32(w[:3].encode("utf-8")) for w in words], np.int64)
        self.thead = np.array([zlib.crc32(t[:3].encode("utf-8")) for t in nt.terms], np.int64)
        self.spelling = _Spelling(nt.terms, words)
        at = {w: i for i, w in enumerate(words)}
        # The query words that are a term itself, its plural or its singular: literal, never evidence.
        self.same = np.array([[at.get(t, -1), at.get(t + "s", -1), at.get(t[:-1], -1) if t.endswith("s") else -1]
                              for t in nt.terms], np.int64).reshape(-1, 3)
        # Neurons x terms: which neuron has which term (A), and with what strength + 1 (Az: never 0,
        # so a product's sums are never 0 and both products keep the same entries).
        rows, cols = np.nonzero(nt.index >= 0)
        shape = (len(nt.keys), len(nt.terms))
        self.A = sparse.csr_matrix((np.ones(len(rows)), (rows, nt.index[rows, cols])), shape=shape)
        self.Az = sparse.csr_matrix((nt.z[rows, cols] + 1, (rows, nt.index[rows, cols])), shape=shape)
        self.pairs = 0
        self.keys = np.array(nt.keys, np.int64).reshape(-1, 2)
        self.term_array = pa.array(nt.terms, pa.string())

    def chunks(self, chunk: int = CHUNK):
        """Yield (first word, plain, asked): each a ``_Chunk`` of S [terms, chunk] cosines with pairs
        that may not be evidence set to -1, and n, sim_sum, z_sum [neurons, chunk] over each pair's
        evidence, sparse matrices with the same entries (the (neuron, word) pairs with any
        evidence). ``plain`` reads the word vectors only; ``asked`` also counts the model's examples
        of a word at EXAMPLE_SIM at least, and is ``plain`` itself where none of the chunk's words has any."""
        for lo in range(0, len(self.words), chunk):
            hi = min(lo + chunk, len(self.words))
            S = self.T @ self.W[lo:hi].T                                        # [terms, chunk]
            e = self.E[:, lo:hi].tocoo() if self.E is not None else None
            Sx = S
            if e is not None and e.nnz:
                Sx = S.copy()
                Sx[e.row, e.col] = np.maximum(S[e.row, e.col], EXAMPLE_SIM)
            r, c = np.nonzero(Sx >= self.min_sim)
            # The word itself, its plural or its singular among the terms is a literal match, never evidence.
            literal = (self.same[r] == (c + lo)[:, None]).any(1)
            bad = literal.copy()
            short = (self.tshort[r] | self.wshort[c + lo]) & (self.thead[r] == self.whead[c + lo])
            maybe = (((self.tmask[r, 0] & self.wmask[c + lo, 0]) != 0) & ((self.tmask[r, 1] & self.wmask[c + lo, 1]) != 0)
                     | short) & ~literal
            which = np.flatnonzero(maybe)
            bad[which] = self.spelling.alike(r[which], c[which] + lo)
            S[r[bad], c[bad]] = -1
            Sx[r[bad], c[bad]] = -1
            r, c = r[~bad], c[~bad]
            self.pairs += len(r)
            plain = S[r, c] >= self.min_sim
            one = self._chunk(S, r[plain], c[plain], hi - lo)
            yield lo, one, (one if Sx is S else self._chunk(Sx, r, c, hi - lo))

    def _chunk(self, S: np.ndarray, r: np.ndarray, c: np.ndarray, width: int) -> "_Chunk":
        # Each (term, word) pair counts for every neuron that has the term: neurons x words, sparse.
        shape = (len(self.nt.terms), width)
        ones = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=shape)
        n, zs = self.A @ ones, self.Az @ ones
        sims = self.A @ sparse.csr_matrix((S[r, c], (r, c)), shape=shape)
        zs.data -= n.data
        return _Chunk(S, n, sims, zs)

    def literal(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
        """The (term, word) pairs of words ``lo:hi`` where the word is the term itself, its plural or
        its singular, as (terms, columns within the chunk), and how many of them each neuron has
        (neurons x words, sparse)."""
        r, k = np.nonzero((self.same >= lo) & (self.same < hi))
        c = self.same[r, k] - lo
        return r, c, self.A @ sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(self.nt.terms), hi - lo))

    def evidence(self, S: np.ndarray, neurons: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per (neuron, column of S) pair: its ``EVIDENCE`` closest evidence terms as term indices
        (-1 past the last) and the best rank among all its evidence."""
        idx = self.nt.index[neurons]                                            # [pairs, RANKS]
        sims = np.where(idx >= 0, S[idx.clip(0), cols[:, None]], -1.0)
        sims = np.where(sims >= self.min_sim, sims, -np.inf)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :EVIDENCE]
        best_rank = np.where(np.isfinite(sims), self.nt.rank[neurons], 1 << 30).min(1)
        top = np.where(np.isfinite(np.take_along_axis(sims, order, 1)), np.take_along_axis(idx, order, 1), -1)
        return top, best_rank

    def joined(self, top: np.ndarray) -> pa.Array:
        """Each row of term indices from ``evidence`` as one string, "bird, mammal"."""
        counts = (top >= 0).sum(1)                          # the terms come first in each row
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        lists = pa.ListArray.from_arrays(pa.array(offsets), self.term_array.take(pa.array(top[top >= 0])))
        return pc.binary_join(lists, ", ")


def _entries(m: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sparse count matrix's entries as (row, column, count), rows ascending."""
    return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr)), m.indices.astype(np.int64), np.rint(m.data).astype(np.int64)


def _row_best(rows: np.ndarray, cols: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row that has entries (``rows`` ascending): the row, its best score, and the first
    column among the entries with that score."""
    if not len(rows):
        return rows, score, cols
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    top = np.maximum.reduceat(score, starts)
    ties = score == np.repeat(top, np.diff(np.r_[starts, len(rows)]))
    return rows[starts], top, np.minimum.reduceat(np.where(ties, cols, np.iinfo(np.int64).max), starts)


def _strength(n, sims, zs) -> np.ndarray:
    """Mean strength of the evidence x its gain: 1 for the least evidence there can be
    (MIN_EVIDENCE terms at MIN_SIM), one more per further REF_SIM of summed cosine, at most MAX_GAIN."""
    gain = np.minimum(np.maximum(sims - MIN_EVIDENCE * MIN_SIM, 0) / REF_SIM + 1, MAX_GAIN)
    return zs / np.maximum(n, 1) * gain


class _Namer:
    """Each row's best name over the chunks of a scan, and then the names that hold (``concepts``)."""

    def __init__(self, scan, query: list[str], is_name: np.ndarray, min_evidence: int, min_centroid: float):
        self.scan, self.query, self.is_name = scan, query, is_name
        self.min_evidence, self.min_centroid = min_evidence, min_centroid
        self.best = np.full(len(scan.nt.keys) if scan else 0, -np.inf)
        self.found: dict[int, tuple[int, list[str]]] = {}

    def add(self, lo: int, S: np.ndarray, n, sims) -> None:
        """One chunk of the scan: a name's own word among the row's terms is the best evidence there is."""
        hi = lo + S.shape[1]
        if not self.is_name[lo:hi].any():
            return
        scan = self.scan
        if LITERAL_SIM >= scan.min_sim:
            terms, literal_cols, literal = scan.literal(lo, hi)
            n, sims = n + literal, sims + LITERAL_SIM * literal
            S[terms, literal_cols] = LITERAL_SIM
        neuron, col, count = _entries(n)
        score = np.where((count >= self.min_evidence) & self.is_name[lo + col], sims.data, -np.inf)
        rows, top, col = _row_best(neuron, col, score)
        better = top > self.best[rows]
        rows, top, col = rows[better], top[better], col[better]
        if not len(rows):
            return
        self.best[rows] = top
        top, _ = scan.evidence(S, rows, col)
        terms = scan.nt.terms
        for i, c, row in zip(rows.tolist(), col.tolist(), top.tolist()):
            self.found[i] = (lo + c, [terms[t] for t in row if t >= 0])

    def names(self) -> dict:
        """{key: (word, evidence, centroid cosine)}: a name sums many near terms, but a row whose
        terms are about other things too (or about nothing: "encourag, advoc, affili") has no
        clear concept: its terms' centroid must lie near the name."""
        named = sorted(self.found)
        if not named:
            return {}
        nt, found = self.scan.nt, self.found
        idx = nt.index[named]                                               # [named, RANKS]
        centroid = np.where((idx >= 0)[..., None], self.scan.T[idx.clip(0)], 0).sum(1)
        centroid /= np.maximum(np.linalg.norm(centroid, axis=1, keepdims=True), 1e-9)
        cos = (centroid * self.scan.W[[found[i][0] for i in named]]).sum(1)
        return {nt.keys[i]: (self.query[found[i][0]], found[i][1], round(float(c), 4))
                for i, c in zip(named, cos.tolist()) if c >= self.min_centroid}


def group_terms(nt: NeuronTerms, groups: dict, least: int = GROUP_MIN) -> NeuronTerms:
    """Each group's terms as a neuron's: the terms among the top terms of at least ``least`` of its
    members, most shared first (``RANKS`` of them), with the share of members that have each for
    strength. Keys are ``(group, 0)``."""
    member = np.array([groups.get(k, -1) for k in nt.keys], np.int64)
    ids = sorted({g for g in member.tolist() if g >= 0})
    at = {g: i for i, g in enumerate(ids)}
    row = np.array([at.get(g, -1) for g in member.tolist()], np.int64)
    r, c = np.nonzero((nt.index >= 0) & (row >= 0)[:, None])
    counts = sparse.csr_matrix((np.ones(len(r)), (row[r], nt.index[r, c])), shape=(len(ids), len(nt.terms)))
    counts.sum_duplicates()
    size = np.bincount(row[row >= 0], minlength=len(ids))
    index = np.full((len(ids), RANKS), -1, np.int32)
    z = np.zeros((len(ids), RANKS))
    for i in range(len(ids)):
        lo, hi = counts.indptr[i], counts.indptr[i + 1]
        terms, k = counts.indices[lo:hi], counts.data[lo:hi]
        keep = np.flatnonzero(k >= least)
        keep = keep[np.lexsort((terms[keep], -k[keep]))][:RANKS]
        index[i, :len(keep)] = terms[keep]
        z[i, :len(keep)] = k[keep] / max(size[i], 1)
    rank = np.tile(np.arange(RANKS, dtype=np.int32), (len(ids), 1))
    return NeuronTerms([(g, 0) for g in ids], nt.terms, index, z, rank)


def _group_names(vectors, query: list[str], nt: NeuronTerms, groups: dict, min_sim: float, is_name: np.ndarray,
                 min_evidence: int, min_centroid: float, examples: dict | None = None) -> dict:
    """{group: (word, evidence, centroid cosine, members with evidence, members)} (``concepts``)."""
    size = Counter(groups.values())             # every member, with decoded terms or not
    scan = _Scan(vectors, query, group_terms(nt, groups), min_sim, examples)
    namer = _Namer(scan, query, is_name, min_evidence, min_centroid)
    for lo, _, asked in scan.chunks():
        namer.add(lo, asked.S, asked.n, asked.sims)
    at = {t: i for i, t in enumerate(nt.terms)}
    member = np.array([groups.get(k, -1) for k in nt.keys], np.int64)
    out = {}
    for (g, _), (word, evidence, cos) in namer.names().items():
        ev = [at[t] for t in evidence if t in at]
        has = np.isin(nt.index, ev).any(1) & (member == g)
        out[g] = (word, evidence, cos, int(has.sum()), size[g])
    return out


def _prepare(con, vectors, normalise, z_sql: str, with_corpus: bool, lexicon, vocab: Vocabulary | None = None):
    vocab = vocab or vocabulary(con, normalise, with_corpus, vectors, lexicon)
    return vocab, neuron_terms(con, normalise, z_sql, vocab)


@dataclass
class Concepts:
    """What one scan of the word vectors against the decoded terms gives: names and postings."""

    names: dict             # {(layer, neuron): (word, evidence, centroid cosine)}: each named neuron's concept
    postings: pa.Table      # per query word its strongest concept matches (``POSTINGS_COLUMNS``)
    info: dict              # sizes, seconds, and the resource and word lists used
    group_names: dict = None  # {group: (word, evidence, centroid cosine, members with evidence, members)}
    exemplar_names: dict = None  # as ``names``, from the tokens each neuron fires on (``exemplars``)


POSTINGS_COLUMNS = ("word", "layer", "neuron", "n_ev", "sim_sum", "z", "rank", "evidence", "side")
OUT, EXEMPLARS = "out", "exemplars"     # concept_postings.side: the terms a neuron writes, or those it fires on


def _add_postings(cols: dict, scan: "_Scan", lo: int, chunk: "_Chunk", query: pa.Array, postings: int,
                  min_evidence: int, side: str) -> None:
    """Append one chunk's postings to ``cols``: per word its ``postings`` strongest rows of the scan
    with ``min_evidence`` evidence terms or more (the word itself is never among them)."""
    neuron, col, count = _entries(chunk.n)
    keep = count >= min_evidence
    neuron, col, count, sim = neuron[keep], col[keep], count[keep], chunk.sims.data[keep]
    z = _strength(count, sim, chunk.zs.data[keep])
    order = np.lexsort((neuron, -z, col))                   # per word, strongest first, ties by (layer, neuron)
    first = np.searchsorted(col[order], col[order], side="left")
    order = order[np.arange(len(order)) - first < postings]
    neuron, col = neuron[order], col[order]
    top, best_rank = scan.evidence(chunk.S, neuron, col)
    keys = scan.keys
    cols["word"].append(query.take(pa.array(lo + col)))
    cols["layer"].append(keys[neuron, 0])
    cols["neuron"].append(keys[neuron, 1])
    cols["n_ev"].append(count[order])
    cols["sim_sum"].append(sim[order])
    cols["z"].append(z[order])
    cols["rank"].append(best_rank)
    cols["evidence"].append(scan.joined(top))
    cols["side"].append(pa.array([side] * len(order), pa.string()))


def concepts(con, vectors, normalise, z_sql: str, with_corpus: bool, lexicon=None, min_sim: float = MIN_SIM,
             name_min_evidence: int = 3, min_centroid: float = 0.45, min_evidence: int = MIN_EVIDENCE,
             postings: int = POSTINGS, groups: dict | None = None, examples: dict | None = None,
             vocab: Vocabulary | None = None, exemplars: bool = False) -> Concepts:
    """Concept names for labels and concept postings for search, from one scan of every query word
    (and names from exemplars, ``exemplars``, from a second).

    **Postings**: per query word its ``postings`` strongest concept matches (see the module's docstring).

    **Names** are words of the query vocabulary that are words and no function words, and
    not among the top terms of many neurons (``GENERIC_SHARE``). A neuron's candidate is the
    name whose evidence (at least ``name_min_evidence`` terms, the name itself among them
    counting with cosine ``LITERAL_SIM``) has the largest summed cosine, the first in sorted
    order among equals; it names the neuron when its cosine with the centroid of all the
    neuron's terms (words, no function words) is at least ``min_centroid``.

    Both read the same (term, word) pairs: the names' evidence is the postings' evidence plus
    each name's own literal terms, added after the postings are taken.

    **Group names** (``groups``: {(layer, neuron): group}, the clusters): a group is named as a
    neuron is, with its shared terms for top terms (``group_terms``).

    **Exemplar names** (``exemplars``, where the store has exemplars): each neuron named the same
    way from the tokens it fires on most in the corpus (``exemplar_rows``): a neuron that writes
    no concept may read one ("family: father, mother, parents").
    """
    start = time.perf_counter()
    vocab, nt = _prepare(con, vectors, normalise, z_sql, with_corpus, lexicon, vocab)
    generic, is_name = _names(nt, vocab)
    cols = {k: [] for k in POSTINGS_COLUMNS}
    scan = _Scan(vectors, vocab.query, nt, min_sim, examples) if nt.terms and vocab.query else None
    query = pa.array(vocab.query, pa.string())
    namer = _Namer(scan, vocab.query, is_name, name_min_evidence, min_centroid)
    for lo, plain, asked in scan.chunks() if scan else ():
        _add_postings(cols, scan, lo, asked, query, postings, min_evidence, OUT)
        # A neuron's name must pass a test in the word vectors (its terms' centroid near the name),
        # which knows nothing of the model's examples: names read the word vectors only.
        namer.add(lo, plain.S, plain.n, plain.sims)
    names = namer.names()
    group_names = _group_names(vectors, vocab.query, nt, groups, min_sim, is_name, name_min_evidence, min_centroid,
                               examples) \
        if groups and nt.terms else {}
    fired = time.perf_counter()
    exemplar_names = _exemplar_scan(con, vectors, normalise, vocab, min_sim, name_min_evidence, min_centroid,
                                    examples, cols, postings, min_evidence) if exemplars else {}
    fired = time.perf_counter() - fired
    cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    strings = (lambda parts: pa.concat_arrays(parts) if parts else pa.array([], pa.string()))
    z, side = cat(cols["z"], np.float64), strings(cols["side"])
    fires = pc.equal(side, EXEMPLARS).to_numpy(zero_copy_only=False).astype(bool) if len(side) else np.zeros(0, bool)
    # A neuron's exemplars lie further out in its activations (median 47 σ on the default atlas)
    # than its top `out` tokens in its logits (13 σ): the fires-on side's strengths are scaled so
    # that both sides' medians agree, and a median match of either weighs the same.
    scale = float(np.median(z[~fires]) / np.median(z[fires])) if fires.any() and (~fires).any() else 1.0
    z[fires] *= scale
    table = pa.table({"word": strings(cols["word"]),
                      "layer": pa.array(cat(cols["layer"], np.int16)), "neuron": pa.array(cat(cols["neuron"], np.int32)),
                      "n_ev": pa.array(cat(cols["n_ev"], np.int16)),
                      "sim_sum": pa.array(np.round(cat(cols["sim_sum"], np.float64), 4).astype(np.float32)),
                      "z": pa.array(z), "rank": pa.array(cat(cols["rank"], np.int16)),
                      "evidence": strings(cols["evidence"]), "side": side})
    info = {"vocabulary": len(vocab.query), "names": int(is_name.sum()), "generic": len(generic),
            "neuron_terms": len(nt.terms), "related_pairs": scan.pairs if scan else 0, "postings": table.num_rows,
            "seconds": round(time.perf_counter() - start, 2), "resource": vectors.source, "word_lists": vocab.source,
            "examples": len(examples or {})}
    info["groups_named"] = len(group_names)
    if exemplars:
        info["exemplar_names"], info["exemplar_seconds"] = len(exemplar_names), round(fired, 2)
        info["exemplar_postings"], info["exemplar_scale"] = int(fires.sum()), round(scale, 4)
    return Concepts(names, table, info, group_names, exemplar_names)


def _names(nt: NeuronTerms, vocab: Vocabulary) -> tuple[set[str], np.ndarray]:
    """The generic terms of ``nt`` and, per query word, whether it may name a row. Words the model
    writes from everywhere ("themselves", "however", "both": among the top terms of more than
    ``GENERIC_SHARE`` of the rows) say little about any one neuron: no names."""
    spread = np.bincount(nt.index[nt.index >= 0], minlength=len(nt.terms))
    generic = {t for t, k in zip(nt.terms, spread.tolist()) if k > max(GENERIC_MIN, GENERIC_SHARE * len(nt.keys))}
    return generic, np.array([w in vocab.words and w not in vocab.function and w not in generic
                              for w in vocab.query], bool)


def _exemplar_scan(con, vectors, normalise, vocab: Vocabulary, min_sim: float, min_evidence: int, min_centroid: float,
                   examples: dict | None, cols: dict, postings: int, posting_evidence: int) -> dict:
    """The scan of the tokens each neuron fires on (``exemplar_rows``) in the place of its `out`
    terms: postings of side ``EXEMPLARS`` appended to ``cols`` as ``concepts`` makes its own, and
    {(layer, neuron): (word, evidence, centroid cosine)}, each neuron named as ``concepts`` names
    it where the name and its ``EVIDENCE`` closest evidence terms cover ``EXEMPLAR_SHARE`` of those
    tokens; what is generic is counted among those tokens ("its", "class", "year" peak everywhere)."""
    rows = exemplar_rows(con)
    nt = _terms(rows, normalise, vocab)
    if not nt.terms:
        return {}
    _, is_name = _names(nt, vocab)
    scan = _Scan(vectors, vocab.query, nt, min_sim, examples)
    namer = _Namer(scan, vocab.query, is_name, min_evidence, min_centroid)
    query = pa.array(vocab.query, pa.string())
    for lo, plain, asked in scan.chunks():
        _add_postings(cols, scan, lo, asked, query, postings, posting_evidence, EXEMPLARS)
        namer.add(lo, plain.S, plain.n, plain.sims)
    names = namer.names()
    # A name must cover EXEMPLAR_SHARE of the neuron's exemplars (its word or one of its EVIDENCE
    # closest evidence terms at their peak; a plural peak counts for its singular, not the other
    # way): three words among twenty exemplars of punctuation name nothing.
    peaks: dict[tuple[int, int], list[str]] = {}
    for layer, neuron, _, token, _ in rows:
        if (layer, neuron) in names:
            peaks.setdefault((layer, neuron), []).append(normalise(token))
    kept = {}
    for key, (word, evidence, cos) in names.items():
        said = {word, *evidence}
        covered = sum(t in said or (t.endswith("s") and t[:-1] in said) for t in peaks[key])
        if covered >= EXEMPLAR_SHARE * len(peaks[key]):
            kept[key] = (word, evidence, cos)
    return kept


def concept_matches(con, check_sql: str, src: int, fires: int) -> tuple[str | None, dict]:
    """Concept matches as the SELECT of a search source, and where they came from: the store's
    ``concept_postings``, which the labels stage writes. Without any, (None, {"missing": why}).

    The SELECT gives the columns of the literal matches (term, layer, neuron, src, rank,
    token_id, z, check) plus ``evidence``, src ``src`` for the tokens a neuron writes and ``fires``
    for those it fires on; the clamp check joins here, as for literal matches.
    """
    record = finished_stage(con, "labels")
    if record is None:
        return None, {"missing": "the labels stage has not run, and concept matches come from it (`atlas labels`)"}
    if "concept_postings" not in record:
        return None, {"missing": "the labels stage ran before it kept concept postings: run `atlas labels` again"}
    if not record["concept_postings"]:
        why = record.get("resource", {}).get("missing")
        return None, {"missing": why or "the labels stage found no concept matches"}
    n, words, fired = con.execute(f"SELECT count(*), count(DISTINCT word), count(*) FILTER (WHERE side = '{EXEMPLARS}') "
                                  "FROM concept_postings").fetchone()
    select = f"""
        SELECT c.word AS term, c.layer, c.neuron, CASE WHEN c.side = '{EXEMPLARS}' THEN {fires} ELSE {src} END AS src,
               c.rank, -1 AS token_id, c.z,
               {check_sql} AS "check", c.evidence
        FROM concept_postings c JOIN neurons n USING (layer, neuron)"""
    return select, {"postings": n, "words": words, "fires_on": fired, "resource": record.get("resource"),
                    "word_lists": record.get("concepts_word_lists"), "made_by": "labels stage"}
