"""The search index's format, shared by its writer (``atlas.site.search``) and its readers
(``atlas.site.search_query`` and the search page's ``assets/atlas-search.js``): the index's
constants and sources, how a token or a query word becomes a term and a term its shard, and how
a term's postings are packed into its shard. What a term, a strength and a score are, and how a
query ranks, is in ``atlas.site.search``'s docstring. Keep ``normalise``, ``query_terms``,
``shard_of`` and ``entry_postings`` in step with their JavaScript twins.
"""

from __future__ import annotations

import unicodedata

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
SHARD_BYTES = 16_384    # aimed-at mean shard size; a query fetches one shard per word (and one for its phrase)
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
