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
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import jinja2
from markupsafe import Markup
from tqdm.auto import tqdm

from . import __version__
from .errors import AtlasError
from . import site_map
from .clamp import clamp_sections, has_clamp, summary as clamp_summary
from .render_corpus import corpus_sections, has_corpus, vocab_list
from .store import SIDE_STATS, SIDES, Store

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "site_templates"
MKDOCS_YML = ROOT / "mkdocs.yml"
BLOCK = 1024            # neurons fetched and rendered per query; bounds memory at any model size
SITE_MARKER = "atlas-site.json"
LAYER_TABLE_MARKER = "<!-- atlas:layer-table -->"
PAGES_PER_WORKER = 2000     # fewest pages per worker process that repay its start-up
SIDE_TITLES = {"in": "what the neuron reads: up projection row × pre-MLP norm gain",
               "gate": "what opens its gate: gate projection row × pre-MLP norm gain",
               "out": "what the neuron writes: down projection column"}


@dataclass
class RenderConfig:
    base_url: str = field(default="", metadata={
        "help": "absolute URL the site will be published at, e.g. https://example.org/atlas/ "
                "(adds canonical links and a sitemap); empty keeps every link relative only"})
    workers: int = field(default=0, metadata={
        "help": "processes writing neuron pages (0: one per CPU core; small sites use one)"})
    layer_preview: int = field(default=3, metadata={
        "help": "top `out` tokens listed per neuron on the layer pages"})


# -- how values look on a page ---------------------------------------------------------
_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}


@lru_cache(maxsize=1 << 17)
def show_token(token: str | None) -> str:
    """Token text with whitespace and invisible characters made visible.

    Escaping alone is not enough for token text: a bidi override (U+202E) would reverse
    the rest of the table row, and a leading space is the difference between two tokens.
    """
    if token is None:
        return "\u2205"
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"):
            out.append(f"\u27e8U+{ord(ch):04X}\u27e9")
        else:
            out.append(ch)
    return "".join(out) or "\u2205"


def show_label(label: str | None) -> str:
    return " ".join(label.split()) if label else ""


def fmt_logit(x: float | None) -> str:
    return "\u2013" if x is None else f"{x:.2f}"


def fmt_prob(x: float | None) -> str:
    if x is None:
        return "\u2013"
    return f"{x:.3f}" if x >= 1e-3 else f"{x:.1e}"


def fmt_stat(x: float | None) -> str:
    return "\u2013" if x is None else f"{x:.3g}"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(show_token=show_token, show_label=show_label, fmt_logit=fmt_logit,
                       fmt_prob=fmt_prob, fmt_stat=fmt_stat)
    return env


