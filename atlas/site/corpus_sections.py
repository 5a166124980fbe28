"""Neuron-page sections from the corpus pass: exemplar token strips, histogram, attribution.

Read per block of neurons in bulk, like the rest of the page data; a store without a
finished exemplars stage simply gives no sections. Only what a page's HTML shows is fetched
here (the strongest exemplars); the neuron's JSON carries every row, and atlas-neuron.js
draws the histogram and the attributions from it (``histogram_figure`` is the Python twin of
its drawing, and the one the tests hold it to).

Strips are the densest markup of a page, so they are built here as one string per exemplar
rather than in a template loop. Their colour scale diverges from zero and is the neuron's own:
its ends are ±``strip_scale`` (the larger of the normaliser and −min activation), cut in sixths:
a token within a sixth of the scale of zero stays blank, then ``SHADES`` shades per sign. A token with a
shade is an ``<i>`` whose class names it, ``p1``..``p5`` up and ``n1``..``n5`` down (styled once
in ``atlas.css``), and whose ``title`` is its activation (the hover value); the exemplar's own
token is a ``<b>``; the tokens the neuron does not react to are plain text.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import orjson
from markupsafe import Markup

from atlas.site.neuron_json import vocab_by_id
from atlas.site.text import fmt_act, strip_text
from atlas.store import finished_stage

SHOWN_MAX, SHOWN_MIN, SHOWN_ATTR = 10, 2, 5    # per page (strips in its HTML, attributions drawn); the JSON carries all rows
OPEN_BOX = "\u2423"                              # a space made visible
SAMPLE_BEFORE, SAMPLE_AFTER = 5, 3              # tokens shown around a band sample's token
STRIP_BEFORE, STRIP_AFTER = 7, 4               # window tokens a page's strip shows around the peak (the JSON has all)
SHOWN_SAMPLES = 1                               # band samples shown per band (the JSON has them all)
SHADES = 5                                      # colour buckets per sign


def has_corpus(con) -> bool:
    return finished_stage(con, "exemplars") is not None


def strip_vocab(con) -> list[str]:
    """Strip text of every vocabulary entry, indexed by token id (one list per worker)."""
    return [strip_text(token) for token in vocab_by_id(con)]     # an id without text is EMPTY, as a text-less token is


_CLASS = {level: f" class={'p' if level > 0 else 'n'}{abs(level)}" if level else "" for level in range(-SHADES, SHADES + 1)}


def strip_scale(normaliser: float | None, act_min: float | None) -> float | None:
    """The end of a neuron's diverging strip scale: the larger of its normaliser and −(its minimum
    activation), so both signs share one scale and near-zero stays near blank; None without one."""
    ends = [x for x in (normaliser, None if act_min is None else -act_min) if x is not None and math.isfinite(x)]
    scale = max(ends, default=0.0)
    return scale if scale > 0 else None


def shade_level(x, scale):
    """Shade bucket(s) of activation ``x`` on a neuron's diverging scale ``scale``: the scale is cut
    into sixths, and bucket k of SHADES holds |x| in [k/6, (k+1)/6) of it (the last one all
    above 5/6), signed; |x| under a sixth of the scale is 0, blank. Works on numpy arrays."""
    mag = np.minimum(np.floor(np.abs(x) * ((SHADES + 1) / scale)), SHADES)
    return np.sign(x) * mag


def shade_levels(windows: list[list], scale: list[float]) -> list[list[int]]:
    """``shade_level`` of every window activation of a block's strips, with the row's
    ``strip_scale``; missing or NaN activations and rows without a scale get 0. One numpy pass."""
    w = np.array([[np.nan if a is None else a for a in row] for row in windows], np.float32).reshape(len(windows), -1)
    s = np.array([x if x is not None and x > 0 and math.isfinite(x) else np.nan for x in scale], np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        levels = shade_level(w, s[:, None])
    return np.nan_to_num(levels, nan=0.0).astype(np.int8).tolist()


def strip_html(ids: list[int], levels: list[int], focus: int, vocab: list[str], acts: list) -> Markup:
    """One exemplar's tokens ``ids`` with their shade ``levels`` and activations ``acts``;
    ``focus`` is the exemplar's own token.

    Only shaded tokens (and the focus) carry their value as a ``title``: a blank token is within
    a sixth of the scale of zero, and a title on every token would double a page's bytes.
    """
    parts = []
    n_vocab = len(vocab)
    for j, token_id in enumerate(ids):
        level = levels[j]
        text = vocab[token_id] if 0 <= token_id < n_vocab else "\u2205"
        if j == focus:
            # A peak on a space token would be an empty-looking box: show its spaces as ␣.
            text = text if text.strip(" ") else text.replace(" ", OPEN_BOX)
            parts.append(f"<b{_CLASS[level]}>{text}</b>")
        elif level:
            parts.append(f"<i{_CLASS[level]} title={fmt_act(_value(acts, j))}>{text}</i>")
        else:
            parts.append(text)
    return Markup("".join(parts))


def _value(acts: list, j: int) -> float | None:
    return acts[j] if j < len(acts) else None


def corpus_sections(con, layer: int, lo: int, hi: int, vocab: list[str], scale: dict[int, float | None]) -> dict[int, dict]:
    """Per neuron of ``lo..hi-1``: the shown exemplars as strips, and whether it has a histogram.

    ``scale`` maps each neuron to its ``strip_scale``, the end of its strips' colour scale.
    """
    out: dict[int, dict] = {}

    def section(n: int) -> dict:
        if n not in out:
            out[n] = {"max": [], "min": [], "histogram": False, "bands": [], "scale": scale.get(n),
                      "attributions_shown": SHOWN_ATTR}
        return out[n]

    rows = con.execute(f"""
            SELECT e.neuron, e.polarity, e.activation, e.window_start, e.token_pos, e.window_activations,
                   list_slice(d.token_ids, greatest(e.window_start, 0) + 1, e.window_start + len(e.window_activations))
            FROM exemplars e JOIN corpus_docs d USING (doc_id)
            WHERE e.layer = ? AND e.neuron >= ? AND e.neuron < ?
              AND e.rank < CASE e.polarity WHEN 'max' THEN {SHOWN_MAX} ELSE {SHOWN_MIN} END
              AND e.window_activations IS NOT NULL     -- deeper than --window-ranks: no strip
            ORDER BY e.neuron, e.polarity, e.rank""", [layer, lo, hi]).fetchall()
    if rows:
        levels = shade_levels([r[5] for r in rows], [scale.get(r[0]) for r in rows])
        for (n, polarity, act, ws, pos, window, ids), level in zip(rows, levels):
            offset = max(0, -ws)        # a window that starts before its input has no tokens there
            focus = pos - ws - offset
            a, b = max(0, focus - STRIP_BEFORE), focus + STRIP_AFTER + 1
            section(n)[polarity].append((act, strip_html(ids[a:b], level[offset:][a:b], focus - a, vocab,
                                                         window[offset:][a:b])))
    for n, band in band_sections(con, layer, lo, hi, vocab, scale):
        section(n)["bands"].append(band)
    for (n,) in con.execute("SELECT neuron FROM histograms WHERE layer = ? AND neuron >= ? AND neuron < ?",
                            [layer, lo, hi]).fetchall():
        section(n)["histogram"] = True
    return out


def band_sections(con, layer: int, lo: int, hi: int, vocab: list[str], scale: dict[int, float | None]) -> list[tuple[int, dict]]:
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
            ratio = act / norm_act if norm_act else float("nan")
            out.append((n, {"band": band, "lo": b_lo / ratio if ratio > 0 else b_lo,
                            "hi": b_hi / ratio if ratio > 0 else b_hi, "strips": []}))
        focus = pos - max(0, pos - SAMPLE_BEFORE)
        s = scale.get(n)
        level = int(shade_level(act, s)) if s and act == act else 0
        levels, acts = [0] * len(ids), [None] * len(ids)
        levels[focus], acts[focus] = level, act
        out[-1][1]["strips"].append((act, strip_html(ids, levels, focus, vocab, acts)))
    return out


HIST_W, HIST_H = 256, 48          # the histogram's plot area in SVG units (axes and labels sit below and left)


def histogram_edges_meta(con) -> list[float] | None:
    """The histograms' bin edges in activation units as the store records them (``atlas_meta``), or None."""
    row = con.execute("SELECT value FROM atlas_meta WHERE key = 'histogram_edges'").fetchone()
    return orjson.loads(row[0]) if row else None


