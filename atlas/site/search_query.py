"""Reading the search index: a query's ranked neurons from its shards (``rank``, ``search``),
and what each result says in words (``match_words``, ``status_line``, ``format_hits``), as
``atlas search`` prints it. The search page's ``assets/atlas-search.js`` is the twin of
``rank`` and ``match_words``; the rules are in ``atlas.site.search``'s docstring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from atlas.errors import AtlasError
from atlas.site.index_format import (CONCEPT, DESCRIPTION, DIRECTIONS, FIRES, INDEX_DIR, META_NAME, OUT_TOP, SCHEMA,
                                     SOURCES, SRC_DIRECTION, entry_postings, query_terms, shard_name, shard_of)
from atlas.site.text import show_token, visible


NOT_IN_PHRASE = 2 ** 30     # a hit's place in the query phrase's list where it is not in it: after every place


def score(strength: int, src: int, check: int) -> int:
    """A match's score from its strength and its neuron's faithfulness (both x 100; -1: not measured)."""
    return (strength * (50 + check) + 50) // 100 if src == OUT_TOP and check >= 0 else strength


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
                                               "phrase": NOT_IN_PHRASE, "best": position, "score": 0,
                                               "faithfulness": check / 100 if check >= 0 else None, "matches": []}
            hit["words"].update(terms if term == phrase else [term])
            hit["best"] = min(hit["best"], position)
            if term == phrase:
                hit["phrase"] = min(hit["phrase"], position)
            hit["score"] += score(strength, src, check)
            d = SRC_DIRECTION[src]
            hit["matches"].append({"term": term, "token": token, "source": meta["sources"][src],
                                   "direction": DIRECTIONS[d] if d is not None else None,
                                   "rank": rk, "strength": strength / 100})
            position += 1
    for h in hits.values():
        h["words"] = len(h["words"])
    # A known phrase is the concept asked for: its own list's order comes before single words' lists.
    ordered = sorted(hits.values(), key=lambda h: (-h["words"], h["phrase"], h["best"], -h["score"], h["layer"],
                                                   h["neuron"]))
    for h in ordered:
        h["score"] /= 100
        h["url"] = f"neurons/{h['layer']}/{h['neuron']}/"
        del h["best"], h["phrase"]
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
