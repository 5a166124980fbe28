"""Neuron pages and their JSON, written one block of neurons at a time from the store's rows.

A block is up to ``BLOCK`` neurons of one layer: every table is read for the block in one
query, so memory is bounded at any model size and the database does the scanning. Page
and JSON are made from the same fetch of the same rows:

- the JSON is each contract table's rows for the neuron in the compact layout of
  ``neuron_json`` (columns, tokens listed once, floats as whole numbers of a step), serialised by DuckDB
  itself (``to_json``) in C++, which at half a million neurons is the difference between
  minutes and seconds;
- the page is the jinja template ``neuron.html`` filled from the same rows, with the dense
  repeated parts (logit rows, exemplar strips) joined in Python: a template loop costs
  about five times as much per row. What a citation and a reader without JavaScript do not
  need (the reading sides, neighbours, histogram, ...) is left to atlas-neuron.js, which
  draws it from the neuron's JSON: a page is about 5.6 KB, and there are up to half a million.
  End tags that HTML implies (``</td>``, ``</tr>``, ``</li>``) are left out of them.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace as NS
from typing import Any

from markupsafe import Markup

from atlas.schema import JSON_TABLES, SIDES
from atlas.site.clamp_sections import clamp_sections
from atlas.site.clusters import cluster_sections
from atlas.site.corpus_sections import corpus_sections, strip_scale, strip_vocab
from atlas.site.describe_sections import description_sections, has_descriptions
from atlas.site.neuron_json import FORMAT, VOCAB, VOCAB_URL, neurons_sql, table_sql, token_index_sql, tokens_sql
from atlas.site.text import fmt_logit, html_safe_json, to_json, token_cell

BLOCK = 1024            # neurons fetched and rendered per query; bounds memory at any model size
# Short on purpose: they are on every page; the method page says how each direction is made.
SIDE_TITLES = {"in": "what it reads (up row)", "gate": "what opens its gate (gate row)",
               "out": "what it writes (down column)"}
# Decoded tokens a page shows per side (top, bottom). The top `out` ones are in the page's HTML,
# what a citation of the neuron needs; every other table, the reading sides' and the `out` side's
# bottom one, atlas-neuron.js draws from the neuron's JSON, which has every decoded token.
SHOWN_TOKENS = {"in": (8, 4), "gate": (8, 4)}
SHOWN_OUT = (10, 10)


def drawn_sides() -> list[dict]:
    """What atlas-neuron.js needs to draw a page's decoded tables, the same on every page (it is
    in atlas-site.json): per side, in ``SIDES`` order, its title and the (top, bottom) rows it
    draws; the `out` side draws no top rows, which are in the HTML."""
    return [{"side": side, "title": SIDE_TITLES[side], "shown": list(SHOWN_TOKENS.get(side, (0, SHOWN_OUT[1])))}
            for side in SIDES]


def side_section(tokens: dict, pushed: dict[int, float] | None) -> NS:
    """The `out` side of a page: its strongest rows (its stats line is drawn from the JSON). ``tokens``
    holds the side's strongest rows (``"top"``, (token, logit) pairs) and how many top rows it has (``"total"``)."""
    top = SHOWN_OUT[0]
    return NS(name="out", title=SIDE_TITLES["out"], pushed=bool(pushed),
              top=logit_rows(tokens["top"][:top], pushed), shown=min(top, len(tokens["top"])), total=tokens["total"])


def logit_rows(rows: list[tuple], pushed: dict[int, float] | None = None) -> Markup:
    """Table rows of (token, logit); the rank is a CSS counter, the probability is in the JSON.

    ``pushed`` maps a rank to the token's Δ log p when the neuron is clamped (its `out`
    tokens that the clamp stage measured), shown as a third column. Rows are not separated
    by newlines: on half a million pages every byte of markup counts.
    """
    if not pushed:
        return Markup("".join(f"<tr><td>{token_cell(t)}<td>{fmt_logit(lg)}" for t, lg in rows))
    return Markup("".join(f"<tr><td>{token_cell(t)}<td>{fmt_logit(lg)}{_delta(pushed.get(rank))}"
                          for rank, (t, lg) in enumerate(rows)))


def _delta(d: float | None) -> str:
    return "<td>" if d is None else f"<td>{d:+.2f}"       # an empty cell keeps the row's borders whole


# -- what every page of a site shares ----------------------------------------------------
BIBTEX_SLOTS = ("<L>", "<N>", "<U>")     # what a page's script puts its layer, neuron and URL in