def _to_json(obj: Any) -> str:
    """Sorted, compact JSON that is also safe to inline in HTML (no raw ``<``, ``>``, ``&``)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text + "\n"


def _select(con, table: str) -> str:
    """A select list for ``table`` that gives FLOAT columns as their shortest decimal.

    DuckDB prints a float32 with the fewest digits that read back to the same float32, so
    the JSON says ``0.1`` rather than the float64 widening ``0.10000000149011612``;
    NaN and infinities, which JSON cannot carry, become null.
    """
    cols = []
    for name, dtype, *_ in con.execute(f"DESCRIBE {table}").fetchall():
        if dtype in ("FLOAT", "DOUBLE"):
            cols.append(f'CASE WHEN isfinite("{name}") THEN CAST(CAST("{name}" AS VARCHAR) AS DOUBLE) '
                        f'END AS "{name}"')
        else:
            cols.append(f'"{name}"')
    return ", ".join(cols)


# -- neuron pages ------------------------------------------------------------------------
_worker: dict[str, Any] = {}     # per process: the jinja template and, in workers, the store


def _init_worker(store_path: str) -> None:
    _worker["store"] = Store(store_path, read_only=True)    # closed when the worker exits


def _render_block(job: dict, con=None) -> int:
    """Write the pages and JSON of neurons ``lo..hi-1`` of one layer; runs in a worker or inline."""
    if "template" not in _worker:
        _worker["template"] = _env().get_template("neuron.html")
    template = _worker["template"]
    con = con or _worker["store"].con
    corpus = {}
    if job["has_corpus"]:
        # One vocabulary per site being built (inline renders of several stores share _worker).
        if _worker.get("vocab_for") != job["site"]:
            _worker["vocab"], _worker["vocab_for"] = vocab_list(con), job["site"]
        corpus = corpus_sections(con, job["layer"], job["lo"], job["hi"], _worker["vocab"])
    clustering = site_map.cluster_sections(con, job["layer"], job["lo"], job["hi"], job["site"]) \
        if job["has_clusters"] else {}
    layer, lo, hi = job["layer"], job["lo"], job["hi"]
    clamping = clamp_sections(con, layer, lo, hi) if job.get("has_clamp") else {}
    cur = con.execute(f"SELECT {job['neurons_sql']} FROM neurons WHERE layer = ? AND neuron >= ? "
                      "AND neuron < ? ORDER BY neuron", [layer, lo, hi])
    names = [d[0] for d in cur.description]
    neurons = [dict(zip(names, r)) for r in cur.fetchall()]
    cur = con.execute(f"SELECT {job['decoded_sql']} FROM decoded_tokens WHERE layer = ? "
                      "AND neuron >= ? AND neuron < ? ORDER BY neuron, side, polarity, rank", [layer, lo, hi])
    dnames = [d[0] for d in cur.description]
    decoded = cur.fetchall()
    i_neuron, i_side, i_pol, i_rank, i_tok, i_logit, i_prob = (
        dnames.index(c) for c in ("neuron", "side", "polarity", "rank", "token", "logit", "prob"))

    out_dir = os.path.join(job["site"], "neurons", str(layer))
    os.makedirs(out_dir, exist_ok=True)
    j = 0
    for row in neurons:
        n = row["neuron"]
        start = j
        while j < len(decoded) and decoded[j][i_neuron] == n:
            j += 1
        rows = decoded[start:j]
        by_side: dict[str, dict[str, list]] = {}
        for r in rows:
            by_side.setdefault(r[i_side], {"top": [], "bottom": []})[r[i_pol]].append(
                (r[i_rank], r[i_tok], r[i_logit], r[i_prob]))
        sides = [{"name": s, "title": SIDE_TITLES[s], "top": by_side[s]["top"], "bottom": by_side[s]["bottom"],
                  "stats": {stat: row.get(f"{s}_{stat}") for stat in SIDE_STATS}}
                 for s in SIDES if s in by_side]
        html = template.render(job["page"], layer=layer, neuron=n, row=row, sides=sides,
                               prev=_neighbour(job["layer_sizes"], layer, n, -1),
                               next=_neighbour(job["layer_sizes"], layer, n, +1),
                               canonical=job["base_url"] and f"{job['base_url']}neurons/{layer}/{n}/",
                               corpus_data=corpus.get(n), cluster_data=clustering.get(n),
                               clamp_data=clamping.get(n))
        data = {"schema_version": job["schema_version"], "model": job["page"]["site"]["model_id"],
                "neurons": row, "decoded_tokens": [dict(zip(dnames, r)) for r in rows]}
        if n in corpus:
            data.update(corpus[n]["rows"])
        if n in clustering:
            data.update(clustering[n]["rows"])
        if n in clamping:
            data.update(clamping[n]["rows"])
        page_dir = os.path.join(out_dir, str(n))
        os.mkdir(page_dir)
        _write(os.path.join(page_dir, "index.html"), html)
        _write(os.path.join(out_dir, f"{n}.json"), _to_json(data))
    return len(neurons)


def _write(path: str, text: str) -> None:
    with open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def _neighbour(sizes: list[int], layer: int, neuron: int, step: int) -> str | None:
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
                 cfg: RenderConfig) -> dict:
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
        shutil.copyfile(TEMPLATES / "assets" / "atlas.css", docs / "assets" / "atlas.css")
        stages = sorted((k.split(".", 1)[1], v) for k, v in meta.items() if k.startswith("stage."))
        stages = [(name, {"status": v.get("status"), "seconds": v.get("seconds"),
                          "fingerprint": v.get("fingerprint")}) for name, v in stages]
        (docs / "index.md").write_text(env.get_template("frame/index.md").render(
            model=meta["model"], n_neurons=sum(layer_sizes), layers=list(enumerate(layer_sizes)),
            hook_point=meta.get("hook_point", ""), weights_hash=meta.get("weights_hash", ""),
            tool_version=meta.get("tool_version", ""), render_version=__version__,
            schema_version=meta.get("schema_version"), created_at=meta["created_at"], stages=stages,
            clusters=site_map.summary(store.con), clamp=clamp_summary(store.con)),
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
                                 site_dir=str(site), nav=nav, site_url=cfg.base_url or None,
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
    """The stylesheets the frame's pages link, for neuron pages to link too (names carry a hash)."""
    found = []
    for pattern in ("main.*.min.css", "palette.*.min.css"):
        matches = sorted((site / "assets" / "stylesheets").glob(pattern))
        if not matches:
            raise AtlasError(f"mkdocs-material produced no assets/stylesheets/{pattern}; is the theme installed?")
        found.append(matches[0].relative_to(site).as_posix())
    return found + ["assets/atlas.css"]


