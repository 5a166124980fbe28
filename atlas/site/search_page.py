"""The search page of a site: the concept index and the page itself.

Called from ``render``. Full-text search with pagefind was removed with the site budgets:
it cost one file per neuron (46,627 files on the default atlas), and on real queries it
found little that concept search misses (the README has the measurement).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from atlas.site.index_format import INDEX_DIR, SCHEMA
from atlas.site.search import write_index
from atlas.site.text import script_json


def write_search_site(con, env, site: Path, page_site: dict, n_neurons: int, templates: Path,
                      postings: int, concepts: bool = True, clusters: bool = False) -> dict:
    """Write ``search/``: the page (with links to the clusters and the map where the atlas has
    them) and the concept index."""
    info = {"concept": write_index(con, site / INDEX_DIR, postings, concepts)}
    for name in ("atlas-text.js", "atlas-search.js", "atlas-search.css"):
        shutil.copyfile(templates / "assets" / name, site / "assets" / name)
    (site / "search" / "index.html").write_text(env.get_template("search.html").render(
        site=page_site, root="../", canonical=None, n_neurons=n_neurons, postings=postings, clusters=clusters,
        data_json=script_json({"schema": SCHEMA})), encoding="utf-8")
    return info
