"""Search at scale, measured: index build time and the bytes one query downloads.

    python -m atlas.bench.search STORE OUT [--browser]

Writes the search part of a site (page and concept index) for the store into OUT without rendering neuron pages, so a
458,752-neuron synthetic store can be measured in minutes. Bytes per query are counted
from the files a query fetches (index meta plus one shard per word, and the whole phrase's for
several words); with ``--browser``
headless Chromium loads ``search/?q=...`` in a fresh context per query and every response
body is counted.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import random
import statistics
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from atlas.resources import concepts
from atlas.site.index_format import INDEX_DIR, META_NAME, query_terms, shard_name, shard_of
from atlas.store import Store

EVERYDAY = tuple(concepts("everyday")) + ("the", "and")      # and two words that every atlas has


def query_files(idx: Path, meta: dict, query: str) -> list[Path]:
    """The index files one query fetches: the meta, and the shards of its words and, for several
    words, of the whole phrase, as the page fetches them (atlas-search.js; its label files aside)."""
    terms = query_terms(query)
    terms += [" ".join(terms)] if len(terms) > 1 else []
    return [idx / META_NAME] + [idx / shard_name(b, meta["shards"])
                                for b in sorted({shard_of(t, meta["shards"]) for t in terms})]


def query_bytes(idx: Path, meta: dict, query: str) -> tuple[int, int]:
    """(raw, gzip) bytes of the index files one query fetches (``query_files``)."""
    raw = [f.read_bytes() for f in query_files(idx, meta, query)]
    return sum(map(len, raw)), sum(len(gzip.compress(r, 6)) for r in raw)


def sample_queries(con, n: int, seed: int = 0) -> list[str]:
    """The everyday words, then ``n`` single tokens of the vocabulary drawn at random."""
    tokens = [t for (t,) in con.execute("SELECT token FROM vocab ORDER BY token_id").fetchall()]
    rng = random.Random(seed)
    return list(EVERYDAY) + [t for t in rng.sample(tokens, min(n, len(tokens))) if query_terms(t)]


def browser_bytes(site: Path, queries: list[str], chromium: str = "/usr/bin/chromium") -> list[dict]:
    """Per query: bytes of every response the search page received, cold cache, and hits shown."""
    from playwright.sync_api import sync_playwright

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/search/"
    out = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            for q in queries:
                context = browser.new_context()
                page = context.new_page()
                sizes: dict[str, int] = {}
                page.on("requestfinished", lambda r: sizes.__setitem__(r.url, r.sizes()["responseBodySize"]))
                page.goto(base + "?q=" + q)
                page.wait_for_selector("#atlas-search-status[data-state=done]", timeout=120_000)
                page.wait_for_load_state("networkidle")
                concept = sum(v for k, v in sizes.items() if "/search/" in k)
                out.append({"query": q, "bytes": sum(sizes.values()), "concept_bytes": concept,
                            "requests": len(sizes), "hits": int(page.get_attribute("#atlas-search-results",
                                                                                   "data-hits") or 0)})
                context.close()
            browser.close()
    finally:
        server.shutdown()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("out", type=Path, help="directory to write the search part of a site into")
    ap.add_argument("--postings", type=int, default=100)
    ap.add_argument("--queries", type=int, default=1000, help="random vocabulary tokens queried")
    ap.add_argument("--browser", action="store_true", help="also measure in headless Chromium")
    args = ap.parse_args(argv)

    from atlas.config import RenderConfig
    from atlas.resources import TEMPLATES
    from atlas.site.templates import environment
    from atlas.site.search_page import write_search_site

    (args.out / "assets").mkdir(parents=True, exist_ok=True)
    (args.out / "search").mkdir(exist_ok=True)
    page_site = {"name": "search bench", "model_id": "", "hook_point": "", "stylesheets": [],
                 "palette": {"scheme": "default", "primary": "indigo", "accent": "indigo"}}
    # DuckDB held to the memory a render gives it, so the figures are those of a real render.
    with Store(args.store, read_only=True, memory_mb=RenderConfig().memory_mb) as store:
        n = store.count("neurons")
        start = time.perf_counter()
        info = write_search_site(store.con, environment(), args.out, page_site, n, TEMPLATES, args.postings)
        info["seconds"] = round(time.perf_counter() - start, 1)
        queries = sample_queries(store.con, args.queries)
    idx = args.out / INDEX_DIR
    meta = json.loads((idx / META_NAME).read_text())
    sizes = [query_bytes(idx, meta, q) for q in queries]
    raw, gz = [s[0] for s in sizes], [s[1] for s in sizes]
    result = {"neurons": n, "build": info, "queries": len(queries),
              "query_bytes": {"max": max(raw), "median": statistics.median(raw),
                              "gzip_max": max(gz), "gzip_median": statistics.median(gz)},
              "everyday": {q: s[0] for q, s in zip(queries, sizes) if q in EVERYDAY}}
    if args.browser:
        result["browser"] = browser_bytes(args.out, list(EVERYDAY))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import sys

    from atlas.errors import AtlasError
    try:
        main()
    except AtlasError as e:
        sys.exit(f"error: {e}")