def bibtex(site: dict, layer: int | str, neuron: int | str, url: str) -> str:
    """A BibTeX entry for one neuron page; ``site`` holds the model id, weights hash, versions, year.
    With ``BIBTEX_SLOTS`` for the layer, neuron and URL, the entry every page fills in (atlas-site.json)."""
    return (f"@misc{{{bibtex_key(site['model_id'], layer, neuron)},\n"
            f"  title = {{Layer {layer}, neuron {neuron} of {{{bibtex_text(site['model_id'])}}}}},\n"
            f"  howpublished = {{Neuron atlas}},\n"
            f"  url = {{{url.replace('{', '').replace('}', '')}}},\n"
            f"  note = {{weights {bibtex_text(site['weights_hash'][:23])}; atlas {bibtex_text(site['tool_version'])}}},\n"
            f"  year = {{{site['year']}}}\n}}")


def bibtex_key(model_id: str, layer: int, neuron: int) -> str:
    """A citation key that stays the same for the same neuron of the same model, e.g. ``atlas:org-model:L5:N100``."""
    slug = re.sub(r"[^a-z0-9]+", "-", str(model_id).lower()).strip("-") or "model"
    return f"atlas:{slug}:L{layer}:N{neuron}"


def bibtex_text(text: str) -> str:
    """Text as a BibTeX field value keeps it: braces and LaTeX specials are escaped."""
    out = str(text).replace("\\", "/").replace("{", "(").replace("}", ")")
    return re.sub(r"([#$%&_^~])", r"\\\1", out)


def block_jobs(con, site: str, layer_sizes: list[int], page: dict, meta: dict, site_url: str,
               has_corpus: bool, has_clusters: bool, has_clamp: bool) -> list[dict]:
    """The site's neuron pages as blocks of up to ``BLOCK`` neurons of one layer.

    Each job is a plain dict (workers receive it pickled) holding all that ``render_block``
    needs besides a connection: where to write, the page globals, the queries, and which
    stages the store has. Only the JSON tables of those stages are read.
    """
    described = has_descriptions(con)
    tables = [t for t in JSON_TABLES if t == "decoded_tokens" or (t == "neighbours" and has_clusters)
              or (t in ("exemplars", "exemplar_samples", "attributions", "histograms") and has_corpus)
              or (t == "clamp_effects" and has_clamp) or (t == "descriptions" and described)]
    common = {"site": site, "layer_sizes": layer_sizes, "site_url": site_url, "page": page,
              "schema_version": meta.get("schema_version"), "model_json": to_json(meta["model"]["id"]).rstrip("\n"),
              "sql": {"neurons": neurons_sql(con), "json": {t: table_sql(con, t, JSON_TABLES[t], tables) for t in tables},
                      "tokens": tokens_sql(con, tables), "token_index": token_index_sql(con, tables)},
              "has_corpus": has_corpus, "has_clusters": has_clusters, "has_clamp": has_clamp,
              "has_descriptions": described}
    return [dict(common, layer=layer, lo=lo, hi=min(lo + BLOCK, size))
            for layer, size in enumerate(layer_sizes) for lo in range(0, size, BLOCK)]


# -- a block of neurons --------------------------------------------------------------------
_worker: dict[str, Any] = {}     # per process: the jinja template and per-site lookups


