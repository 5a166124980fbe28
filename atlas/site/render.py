"""Render stage: the store's rows as a static website, one page per MLP neuron.

The frame (home, layer and method pages) is a small mkdocs-material site built from
``mkdocs.yml``; neuron pages, of which there can be half a million, are written directly
with jinja2 from ``site_templates/`` and reuse the frame's stylesheets. Everything is built
in a directory beside the target and swapped in at the end, so a crash never leaves a
half site, and the same store always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import jinja2
from markupsafe import Markup
from tqdm.auto import tqdm

from atlas import __version__
from atlas import faults
from atlas.errors import AtlasError
from atlas.resources import MKDOCS_YML, ROOT, TEMPLATES
from atlas.site import clusters as site_map
from atlas.site.exports import human_bytes, write_exports
from atlas.site.corpus_sections import has_corpus
from atlas.schema import JSON_TABLES
from atlas.site.neuron_pages import BLOCK, json_sql, neurons_sql, render_block
from atlas.site.text import delta_list, fmt_logit, fmt_prob, fmt_stat, html_safe_json, md_safe, show_label, show_token, to_json
from atlas.store import Store, without_timings
from atlas.site.clamp_sections import has_clamp, summary as clamp_summary
from atlas.config import RenderConfig  # noqa: F401 (re-exported)


SITE_MARKER = "atlas-site.json"
LAYER_TABLE_MARKER = "<!-- atlas:layer-table -->"
PAGES_PER_WORKER = 2000     # fewest pages per worker process that repay its start-up
ASSETS = ("atlas.css", "atlas-neuron.js")     # copied into every site's assets/
PAGES_CSS = "atlas-pages.css"                  # written by _theme_assets


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(show_token=show_token, show_label=show_label, md_safe=md_safe, fmt_logit=fmt_logit,
                       fmt_prob=fmt_prob, fmt_stat=fmt_stat, delta_list=delta_list)
    return env


# -- neuron pages ------------------------------------------------------------------------
_worker: dict[str, Any] = {}     # per process: the jinja template and, in workers, the store


def _init_worker(store_path: str, memory_mb: int) -> None:
    _worker["store"] = Store(store_path, read_only=True, memory_mb=memory_mb)    # closed when the worker exits
    # One worker per core already: DuckDB threads of its own would only contend with them.
    _worker["store"].con.execute("SET threads = 1")


def _render_block(job: dict, con=None) -> tuple[int, int, int]:
    """One block of neuron pages (see render_page.render_block), in a worker or inline."""
    if "template" not in _worker:
        _worker["template"] = _env().get_template("neuron.html")
    return render_block(job, con or _worker["store"].con, _worker["template"])


def _page_site(meta: dict, store: Store, site_name: str, stylesheets: list[str], palette: dict,
               cfg: RenderConfig) -> dict:
    """What every neuron page shows about the atlas as a whole: provenance, citation data."""
    corpus = meta.get("corpus") if has_corpus(store.con) else None
    if corpus:
        corpus_line = f"{corpus.get('source', '?')}, {corpus.get('tokens', 0):,} tokens seen, {short_hash(corpus.get('hash', ''))}"
    else:
        corpus_line = "none yet (no corpus pass)"
    exemplar_cfg = (meta.get("stage.exemplars") or {}).get("config", {})
    return {"name": site_name, "model_id": meta["model"]["id"], "hook_point": meta.get("hook_point", ""),
            "stylesheets": stylesheets, "palette": palette, "weights_hash": meta.get("weights_hash", ""),
            "weights_short": short_hash(meta.get("weights_hash", "")),
            "tool_version": meta.get("tool_version", ""), "schema_version": meta.get("schema_version"),
            "corpus": corpus_line, "exemplars_k": exemplar_cfg.get("k", 0) if corpus else 0,
            # the tables the reproduce snippet reads, as a Python tuple (fixed names, no escaping needed)
            "tables": Markup("(" + ", ".join(f'"{t}"' for t in ("neurons", "decoded_tokens")
                                             + (("exemplars", "attributions") if corpus else ())) + ")"),
            "exports": cfg.exports, "site_url": _site_url(cfg), "year": str(meta["created_at"])[:4]}


def short_hash(digest: str) -> str:
    """``sha256:`` and 16 hex digits (64 bits name an input well enough); the home page has it whole."""
    return digest if len(digest) <= 24 else digest[:23] + "\u2026"


def _site_url(cfg: RenderConfig) -> str:
    return cfg.site_url.rstrip("/") + "/" if cfg.site_url else ""


# -- the mkdocs frame --------------------------------------------------------------------
@contextmanager
def _source_date_epoch(created_at: str) -> Iterator[None]:
    """Pin mkdocs' build date (sitemap, gzip header) to the store's created_at."""
    stamp = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = str(int(stamp.timestamp()))
    try:
        yield
    finally:
        if old is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old


def _build_frame(store: Store, meta: dict, layer_sizes: list[int], site: Path, site_name: str,
                 cfg: RenderConfig, downloads: list[dict]) -> dict:
    """Build home, layer and method pages with mkdocs; returns the theme palette they use.

    Pages come from the jinja-rendered markdown in ``site_templates/frame/``; the layers'
    neuron tables are added after the build (see ``frame/layer.md``).
    """
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    env = _env()
    decode_cfg = meta["stage.decode"].get("config", {})
    with tempfile.TemporaryDirectory(prefix="atlas-docs-") as docs:
        docs = Path(docs)
        (docs / "layers").mkdir()
        (docs / "assets").mkdir()
        for name in ASSETS:
            shutil.copyfile(TEMPLATES / "assets" / name, docs / "assets" / name)
        stages = sorted((k.split(".", 1)[1], v) for k, v in meta.items() if k.startswith("stage."))
        # No timings: the same inputs give the same pages (timings stay in the store).
        stages = [(name, {"status": v.get("status"), "fingerprint": v.get("fingerprint")}) for name, v in stages]
        (docs / "index.md").write_text(env.get_template("frame/index.md").render(
            model=meta["model"], n_neurons=sum(layer_sizes), layers=list(enumerate(layer_sizes)),
            hook_point=meta.get("hook_point", ""), weights_hash=meta.get("weights_hash", ""),
            tool_version=meta.get("tool_version", ""), render_version=__version__,
            schema_version=meta.get("schema_version"), created_at=meta["created_at"], stages=stages,
            clusters=site_map.summary(store.con), downloads=downloads, human_bytes=human_bytes,
            clamp=clamp_summary(store.con)),
            encoding="utf-8")
        (docs / "method.md").write_text(env.get_template("frame/method.md").render(
            hook_point=meta.get("hook_point", ""), top_k=decode_cfg.get("top_k", "k"),
            bottom_k=decode_cfg.get("bottom_k", "k"), clusters=site_map.summary(store.con),
            corpus=meta.get("corpus") if has_corpus(store.con) else None,
            clamp=clamp_summary(store.con)), encoding="utf-8")
        layer_md = env.get_template("frame/layer.md")
        for layer, size in enumerate(layer_sizes):
            (docs / "layers" / f"{layer}.md").write_text(layer_md.render(
                layer=layer, n_neurons=size, preview=cfg.layer_preview, marker=Markup(LAYER_TABLE_MARKER)),
                encoding="utf-8")

        nav = [{"Home": "index.md"},
               {"Layers": [{f"Layer {layer}": f"layers/{layer}.md"} for layer in range(len(layer_sizes))]},
               {"Method": "method.md"}]
        mk_logger = logging.getLogger("mkdocs")
        level = mk_logger.level
        mk_logger.setLevel(logging.WARNING)     # mkdocs narrates every step at INFO
        try:
            with _source_date_epoch(meta["created_at"]):
                mk = load_config(config_file=str(MKDOCS_YML), site_name=site_name, docs_dir=str(docs),
                                 site_dir=str(site), nav=nav, site_url=cfg.site_url or None,
                                 extra_css=["assets/atlas.css"])
                mk.plugins.on_startup(command="build", dirty=False)
                try:
                    build(mk)
                finally:
                    mk.plugins.on_shutdown()
        finally:
            mk_logger.setLevel(level)
    table = env.get_template("partials/layer_table.html")
    for layer in range(len(layer_sizes)):
        page = site / "layers" / str(layer) / "index.html"
        html = page.read_text(encoding="utf-8")
        if html.count(LAYER_TABLE_MARKER) != 1:
            raise RuntimeError(f"layer page {page} lost its table marker")
        rows = _layer_rows(store, layer, cfg.layer_preview)
        page.write_text(html.replace(LAYER_TABLE_MARKER, table.render(layer=layer, rows=rows)), encoding="utf-8")
    palette = mk.theme.get("palette") or {}
    palette = palette[0] if isinstance(palette, list) else palette
    return {k: str(palette.get(k, "default" if k == "scheme" else "indigo")).replace(" ", "-")
            for k in ("scheme", "primary", "accent")}


def _layer_rows(store: Store, layer: int, preview: int) -> list[tuple[int, str | None, list[str]]]:
    """(neuron, label, top `out` tokens) for every neuron of a layer, in two bulk queries."""
    labels = store.con.execute("SELECT neuron, label FROM neurons WHERE layer = ? ORDER BY neuron",
                               [layer]).fetchall()
    tokens: dict[int, list[str]] = {}
    for n, tok in store.con.execute(
            "SELECT neuron, token FROM decoded_tokens WHERE layer = ? AND side = 'out' "
            "AND polarity = 'top' AND rank < ? ORDER BY neuron, rank", [layer, preview]).fetchall():
        tokens.setdefault(n, []).append(tok)
    return [(n, label, tokens.get(n, [])) for n, label in labels]


def _theme_assets(site: Path) -> list[str]:
    """The one stylesheet that atlas's own pages link: it imports the frame's theme
    stylesheets (their names carry a hash) and atlas.css, so each page needs one link, not
    three, and the browser has them cached from the frame's pages."""
    imports = []
    for pattern in ("main.*.min.css", "palette.*.min.css"):
        matches = sorted((site / "assets" / "stylesheets").glob(pattern))
        if not matches:
            raise AtlasError(f"mkdocs-material produced no assets/stylesheets/{pattern}; is the theme installed?")
        imports.append(matches[0].relative_to(site / "assets").as_posix())
    (site / "assets" / PAGES_CSS).write_text(
        "/* atlas's own pages (neurons, clusters, map, search): the theme, then atlas.css. */\n"
        + "".join(f'@import url("{path}");\n' for path in imports + ["atlas.css"]), encoding="utf-8")
    return [f"assets/{PAGES_CSS}"]