def _run_jobs(jobs: list[dict], store: Store, workers: int, total: int, progress: bool) -> None:
    """Render blocks inline on ``store``, or in worker processes when there is work for several."""
    # A worker costs about a second of imports, the time of ~1,000 pages: only start as many
    # as the site has work for.
    workers = min(workers or os.cpu_count() or 1, len(jobs), max(1, total // PAGES_PER_WORKER))
    with tqdm(total=total, desc="render", unit="page", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                bar.update(_render_block(job, store.con))
            return
        # spawn, not fork: the parent holds an open DuckDB connection and its threads.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(store.path),)) as pool:
            for done in pool.map(_render_block, jobs):
                bar.update(done)


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
    building.rename(site_dir)
    shutil.rmtree(old, ignore_errors=True)


def _inputs_fingerprint(meta: dict, cfg: RenderConfig) -> str:
    """Everything a site is made from: the store's provenance and stage marks, settings, templates."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "workers"}   # workers change speed only
    h = hashlib.sha256(_to_json({"meta": meta, "config": settings, "version": __version__}).encode())
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
                         "install atlas from its source checkout with `pip install -e .`")
    with Store(store_path, read_only=True) as store:
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
        if not force and _up_to_date(site_dir, inputs):
            return {"skipped": True, "site_dir": str(site_dir)}
        model = meta["model"]
        # mkdocs does not escape site_name; a model id is a path-like name, so drop markup characters.
        site_name = "Neuron atlas: " + "".join(c for c in str(model["id"]) if c not in "<>&\"'")

        site_dir.parent.mkdir(parents=True, exist_ok=True)
        building, old = _prepare(site_dir)
        try:
            palette = _build_frame(store, meta, layer_sizes, building, site_name, cfg)
            frame_s = time.perf_counter() - start
            base_url = cfg.base_url.rstrip("/") + "/" if cfg.base_url else ""
            page = {"site": {"name": site_name, "model_id": model["id"], "hook_point": meta.get("hook_point", ""),
                             "stylesheets": _theme_assets(building), "palette": palette},
                    "root": "../../../"}
            common = {"site": str(building), "layer_sizes": layer_sizes, "base_url": base_url, "page": page,
                      "schema_version": meta.get("schema_version"), "neurons_sql": _select(store.con, "neurons"),
                      "decoded_sql": _select(store.con, "decoded_tokens"), "has_corpus": has_corpus(store.con),
                      "has_clusters": site_map.has_clusters(store.con), "has_clamp": has_clamp(store.con)}
            jobs = [dict(common, layer=layer, lo=lo, hi=min(lo + BLOCK, size))
                    for layer, size in enumerate(layer_sizes) for lo in range(0, size, BLOCK)]
            pages_start = time.perf_counter()
            _run_jobs(jobs, store, cfg.workers, sum(layer_sizes), progress)
            pages_s = time.perf_counter() - pages_start
            if common["has_clusters"]:
                site_map.write_cluster_site(store.con, _env(), building, page["site"], layer_sizes, TEMPLATES)
            (building / SITE_MARKER).write_text(_to_json({
                "inputs": inputs, "model": model["id"], "weights_hash": meta.get("weights_hash"), "created_at": meta["created_at"],
                "render_version": __version__, "neurons": sum(layer_sizes), "layers": len(layer_sizes)}),
                encoding="utf-8")
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    _swap(building, old, site_dir)
    n = sum(layer_sizes)
    return {"site_dir": str(site_dir), "neurons": n, "layers": len(layer_sizes),
            "seconds": round(time.perf_counter() - start, 3), "frame_seconds": round(frame_s, 3),
            "pages_per_s": round(n / pages_s, 1) if pages_s > 0 else None}
