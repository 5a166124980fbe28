"""Neuron-page sections from the corpus pass: exemplar token strips, histogram, attribution.

Read per block of neurons in bulk, like the rest of the page data; a store without a
finished exemplars stage simply gives no sections. Only what a page shows is fetched here
(the strongest few exemplars and attributions); the neuron's JSON carries every row.

Strips are the densest markup of a page (16 tokens per exemplar), so they are built here
as one string per exemplar rather than in a template loop: a token that the neuron reacts
to is an ``<i>`` whose class names its shade bucket, ``p1``..``p5`` up and ``n1``..``n5``
down (styled once in ``atlas.css``), the exemplar's own token is a ``<b>``, and the tokens
it does not react to are plain text.
"""

from __future__ import annotations

import math

import numpy as np
from markupsafe import Markup

from atlas.site.text import fmt_stat, strip_text, token_cell
from atlas.store import finished_stage

SHOWN_MAX, SHOWN_MIN, SHOWN_ATTR = 4, 3, 5     # per page (a page stays under 10 KB); the JSON carries all rows
OPEN_BOX = "\u2423"                              # a space made visible
SAMPLE_BEFORE, SAMPLE_AFTER = 5, 3              # tokens shown around a band sample's token
SHOWN_SAMPLES = 1                               # band samples shown per band (the JSON has them all)
SHADES = 5                                      # colour buckets per sign


def has_corpus(con) -> bool:
    return finished_stage(con, "exemplars") is not None


def strip_vocab(con) -> list[str]:
    """Strip text of every vocabulary entry, indexed by token id (one list per worker)."""
    rows = con.execute("SELECT token_id, token FROM vocab ORDER BY token_id").fetchall()
    out = ["\u2205"] * (rows[-1][0] + 1 if rows else 0)
    for token_id, token in rows:
        out[token_id] = strip_text(token)
    return out


_OPEN = {level: f"<i class={'p' if level > 0 else 'n'}{abs(level)}>" for level in range(-SHADES, SHADES + 1) if level}
_FOCUS = {level: f"<b class={'p' if level > 0 else 'n'}{abs(level)}>" if level else "<b>"
          for level in range(-SHADES, SHADES + 1)}


