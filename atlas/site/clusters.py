"""The cluster stage on the site: a section on each neuron page, a page per cluster, the map.

Called from ``render``; a store without a finished cluster stage renders without them.
The map is one jinja page plus one small JSON file of points per layer, drawn by
``assets/atlas-scatter.js``, a WebGL point renderer of a few hundred lines written for it (it
replaced plotly.js, whose parse time kept the page's Lighthouse score under 80; README, "Clusters
and the map").
"""

from __future__ import annotations

import shutil
from pathlib import Path

from atlas.site.neuron_json import compact
from atlas.site.text import script_json, to_json, visible
from atlas.store import finished_stage

MAP_TOKENS = 3          # top `out` tokens listed per member on cluster pages
_cache: dict = {}       # per process: cluster labels of the store being rendered


def has_clusters(con) -> bool:
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "neighbours" not in tables:
        return False
    return finished_stage(con, "cluster") is not None


def _clusters(con, key: str) -> dict[int, tuple[str, str]]:
    """Per cluster: its label as shown, and its row as JSON (floats as the neurons row's, ``neuron_json.compact``)."""
    if _cache.get("key") != key:
        floats = ", ".join(f"{compact(name, 'FLOAT')} AS {name}" for name in ("x", "y", "cohesion"))
        _cache["clusters"] = {c: (visible(label), row) for c, label, row in con.execute(f"""
            SELECT cluster_id, label, to_json(t) FROM (SELECT cluster_id, size, label, {floats} FROM clusters) t""").fetchall()}
        _cache["key"] = key
    return _cache["clusters"]


def cluster_sections(con, layer: int, lo: int, hi: int, key: str) -> dict[int, dict]:
    """For neurons ``lo..hi-1`` of ``layer``: their cluster (label, and row as JSON) and whether
    they have neighbours (the page's section for them, which atlas-neuron.js fills from the
    neuron's JSON, with their labels from the search index's label files)."""
    clusters = _clusters(con, key)
    sections = {n: {"cluster": c, "cluster_label": clusters.get(c, ("", ""))[0], "neighbours": False,
                    "json": clusters.get(c, ("", "null"))[1]}
                for n, c in con.execute("SELECT neuron, cluster_id FROM neurons WHERE layer = ? AND neuron >= ? "
                                        "AND neuron < ? AND cluster_id IS NOT NULL", [layer, lo, hi]).fetchall()}
    for (n,) in con.execute("SELECT DISTINCT neuron FROM neighbours WHERE layer = ? AND neuron >= ? AND neuron < ?",
                            [layer, lo, hi]).fetchall():
        if n in sections:
            sections[n]["neighbours"] = True
    return sections


def summary(con) -> dict | None:
    """What the home and method pages say about the clusters, or None without a cluster stage."""
    if not has_clusters(con):
        return None
    status = finished_stage(con, "cluster")
    stats = status.get("stats", {})
    named = dict(con.execute("SELECT coalesce(named_by, 'tokens'), count(*) FROM clusters GROUP BY 1").fetchall())
    return {"n_clusters": con.execute("SELECT count(*) FROM clusters").fetchone()[0],
            "grouped_by": grouped_by(status), "named": named,
            "within": _shown(stats.get("within_cosine")), "across": _shown(stats.get("across_cosine")),
            "search": stats.get("neighbour_search", {}), "config": status.get("config", {}),
            "exemplar_labels": bool(status.get("exemplar_labels"))}


def _shown(cosine: float | None) -> float | None:
    """A mean cosine as the method page prints it (4 places): a tiny negative one is 0, not "-0.0000"."""
    return None if cosine is None else round(cosine, 4) + 0.0


def grouped_by(record: dict) -> str:
    """What k-means grouped by ('terms' or 'out'), from the cluster stage's settings; stores
    clustered before --cluster-on existed grouped by `out` cosine."""
    return (record.get("config") or {}).get("cluster_on", "out")


def write_cluster_site(con, env, site: Path, page_site: dict, layer_sizes: list[int], templates: Path) -> dict:
    """Write ``clusters/``, ``clusters/<id>/`` and ``map/`` into ``site``; returns counts."""
    for name in ("atlas-scatter.js", "atlas-map.js", "atlas-map.css"):
        shutil.copyfile(templates / "assets" / name, site / "assets" / name)
    clusters = con.execute("SELECT cluster_id, size, label, x, y, cohesion, named_by FROM clusters "
                           "ORDER BY cluster_id").fetchall()
    grouped = grouped_by(finished_stage(con, "cluster") or {})
    labels = [visible(c[2]) for c in clusters]

    # One page per cluster, members streamed in cluster order so memory stays flat.
    page = env.get_template("cluster.html")
    cur = con.execute(f"""
        SELECT n.cluster_id, n.layer, n.neuron, n.label, t.tokens FROM neurons n LEFT JOIN (
            SELECT layer, neuron, list(token ORDER BY rank) AS tokens FROM decoded_tokens
            WHERE side = 'out' AND polarity = 'top' AND rank < {MAP_TOKENS} GROUP BY ALL) t USING (layer, neuron)
        WHERE n.cluster_id IS NOT NULL ORDER BY n.cluster_id, n.layer, n.neuron""")
    members: list = []
    current = None

    def flush():
        if current is None:
            return
        cid, size, _, _, _, cohesion, named_by = clusters[current]
        out = site / "clusters" / str(cid)
        out.mkdir(parents=True)
        (out / "index.html").write_text(page.render(
            site=page_site, root="../../", cluster=cid, label=labels[current], size=size, cohesion=cohesion,
            named_by=named_by, grouped_by=grouped,
            members=[(layer, n, visible(label), tokens or []) for layer, n, label, tokens in members],
            canonical=None), encoding="utf-8")

    while rows := cur.fetchmany(4096):
        for cid, layer, n, label, tokens in rows:
            if cid != current:
                flush()
                current, members = cid, []
            members.append((layer, n, label, tokens))
    flush()
    (site / "clusters" / "index.html").write_text(env.get_template("clusters.html").render(
        site=page_site, root="../", canonical=None, grouped_by=grouped,
        clusters=[(c[0], labels[i], c[1], c[5]) for i, c in enumerate(clusters)]), encoding="utf-8")

    # The map: a page, and per layer parallel arrays (x, y, cluster id, neuron label).
    points = site / "map" / "points"
    points.mkdir(parents=True)
    for layer, size in enumerate(layer_sizes):
        rows = con.execute("SELECT x, y, cluster_id, label FROM neurons WHERE layer = ? ORDER BY neuron",
                           [layer]).fetchall()
        data = {"x": [round(r[0], 3) if r[0] is not None else None for r in rows],
                "y": [round(r[1], 3) if r[1] is not None else None for r in rows],
                "cluster": [r[2] for r in rows], "label": [visible(r[3]) for r in rows]}
        (points / f"{layer}.json").write_text(to_json(data), encoding="utf-8")
    # How each cluster was named (the labels stage: "c" a concept, "k" a kind of token, "" its
    # tokens): the plot names named clusters first.
    named = [{"concept": "c", "token kind": "k"}.get(c[6], "") for c in clusters]
    data = {"layers": layer_sizes, "clusters": {"label": labels, "size": [c[1] for c in clusters], "named": named}}
    (site / "map" / "index.html").write_text(env.get_template("map.html").render(
        site=page_site, root="../", canonical=None, n_neurons=sum(layer_sizes), n_clusters=len(clusters),
        grouped_by=grouped,
        n_layers=len(layer_sizes), data_json=script_json(data)), encoding="utf-8")
    return {"clusters": len(clusters)}