def render_block(job: dict, con, template) -> tuple[int, int, int]:
    """Write the pages and JSON of neurons ``lo..hi-1`` of one layer; returns (pages, page bytes, JSON bytes)."""
    layer, lo, hi = job["layer"], job["lo"], job["hi"]
    args = [layer, lo, hi]
    cur = con.execute(job["sql"]["neurons"], args)
    names = [d[0] for d in cur.description][:-1]
    neurons = [(dict(zip(names, r[:-1])), r[-1]) for r in cur.fetchall()]
    # Only the rows the HTML shows: the strongest `out` tokens, and one row of each other side
    # (that it has one: the page then has a placeholder for the reading sides), each with how
    # many its group has. Columns as numpy arrays and then lists: a third of the time of fetching
    # row tuples.
    cols = con.execute(f"""
            SELECT neuron, side, token, logit, count(*) OVER (PARTITION BY neuron, side, polarity) AS total
            FROM decoded_tokens WHERE layer = ? AND neuron >= ? AND neuron < ?
            QUALIFY polarity = 'top' AND rank < CASE side WHEN 'out' THEN {SHOWN_OUT[0]} ELSE 1 END
            ORDER BY neuron, side, rank""", args).fetchnumpy()
    decoded: dict[int, dict] = {}
    for n, side, token, logit, total in zip(*(cols[c].tolist() for c in ("neuron", "side", "token", "logit", "total"))):
        decoded.setdefault(n, {}).setdefault(side, {"top": [], "total": total})["top"].append((token, logit))
    if job["sql"]["token_index"]:
        con.execute(job["sql"]["token_index"], args)
    rows_json = {table: dict(con.execute(sql, args).fetchall()) for table, sql in job["sql"]["json"].items()}
    tokens_json = dict(con.execute(job["sql"]["tokens"]).fetchall()) if job["sql"]["tokens"] else {}

    corpus: dict[int, dict] = {}
    if job["has_corpus"]:
        if _worker.get("vocab_for") != job["site"]:     # one vocabulary per site being built
            _worker["vocab"], _worker["vocab_for"] = strip_vocab(con), job["site"]
        corpus = corpus_sections(con, layer, lo, hi, _worker["vocab"],
                                 {row["neuron"]: strip_scale(row["normaliser"], row.get("act_min")) for row, _ in neurons})
    clustering: dict[int, dict] = {}
    if job["has_clusters"]:
        clustering = cluster_sections(con, layer, lo, hi, job["site"])

    clamping: dict[int, dict] = {}
    if job.get("has_clamp"):
        clamping = clamp_sections(con, layer, lo, hi)

    describing = description_sections(con, layer, lo, hi) if job.get("has_descriptions") else {}

    sizes, site = job["layer_sizes"], job["page"]["site"]
    # The template reads attributes; jinja tries getattr before [], so dicts would cost an
    # AttributeError per lookup (~80 a page). Namespaces take the fast path.
    if _worker.get("globals_for") != job["site"]:
        _worker["globals"] = {"site": NS(**site), "root": job["page"]["root"]}
        _worker["globals_for"] = job["site"]
    page_globals = _worker["globals"]
    out_dir = os.path.join(job["site"], "neurons", str(layer))
    os.makedirs(out_dir, exist_ok=True)
    head = (f'{{"format":{FORMAT},"schema_version":{job["schema_version"]},"model":{job["model_json"]},'
            f'"{VOCAB}":"{VOCAB_URL}","layer":{layer},')
    page_bytes = json_bytes = 0
    for row, row_json in neurons:
        n = row["neuron"]
        by_side = decoded.get(n, {})
        # A clamped neuron's own `out` tokens carry their Δ log p in the `out` table itself.
        pushed = clamping[n]["own_by_rank"] if n in clamping else None
        out = side_section(by_side["out"], pushed) if "out" in by_side else None
        reads = any(side in by_side for side in SIDES if side != "out")
        url = job["site_url"] + f"neurons/{layer}/{n}/"
        html = template.render(
            page_globals, layer=layer, neuron=n, row=NS(**row), out=out, reads=reads, url=url,
            canonical=job["site_url"] and url,
            prev=_step(sizes, layer, n, -1), next=_step(sizes, layer, n, +1),
            prev_layer=_layer_step(sizes, layer, n, -1), next_layer=_layer_step(sizes, layer, n, +1),
            corpus_data=NS(**corpus[n]) if n in corpus else None,
            cluster_data=NS(**clustering[n]) if n in clustering else None, clamp_data=clamping.get(n),
            description_data=describing.get(n))
        parts = [head, f'"neuron":{n},"neurons":{row_json}']
        if job["sql"]["tokens"]:
            parts.append(f',"tokens":{tokens_json.get(n, "{}")}')
        for table, by_neuron in rows_json.items():
            parts.append(f',"{table}":{by_neuron.get(n, "{}")}')
        if job["has_clusters"] and n in clustering:
            parts.append(f',"clusters":[{clustering[n]["json"]}]')
        data = html_safe_json("".join(parts) + "}") + "\n"
        page_dir = os.path.join(out_dir, str(n))
        os.mkdir(page_dir)
        page_bytes += _write(os.path.join(page_dir, "index.html"), html)
        json_bytes += _write(os.path.join(out_dir, f"{n}.json"), data)
    return len(neurons), page_bytes, json_bytes


def _write(path: str, text: str) -> int:
    data = text.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _step(sizes: list[int], layer: int, neuron: int, step: int) -> str | None:
    """Relative link from neuron page ``layer/neuron`` to the next or previous neuron of the atlas."""
    n = neuron + step
    if 0 <= n < sizes[layer]:
        return f"../{n}/"
    other = layer + step
    while 0 <= other < len(sizes) and sizes[other] == 0:
        other += step
    if not 0 <= other < len(sizes):
        return None
    return f"../../{other}/{0 if step > 0 else sizes[other] - 1}/"


def _layer_step(sizes: list[int], layer: int, neuron: int, step: int) -> tuple[int, str] | None:
    """(layer, link) of the same neuron index in the next or previous non-empty layer."""
    other = layer + step
    while 0 <= other < len(sizes) and sizes[other] == 0:
        other += step
    if not 0 <= other < len(sizes):
        return None
    return other, f"../../{other}/{min(neuron, sizes[other] - 1)}/"
