"""Neuron-page sections from the corpus pass: exemplar token strips, histogram, attribution.

Read per block of neurons in bulk, like the rest of the page data; a store without a
finished exemplars stage simply gives no sections.
"""

from __future__ import annotations

import math
from collections import defaultdict

SHOWN_MAX, SHOWN_MIN, SHOWN_ATTR = 8, 4, 8     # per page; the JSON carries all rows


def has_corpus(con) -> bool:
    row = con.execute("SELECT value FROM atlas_meta WHERE key = 'stage.exemplars'").fetchone()
    return bool(row) and '"status": "done"' in row[0]


def vocab_list(con) -> list[str]:
    return [t for (t,) in con.execute("SELECT token FROM vocab ORDER BY token_id").fetchall()]


def corpus_sections(con, layer: int, lo: int, hi: int, vocab: list[str]) -> dict[int, dict]:
    """Per neuron of ``lo..hi-1``: exemplars with token strips, histogram counts, attribution rows."""
    out: dict[int, dict] = defaultdict(lambda: {"max": [], "min": [], "supports": [], "suppresses": [],
                                                "histogram": None, "rows": {"exemplars": [], "attributions": []}})
    normaliser = dict(con.execute("SELECT neuron, normaliser FROM neurons WHERE layer = ? AND neuron >= ? "
                                  "AND neuron < ?", [layer, lo, hi]).fetchall())
    for (n, polarity, rank, doc_id, token_pos, act, norm_act, ws, wins, ids) in con.execute("""
            SELECT e.neuron, e.polarity, e.rank, e.doc_id, e.token_pos, e.activation, e.norm_activation,
                   e.window_start, e.window_activations,
                   list_slice(d.token_ids, greatest(e.window_start, 0) + 1, e.window_start + len(e.window_activations))
            FROM exemplars e JOIN corpus_docs d USING (doc_id)
            WHERE e.layer = ? AND e.neuron >= ? AND e.neuron < ? ORDER BY e.neuron, e.polarity, e.rank""",
            [layer, lo, hi]).fetchall():
        sec = out[n]
        sec["rows"]["exemplars"].append({"polarity": polarity, "rank": rank, "doc_id": doc_id,
                                         "token_pos": token_pos, "activation": act, "norm_activation": norm_act,
                                         "window_start": ws, "window_activations": [_num(a) for a in wins]})
        if rank >= (SHOWN_MAX if polarity == "max" else SHOWN_MIN):
            continue
        scale = normaliser.get(n) or 0.0
        strip, offset = [], max(0, -ws)
        for j, token_id in enumerate(ids):
            a = wins[offset + j]
            shade = 0.0 if a is None or not math.isfinite(a) or scale <= 0 else max(-1.0, min(1.0, a / scale))
            strip.append((vocab[token_id] if 0 <= token_id < len(vocab) else "", round(shade, 2),
                          ws + offset + j == token_pos))
        sec[polarity].append({"rank": rank, "doc_id": doc_id, "activation": act, "norm_activation": norm_act,
                              "strip": strip})
    for n, counts in con.execute("SELECT neuron, counts FROM histograms WHERE layer = ? AND neuron >= ? "
                                 "AND neuron < ? ORDER BY neuron", [layer, lo, hi]).fetchall():
        out[n]["histogram"] = histogram_path(counts)
    for (n, polarity, rank, token_id, token, attribution, doc_id, token_pos) in con.execute("""
            SELECT neuron, polarity, rank, token_id, token, attribution, doc_id, token_pos FROM attributions
            WHERE layer = ? AND neuron >= ? AND neuron < ? ORDER BY neuron, polarity, rank""", [layer, lo, hi]).fetchall():
        out[n]["rows"]["attributions"].append({"polarity": polarity, "rank": rank, "token_id": token_id,
                                               "token": token, "attribution": attribution, "doc_id": doc_id,
                                               "token_pos": token_pos})
        if rank < SHOWN_ATTR:
            out[n][polarity].append((token, attribution))
    return out


def _num(x):
    return x if x is not None and math.isfinite(x) else None


def histogram_path(counts: list[int], width: int = 256, height: int = 48) -> str:
    """An SVG path of the activation histogram, heights on a log scale (the tails matter)."""
    logs = [math.log1p(c) for c in counts]
    top = max(logs) or 1.0
    step = width / len(counts)
    parts = [f"M0 {height}"]
    for i, v in enumerate(logs):
        y = round(height - v / top * height, 1)
        parts.append(f"L{round(i * step, 1)} {y}L{round((i + 1) * step, 1)} {y}")
    parts.append(f"L{width} {height}Z")
    return "".join(parts)