def shade_levels(windows: list[list], scale: list[float]) -> list[list[int]]:
    """Shade bucket of every window activation: activation over the row's normaliser ``scale``
    in steps of 1/SHADES, clipped to ±SHADES; missing or NaN activations and rows without a
    positive normaliser get 0. One numpy pass for a whole block's strips."""
    w = np.array([[np.nan if a is None else a for a in row] for row in windows], np.float32).reshape(len(windows), -1)
    s = np.array([x if x is not None and x > 0 and math.isfinite(x) else np.nan for x in scale], np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        levels = np.rint(np.clip(w * (SHADES / s)[:, None], -SHADES, SHADES))
    return np.nan_to_num(levels, nan=0.0).astype(np.int8).tolist()


def strip_html(ids: list[int], levels: list[int], focus: int, vocab: list[str]) -> Markup:
    """One exemplar's tokens ``ids`` with their shade ``levels``; ``focus`` is the exemplar's own token.

    Neighbouring tokens of one shade share one element: shaded runs look the same whether
    their tokens are wrapped one by one or together, and a strip is the page's densest markup.
    """
    parts = []
    n_vocab = len(vocab)
    run = 0                  # the shade of the open <i>, 0 when none is open
    for j, token_id in enumerate(ids):
        level = levels[j]
        text = vocab[token_id] if 0 <= token_id < n_vocab else "\u2205"
        if run and (j == focus or level != run):
            parts.append("</i>")
            run = 0
        if j == focus:
            # A peak on a space token would be an empty-looking box: show its spaces as ␣.
            parts.append(f"{_FOCUS[level]}{text if text.strip(' ') else text.replace(' ', OPEN_BOX)}</b>")
        elif level:
            if not run:
                parts.append(_OPEN[level])
                run = level
            parts.append(text)
        else:
            parts.append(text)
    if run:
        parts.append("</i>")
    return Markup("".join(parts))


def corpus_sections(con, layer: int, lo: int, hi: int, vocab: list[str], normaliser: dict[int, float]) -> dict[int, dict]:
    """Per neuron of ``lo..hi-1``: the shown exemplars as strips, the histogram, the shown attributions.

    ``normaliser`` maps each neuron to the normaliser its strips are shaded by.
    """
    out: dict[int, dict] = {}

    def section(n: int) -> dict:
        if n not in out:
            out[n] = {"max": [], "min": [], "supports": [], "suppresses": [], "histogram": None, "bands": []}
        return out[n]

    rows = con.execute(f"""
            SELECT e.neuron, e.polarity, e.norm_activation, e.window_start, e.token_pos, e.window_activations,
                   list_slice(d.token_ids, greatest(e.window_start, 0) + 1, e.window_start + len(e.window_activations))
            FROM exemplars e JOIN corpus_docs d USING (doc_id)
            WHERE e.layer = ? AND e.neuron >= ? AND e.neuron < ?
              AND e.rank < CASE e.polarity WHEN 'max' THEN {SHOWN_MAX} ELSE {SHOWN_MIN} END
            ORDER BY e.neuron, e.polarity, e.rank""", [layer, lo, hi]).fetchall()
    if rows:
        levels = shade_levels([r[5] for r in rows], [normaliser.get(r[0]) for r in rows])
        for (n, polarity, norm_act, ws, pos, _, ids), level in zip(rows, levels):
            offset = max(0, -ws)        # a window that starts before its input has no tokens there
            section(n)[polarity].append((norm_act, strip_html(ids, level[offset:], pos - ws - offset, vocab)))
    for n, band in band_sections(con, layer, lo, hi, vocab):
        section(n)["bands"].append(band)
    hist = con.execute("SELECT neuron, counts FROM histograms WHERE layer = ? AND neuron >= ? "
                       "AND neuron < ?", [layer, lo, hi]).fetchall()
    if hist:
        for (n, _), heights in zip(hist, histogram_heights([c for _, c in hist])):
            section(n)["histogram"] = histogram_path(heights)
    for n, polarity, token, attribution in con.execute(f"""
            SELECT neuron, polarity, token, attribution FROM attributions
            WHERE layer = ? AND neuron >= ? AND neuron < ? AND rank < {SHOWN_ATTR}
            ORDER BY neuron, polarity, rank""", [layer, lo, hi]).fetchall():
        section(n)[polarity].append((token, attribution))
    for sec in out.values():
        for polarity in ("supports", "suppresses"):
            sec[polarity] = attribution_list(sec[polarity])
    return out


def band_sections(con, layer: int, lo: int, hi: int, vocab: list[str]) -> list[tuple[int, dict]]:
    """(neuron, band) pairs: each band's bin range over the normaliser and its sampled tokens as strips."""
    if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'exemplar_samples'").fetchone()[0]:
        return []
    rows = con.execute(f"""
            SELECT s.neuron, s.band, s.bin_lo, s.bin_hi, s.activation, s.norm_activation, s.token_pos,
                   list_slice(d.token_ids, greatest(s.token_pos - {SAMPLE_BEFORE}, 0) + 1, s.token_pos + {SAMPLE_AFTER + 1})
            FROM exemplar_samples s JOIN corpus_docs d USING (doc_id)
            WHERE s.layer = ? AND s.neuron >= ? AND s.neuron < ? AND s.rank < {SHOWN_SAMPLES}
            ORDER BY s.neuron, s.band, s.rank""", [layer, lo, hi]).fetchall()
    out: list[tuple[int, dict]] = []
    for n, band, b_lo, b_hi, act, norm_act, pos, ids in rows:
        if not out or out[-1][0] != n or out[-1][1]["band"] != band:
            scale = act / norm_act if norm_act else float("nan")
            out.append((n, {"band": band, "lo": b_lo / scale if scale > 0 else b_lo,
                            "hi": b_hi / scale if scale > 0 else b_hi, "strips": []}))
        focus = pos - max(0, pos - SAMPLE_BEFORE)
        level = int(max(-SHADES, min(SHADES, round((norm_act or 0) * SHADES)))) if norm_act == norm_act else 0
        levels = [0] * len(ids)
        levels[focus] = level
        out[-1][1]["strips"].append((norm_act, strip_html(ids, levels, focus, vocab)))
    return out


def attribution_list(items: list[tuple]) -> Markup:
    """(token, attribution) pairs as ``<b>token</b> value`` joined by dots."""
    return Markup(" · ".join(f"<b>{token_cell(t)}</b> {fmt_stat(a)}" for t, a in items))


def histogram_heights(counts: list[list[int]], height: int = 48) -> list[list[int]]:
    """Bar heights in whole pixels on a log scale (the tails matter), one row per histogram."""
    logs = np.log1p(np.array(counts, np.float64))                      # [neurons, bins]
    top = logs.max(axis=1, keepdims=True)
    top[top == 0] = 1.0
    return np.rint(logs / top * height).astype(np.int64).tolist()


def histogram_path(heights: list[int], width: int = 256, height: int = 48) -> str:
    """An SVG path of a histogram's bars, one segment per run of equal bars, in relative moves
    (``h``/``v``: short numbers), which keeps it to a few hundred bytes."""
    step = width / max(1, len(heights))
    parts = [f"M0 {height}"]
    x = last = 0
    for i, h in enumerate(heights):
        if h != last:
            parts.append(f"h{round(i * step) - x}v{last - h}")
            x, last = round(i * step), h
    parts.append(f"H{width}V{height}Z")
    return "".join(parts)