def _run_jobs(jobs: list[dict], store: Store, workers: int, total: int, progress: bool, memory_mb: int) -> dict:
    """Render blocks inline on ``store``, or in worker processes when there is work for several.

    Returns the pages written and their bytes (pages, JSON), and how many processes wrote them.
    """
    # A worker costs a fraction of a second of imports and a vocabulary lookup, the time of
    # a few hundred pages: only start as many as the site has work for.
    workers = min(workers or os.cpu_count() or 1, len(jobs), max(1, total // PAGES_PER_WORKER))
    counts = {"pages": 0, "page_bytes": 0, "json_bytes": 0, "workers": workers}

    def add(result: tuple[int, int, int]) -> None:
        for key, value in zip(("pages", "page_bytes", "json_bytes"), result):
            counts[key] += value
        bar.update(result[0])

    with tqdm(total=total, desc="render", unit="page", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                add(_render_block(job, store.con))
                faults.point("render", f"layer {job['layer']} block {job['lo']}")
            return counts
        # spawn, not fork: the parent holds an open DuckDB connection and its threads. Jobs
        # are blocks of up to BLOCK neurons, handed out one at a time, so both workers stay
        # busy to the end and each holds one block's rows at a time.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(store.path), max(256, memory_mb // 4))) as pool:
            for job, result in zip(jobs, pool.map(_render_block, jobs)):
                add(result)
                faults.point("render", f"layer {job['layer']} block {job['lo']}")
    return counts


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes (user + system)."""
    import resource

    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


# -- putting it together -----------------------------------------------------------------
def _prepare(site_dir: Path) -> tuple[Path, Path]:
    """Paths for the new and the displaced site, after cleaning up an earlier crash."""
    building = site_dir.with_name(f".{site_dir.name}.building")
    old = site_dir.with_name(f".{site_dir.name}.old")
    if building.exists():
        shutil.rmtree(building)
    if old.exists():
        if site_dir.exists():
            shutil.rmtree(old)
        else:       # crashed between the two renames: the old site is the one to keep
            old.rename(site_dir)
    if site_dir.exists() and not (site_dir / SITE_MARKER).is_file() and any(site_dir.iterdir()):
        raise AtlasError(f"{site_dir} exists and is not an atlas site; pick an empty or new directory")
    return building, old


def _swap(building: Path, old: Path, site_dir: Path) -> None:
    if site_dir.exists():
        site_dir.rename(old)
        faults.point("render", "old site moved aside")
    building.rename(site_dir)
    faults.point("render", "new site in place")
    shutil.rmtree(old, ignore_errors=True)


def _inputs_fingerprint(meta: dict, cfg: RenderConfig) -> str:
    """Everything a site is made from: the store's provenance and stage marks, settings, templates."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "memory_mb")}   # speed only
    # Hashed, not published: written as the standard library writes JSON, as it always was,
    # so that a site rendered before the site's JSON moved to orjson (which spells 1e-05 as
    # 0.00001) is still recognised as up to date.
    text = json.dumps({"meta": without_timings(meta), "config": settings, "version": __version__},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    h = hashlib.sha256((html_safe_json(text) + "\n").encode())
    for path in sorted(p for p in TEMPLATES.rglob("*") if p.is_file()) + [MKDOCS_YML]:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _up_to_date(site_dir: Path, inputs: str) -> bool:
    try:
        return json.loads((site_dir / SITE_MARKER).read_text(encoding="utf-8")).get("inputs") == inputs
    except (OSError, ValueError):
        return False


def render(store_path: str | Path, site_dir: str | Path, cfg: RenderConfig = RenderConfig(),
           progress: bool = True, force: bool = False) -> dict:
    """Render the site for the store at ``store_path`` into ``site_dir``; returns counts and timings.

    A site whose recorded inputs match the store and settings is left as it is unless ``force``.
    """
    start = time.perf_counter()
    store_path, site_dir = Path(store_path).resolve(), Path(site_dir).resolve()
    if not (TEMPLATES / "neuron.html").is_file() or not MKDOCS_YML.is_file():
        raise AtlasError(f"site templates not found beside the atlas package ({TEMPLATES}); "
                         "install atlas from its source checkout (`pip install .` or `pip install -e .`)")
    cfg.validate()
    with Store(store_path, read_only=True, memory_mb=cfg.memory_mb) as store:
        meta = store.all_meta()
        if (meta.get("stage.decode") or {}).get("status") != "done":
            raise AtlasError(f"{store_path} has no finished decode stage; run `atlas decode` first")
        missing = [k for k in ("model", "created_at") if k not in meta]
        if missing:
            raise AtlasError(f"{store_path} lacks atlas_meta {', '.join(missing)}; rebuild it with `atlas build`")
        sizes = dict(store.con.execute("SELECT layer, count(*) FROM neurons GROUP BY layer").fetchall())
        bad = store.con.execute("SELECT layer FROM neurons GROUP BY layer "
                                "HAVING min(neuron) <> 0 OR max(neuron) <> count(*) - 1").fetchall()
        if bad:
            raise AtlasError(f"neurons of layer {bad[0][0]} in {store_path} are not numbered 0..n-1")
        layer_sizes = [sizes.get(layer, 0) for layer in range(max(sizes, default=-1) + 1)]
        inputs = _inputs_fingerprint(meta, cfg)
        # Repair an interrupted swap first: the site it moved aside may be the current one.
        site_dir.parent.mkdir(parents=True, exist_ok=True)
        building, old = _prepare(site_dir)
        if not force and _up_to_date(site_dir, inputs):
            return {"skipped": True, "site_dir": str(site_dir)}
        model = meta["model"]
        # mkdocs does not escape site_name; a model id is a path-like name, so drop markup characters.
        site_name = "Neuron atlas: " + "".join(c for c in str(model["id"]) if c not in "<>&\"'")

        exports = building.with_name(f".{site_dir.name}.exports")     # mkdocs empties the site dir it builds
        shutil.rmtree(exports, ignore_errors=True)
        try:
            downloads = write_exports(store.con, store_path, exports) if cfg.exports else []
            exports_s = time.perf_counter() - start
            palette = _build_frame(store, meta, layer_sizes, building, site_name, cfg, downloads)
            faults.point("render", "frame built")
            if cfg.exports:
                exports.rename(building / "exports")
            frame_s = time.perf_counter() - start - exports_s
            site_url = _site_url(cfg)
            page = {"site": _page_site(meta, store, site_name, _theme_assets(building), palette, cfg),
                    "root": "../../../"}
            has_corpus_ = has_corpus(store.con)
            has_clusters = site_map.has_clusters(store.con)
            has_clamp_ = has_clamp(store.con)
            tables = [t for t in JSON_TABLES if t == "decoded_tokens" or (t == "neighbours" and has_clusters)
                      or (t in ("exemplars", "attributions", "histograms") and has_corpus_)
                      or (t == "clamp_effects" and has_clamp_)]
            common = {"site": str(building), "layer_sizes": layer_sizes, "site_url": site_url, "page": page,
                      "schema_version": meta.get("schema_version"), "model_json": to_json(model["id"]).rstrip("\n"),
                      "sql": {"neurons": neurons_sql(store.con),
                              "json": {t: json_sql(store.con, t, JSON_TABLES[t]) for t in tables}},
                      "has_corpus": has_corpus_, "has_clusters": has_clusters, "has_clamp": has_clamp_}
            jobs = [dict(common, layer=layer, lo=lo, hi=min(lo + BLOCK, size))
                    for layer, size in enumerate(layer_sizes) for lo in range(0, size, BLOCK)]
            pages_start, cpu_start = time.perf_counter(), _cpu_seconds()
            counts = _run_jobs(jobs, store, cfg.workers, sum(layer_sizes), progress, cfg.memory_mb)
            pages_s, pages_cpu_s = time.perf_counter() - pages_start, _cpu_seconds() - cpu_start
            if has_clusters:
                site_map.write_cluster_site(store.con, _env(), building, page["site"], layer_sizes, TEMPLATES)
                faults.point("render", "cluster pages and map written")
            from atlas.site.search_page import write_search_site
            search = write_search_site(store.con, _env(), building, page["site"], sum(layer_sizes), TEMPLATES,
                                       cfg.search_postings, cfg.pagefind_max_neurons)
            (building / SITE_MARKER).write_text(to_json({
                "inputs": inputs, "model": model["id"], "weights_hash": meta.get("weights_hash"), "created_at": meta["created_at"],
                "render_version": __version__, "neurons": sum(layer_sizes), "layers": len(layer_sizes)}),
                encoding="utf-8")
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            shutil.rmtree(exports, ignore_errors=True)
            raise
    _swap(building, old, site_dir)
    n = sum(layer_sizes)
    return {"site_dir": str(site_dir), "neurons": n, "layers": len(layer_sizes),
            "seconds": round(time.perf_counter() - start, 3), "frame_seconds": round(frame_s, 3),
            "exports_seconds": round(exports_s, 3) if cfg.exports else None,
            "pages_seconds": round(pages_s, 3), "pages_per_s": round(n / pages_s, 1) if pages_s > 0 else None,
            "pages_cpu_seconds": round(pages_cpu_s, 3),
            "workers": counts["workers"], "avg_page_bytes": round(counts["page_bytes"] / max(1, n)),
            "avg_json_bytes": round(counts["json_bytes"] / max(1, n)), "search": search}
