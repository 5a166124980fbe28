"""Render stage: the store's rows as a static website, one page per MLP neuron.

The frame (home, layer and method pages) is a small mkdocs-material site built from
``mkdocs.yml`` (``frame``); neuron pages, of which there can be half a million, are
written directly with jinja2 from ``site_templates/`` by a pool of processes
(``neuron_pages``, ``workers``) and reuse the frame's stylesheets; cluster pages, the map
and search follow. Everything is built in a directory beside the target and swapped in at
the end, so a crash never leaves a half site, and the same store always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from atlas import __version__
from atlas import faults
from atlas.config import RenderConfig
from atlas.errors import AtlasError
from atlas.resources import MKDOCS_YML, ROOT, TEMPLATES
from atlas.site import clusters
from atlas.site.clamp_sections import has_clamp
from atlas.site.corpus_sections import has_corpus, histogram_edges_meta
from atlas.site.exports import STORE_FILE, write_exports
from atlas.site.frame import build_frame, page_site, site_url, theme_assets
from atlas.site.neuron_json import FORMAT as JSON_FORMAT, VOCAB_FILE, vocab_json
from atlas.site.neuron_pages import BIBTEX_SLOTS, bibtex, block_jobs, drawn_sides
from atlas.site.index_format import SCHEMA as INDEX_SCHEMA
from atlas.site.search_page import write_search_site
from atlas.site.templates import environment
from atlas.site.text import html_safe_json, to_json
from atlas.site.workers import cpu_seconds, run_jobs
from atlas.stages import STAGES
from atlas.stages.contract import stale_stages
from atlas.store import finished_stage, Store, without_timings

SITE_MARKER = "atlas-site.json"
EXPORTS_DIR = "exports"
PAGES_PER_WORKER = 2000     # fewest pages per worker process that repay its start-up


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


def exports_beside(site_dir: Path) -> Path:
    """Where the exports go by default: ``exports/`` beside the site (``DIR/exports`` for ``DIR/site``),
    so they are published as a release or a dataset and do not count against the host's size limit.

    A folder of that name that holds anything but an earlier export is refused, never replaced.
    """
    target = site_dir.with_name(EXPORTS_DIR)
    if target.exists() and any(target.iterdir()) and not (target / STORE_FILE).is_file():
        raise AtlasError(f"{target} exists and is not an atlas export; move it, or render with "
                         "--exports-inside or --no-exports")
    return target


def _swap(building: Path, old: Path, site_dir: Path) -> None:
    if site_dir.exists():
        site_dir.rename(old)
        faults.point("render", "old site moved aside")
    building.rename(site_dir)
    faults.point("render", "new site in place")
    shutil.rmtree(old, ignore_errors=True)


def _replace(new: Path, target: Path) -> None:
    """Put the freshly written exports at ``target``, moving an earlier export aside first."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _inputs_fingerprint(meta: dict, cfg: RenderConfig) -> str:
    """Everything a site is made from: the store's provenance and stage marks, settings, templates,
    and the formats of the neuron JSON and the search index (a change to either alone would
    otherwise leave a site in the old format marked up to date)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("workers", "memory_mb")}   # speed only
    # Hashed, not published: written as the standard library writes JSON, as it always was,
    # so that a site rendered before the site's JSON moved to orjson (which spells 1e-05 as
    # 0.00001) is still recognised as up to date.
    text = json.dumps({"meta": without_timings(meta), "config": settings, "version": __version__,
                       "formats": {"neuron_json": JSON_FORMAT, "search_index": INDEX_SCHEMA}},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    h = hashlib.sha256((html_safe_json(text) + "\n").encode())
    for path in sorted(p for p in TEMPLATES.rglob("*") if p.is_file()) + [MKDOCS_YML]:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def stage_marks(meta: dict) -> dict[str, str]:
    """The fingerprint of each finished stage in ``meta``: what a site records it was rendered from."""
    return {k[6:]: v.get("fingerprint") for k, v in sorted(meta.items())
            if k.startswith("stage.") and isinstance(v, dict) and v.get("status") == "done"}


def site_status(site_dir: Path, meta: dict) -> dict:
    """Whether the site in ``site_dir`` was rendered from the store's current stages, for ``atlas info``.

    Only the store's side is compared: render's own settings are not known here (``atlas render``
    compares everything and skips an up-to-date site)."""
    try:
        marker = json.loads((site_dir / SITE_MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"state": "not rendered"}
    except (OSError, ValueError):
        return {"state": "unreadable", "why": f"{SITE_MARKER} cannot be read"}
    rendered = marker.get("stages")
    if rendered is None:
        return {"state": "unknown", "why": "rendered by an atlas that did not record its stages"}
    now = stage_marks(meta)
    changed = sorted(n for n in set(now) | set(rendered) if now.get(n) != rendered.get(n))
    return {"state": "behind", "changed": changed} if changed else {"state": "current"}


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
        if finished_stage(store.con, "decode") is None:
            raise AtlasError(f"{store_path} has no finished decode stage; run `atlas decode` first")
        stale = stale_stages(store.con, STAGES)
        if stale:
            raise AtlasError(f"{store_path} has stale stages ({'; '.join(f'{n}: {why}' for n, why in stale.items())}); "
                             "run `atlas build` to bring them up to date")
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
        # Exports being written when an earlier render died (mkdocs empties the site dir it builds).
        exports = building.with_name(f".{site_dir.name}.exports")
        shutil.rmtree(exports, ignore_errors=True)
        shutil.rmtree(site_dir.with_name(f".{EXPORTS_DIR}.old"), ignore_errors=True)
        if not force and _up_to_date(site_dir, inputs):
            return {"skipped": True, "site_dir": str(site_dir)}
        model = meta["model"]
        # mkdocs does not escape site_name; a model id is a path-like name, so drop markup characters.
        site_name = "Neuron atlas: " + "".join(c for c in str(model["id"]) if c not in "<>&\"'")

        beside = exports_beside(site_dir) if cfg.exports and not cfg.exports_inside else None
        try:
            downloads = write_exports(store.con, store_path, exports) if cfg.exports else []
            for d in downloads:
                d["href"] = (cfg.exports_url.rstrip("/") + "/" + d["file"] if cfg.exports_url
                             else f"exports/{d['file']}" if cfg.exports_inside else None)
            exports_s = time.perf_counter() - start
            palette = build_frame(store, meta, layer_sizes, building, site_name, cfg, downloads)
            faults.point("render", "frame built")
            if cfg.exports and cfg.exports_inside:
                exports.rename(building / EXPORTS_DIR)
            frame_s = time.perf_counter() - start - exports_s
            page = {"site": page_site(meta, store, site_name, theme_assets(building), palette, cfg),
                    "root": "../../../"}
            has_clusters = clusters.has_clusters(store.con)
            # The token text every neuron's JSON points into (neuron_json's format 6).
            (building / VOCAB_FILE).write_text(to_json(vocab_json(store.con)), encoding="utf-8")
            jobs = block_jobs(store.con, str(building), layer_sizes, page, meta, site_url(cfg),
                              has_corpus(store.con), has_clusters, has_clamp(store.con))
            pages_start, cpu_start = time.perf_counter(), cpu_seconds()
            counts = run_jobs(jobs, store, cfg.workers, sum(layer_sizes), progress, cfg.memory_mb, PAGES_PER_WORKER)
            pages_s, pages_cpu_s = time.perf_counter() - pages_start, cpu_seconds() - cpu_start
            if has_clusters:
                clusters.write_cluster_site(store.con, environment(), building, page["site"], layer_sizes, TEMPLATES)
                faults.point("render", "cluster pages and map written")
            search = write_search_site(store.con, environment(), building, page["site"], sum(layer_sizes), TEMPLATES,
                                       cfg.search_postings, cfg.search_concepts, has_clusters)
            (building / SITE_MARKER).write_text(to_json({
                "inputs": inputs, "model": model["id"], "weights_hash": meta.get("weights_hash"), "created_at": meta["created_at"],
                "render_version": __version__, "neurons": sum(layer_sizes), "layers": len(layer_sizes),
                "stages": stage_marks(meta),          # what `atlas info` compares the store with
                # What every neuron page's script shares: the tables its reproduce snippet reads,
                # whether the store is inside the site, the decoded tables it draws, and the bins
                # of every neuron's histogram.
                "reproduce": {"tables": page["site"]["tables"], "exports": bool(page["site"]["exports"])},
                "sides": drawn_sides(),
                # Each page's BibTeX entry, its layer, neuron and URL left to the page's script
                # (the same text on 458,752 pages was 300 B of each).
                "bibtex": bibtex(page["site"], *BIBTEX_SLOTS),
                **({"histogram_edges": edges} if (edges := histogram_edges_meta(store.con)) else {})}),
                encoding="utf-8")
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            shutil.rmtree(exports, ignore_errors=True)
            raise
    # The exports first: a render killed between the two leaves the old site, which the next
    # render replaces; the other order would leave a new site beside old exports.
    if beside is not None:
        _replace(exports, beside)
    _swap(building, old, site_dir)
    n = sum(layer_sizes)
    return {"site_dir": str(site_dir), "neurons": n, "layers": len(layer_sizes),
            "seconds": round(time.perf_counter() - start, 3), "frame_seconds": round(frame_s, 3),
            "exports_seconds": round(exports_s, 3) if cfg.exports else None,
            "pages_seconds": round(pages_s, 3), "pages_per_s": round(n / pages_s, 1) if pages_s > 0 else None,
            "pages_cpu_seconds": round(pages_cpu_s, 3),
            "workers": counts["workers"], "avg_page_bytes": round(counts["page_bytes"] / max(1, n)),
            "avg_json_bytes": round(counts["json_bytes"] / max(1, n)), "search": search}