def histogram_edges(con, bins: int) -> np.ndarray:
    """The histogram's bin edges in activation units, from ``atlas_meta`` (a store without them
    gets ``bins`` equal bins over ±1, so the figure still draws)."""
    edges = np.array(histogram_edges_meta(con) or [], np.float64)
    return edges if len(edges) == bins + 1 else np.linspace(-1.0, 1.0, bins + 1)


def histogram_figure(counts: list[int], edges: np.ndarray) -> dict:
    """A histogram as the page draws it: bars on a log scale (the tails matter) over the bins the
    neuron uses (zero always among them), an SVG path in relative moves (a few hundred bytes),
    and x ticks at 0 and at powers of ten, placed on the bins' own scale."""
    c = np.asarray(counts, np.float64)
    used = np.flatnonzero(c)
    zero = int(np.searchsorted(edges, 0.0))                       # the edge nearest above zero
    first = min(int(used[0]) if len(used) else zero, zero - 1, len(c) - 1)
    last = max(int(used[-1]) if len(used) else zero, zero)
    first, last = max(first, 0), min(last, len(c) - 1)
    logs = np.log1p(c[first:last + 1])
    # Heights in steps of 2 units: a log count needs no finer, and equal neighbours share a segment.
    heights = (np.rint(logs / (logs.max() or 1.0) * (HIST_H // 2)) * 2).astype(np.int64).tolist()
    step = HIST_W / len(heights)
    parts, x, prev = [f"M0 {HIST_H}"], 0, 0
    for i, h in enumerate(heights):
        if h != prev:
            parts.append(f"h{round(i * step) - x}v{prev - h}")
            x, prev = round(i * step), h
    parts.append(f"H{HIST_W}V{HIST_H}Z")
    kept = _ticks(tuple(edges[first:last + 2].tolist()))
    return {"path": "".join(parts), "ticks": kept, "count_max": int(c.max()) if len(c) else 0,
            "zero": next((x for x, label in kept if label == "0"), None)}


@lru_cache(maxsize=4096)
def _ticks(edges: tuple[float, ...]) -> list[tuple[int, str]]:
    """The x ticks over bins with these edges: the same for every neuron that uses the same bins."""
    step = HIST_W / (len(edges) - 1)
    ticks = []
    for v in (0.0, *(sign * 10.0 ** p for p in range(-2, 4) for sign in (-1, 1))):
        if edges[0] <= v <= edges[-1]:
            pos = float(np.interp(v, edges, np.arange(len(edges)))) * step
            ticks.append((round(pos), fmt_tick(v)))
    ticks.sort()
    kept = [t for t in ticks if t[1] == "0"]
    for t in ticks:                       # drop ticks that would print over one another
        if all(abs(t[0] - k[0]) >= 22 for k in kept):
            kept.append(t)
    kept.sort()
    return kept


def fmt_tick(v: float) -> str:
    """A tick's label: ticks are 0 and powers of ten, written plainly (``0.01``, ``100``, ``-1``)."""
    return f"{v:g}" if v else "0"
