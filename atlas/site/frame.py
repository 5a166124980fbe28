"""The frame of a site: home, layer and method pages, built with mkdocs-material.

Pages come from the jinja-rendered markdown in ``site_templates/frame/``; the layers'
neuron tables are added after the build (see ``frame/layer.md``). Atlas's own pages
(neurons, clusters, map, search) are not mkdocs pages, but they share the frame's theme
through one stylesheet (``theme_assets``) and what ``page_site`` says about the atlas.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from markupsafe import Markup

from atlas import __version__
from atlas.config import RenderConfig
from atlas.errors import AtlasError
from atlas.resources import MKDOCS_YML, TEMPLATES
from atlas.site import clusters
from atlas.site.clamp_sections import summary as clamp_summary
from atlas.site.describe_sections import summary as describe_summary
from atlas.site.corpus_sections import has_corpus
from atlas.site.exports import human_bytes
from atlas.site.templates import environment
from atlas.store import Store

LAYER_TABLE_MARKER = "<!-- atlas:layer-table -->"
ASSETS = ("atlas.css", "atlas-text.js", "atlas-neuron.js", "atlas-theme.js")     # copied into every site's assets/
# ... except those written as the files they bundle, one after the other: a neuron page loads
# one script (atlas-text.js, which the search page loads alone too, then its own), not two
# (a script tag is 59 B on each of 46,080 pages).
BUNDLES = {"atlas-neuron.js": ("atlas-text.js", "atlas-neuron.js")}
PAGES_CSS = "atlas-pages.css"                  # written by theme_assets
URL_SAFE = "-._~:/[]@!$()*+,;=%"                # what check_site_url lets through, left as it is



def labels_summary(meta: dict) -> dict | None:
    """What the method page says about the neurons' labels: the labels stage's settings and counts
    (None where it has not run)."""
    record = meta.get("stage.labels") or {}
    if record.get("status") != "done":
        return None
    resource = record.get("resource") or {}
    return {"config": record.get("config", {}), "neurons": record.get("neurons"), "with_concept": record.get("with_concept"),
            "from_exemplars": record.get("concept_from_exemplars"), "vectors": resource.get("name"),
            "vectors_version": resource.get("version"), "missing": resource.get("missing")}

def site_url(cfg: RenderConfig) -> str:
    """The site's absolute URL with one trailing slash, or '' for a site of relative links.

    ``RenderConfig.validate`` refuses a URL with quotes, whitespace or markup; what reaches
    here is percent-encoded once more all the same, because mkdocs' templates write it into
    attributes (404.html's links, the canonical link, the sitemap) without escaping it.
    """
    if not cfg.site_url:
        return ""
    return quote(cfg.site_url.rstrip("/"), safe=URL_SAFE) + "/"


def short_hash(digest: str) -> str:
    """``sha256:`` and 16 hex digits (64 bits name an input well enough); the home page has it whole."""
    return digest if len(digest) <= 24 else digest[:23] + "\u2026"


def page_site(meta: dict, store: Store, site_name: str, stylesheets: list[str], palette: dict,
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
            # the tables a neuron page's reproduce snippet reads (atlas-neuron.js writes it, from atlas-site.json)
            "tables": ["neurons", "decoded_tokens", *(("exemplars", "attributions") if corpus else ())],
            "exports": cfg.exports and cfg.exports_inside, "site_url": site_url(cfg), "year": str(meta["created_at"])[:4]}


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


def build_frame(store: Store, meta: dict, layer_sizes: list[int], site: Path, site_name: str,
                cfg: RenderConfig, downloads: list[dict]) -> dict:
    """Build home, layer and method pages into ``site`` with mkdocs; returns the theme palette they use."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    env = environment()
    decode_cfg = meta["stage.decode"].get("config", {})
    with tempfile.TemporaryDirectory(prefix="atlas-docs-") as docs:
        docs = Path(docs)
        (docs / "layers").mkdir()
        (docs / "assets").mkdir()
        for name in ASSETS:
            parts = BUNDLES.get(name, (name,))
            (docs / "assets" / name).write_bytes(b"".join((TEMPLATES / "assets" / p).read_bytes() for p in parts))
        stages = sorted((k.split(".", 1)[1], v) for k, v in meta.items() if k.startswith("stage."))
        # No timings: the same inputs give the same pages (timings stay in the store).
        stages = [(name, {"status": v.get("status"), "fingerprint": v.get("fingerprint")}) for name, v in stages]
        (docs / "index.md").write_text(env.get_template("frame/index.md").render(
            model=meta["model"], n_neurons=sum(layer_sizes), layers=list(enumerate(layer_sizes)),
            hook_point=meta.get("hook_point", ""), weights_hash=meta.get("weights_hash", ""),
            tool_version=meta.get("tool_version", ""), render_version=__version__,
            schema_version=meta.get("schema_version"), created_at=meta["created_at"], stages=stages,
            clusters=clusters.summary(store.con), downloads=downloads, human_bytes=human_bytes,
            clamp=clamp_summary(store.con), corpus=meta.get("corpus") if has_corpus(store.con) else None),
            encoding="utf-8")
        (docs / "method.md").write_text(env.get_template("frame/method.md").render(
            hook_point=meta.get("hook_point", ""), top_k=decode_cfg.get("top_k", "k"),
            bottom_k=decode_cfg.get("bottom_k", "k"), clusters=clusters.summary(store.con),
            corpus=meta.get("corpus") if has_corpus(store.con) else None,
            clamp=clamp_summary(store.con), describe=describe_summary(store.con),
            labels=labels_summary(meta)), encoding="utf-8")
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
                                 site_dir=str(site), nav=nav, site_url=site_url(cfg) or None,
                                 site_description=_description(meta),
                                 extra_css=["assets/atlas.css"])
                mk.plugins.on_startup(command="build", dirty=False)
                try:
                    build(mk)
                finally:
                    mk.plugins.on_shutdown()
        finally:
            mk_logger.setLevel(level)
    # The theme ships lunr's search scripts (34 files, about 1 MB) even with its search plugin
    # off; no page loads them, and on a host that counts files they are pure cost.
    shutil.rmtree(site / "assets" / "javascripts" / "lunr", ignore_errors=True)
    # ... and source maps of its minified files (1.3 MB), which only a developer's tools fetch.
    for source_map in (site / "assets").rglob("*.map"):
        source_map.unlink()
    if not site_url(cfg):
        _portable_404(site / "404.html")
    table = env.get_template("partials/layer_table.html")
    for layer in range(len(layer_sizes)):
        page = site / "layers" / str(layer) / "index.html"
        html = page.read_text(encoding="utf-8")
        if html.count(LAYER_TABLE_MARKER) != 1:
            raise RuntimeError(f"layer page {page} lost its table marker")
        rows = layer_rows(store, layer, cfg.layer_preview)
        page.write_text(html.replace(LAYER_TABLE_MARKER, table.render(layer=layer, rows=rows)), encoding="utf-8")
    palette = mk.theme.get("palette") or {}
    palette = palette[0] if isinstance(palette, list) else palette
    palette = {k: str(palette.get(k, "default" if k == "scheme" else "indigo")).replace(" ", "-")
               for k in ("scheme", "primary", "accent")}
    theme_palette(site / "assets" / "atlas-theme.js", palette)
    return palette


_PALETTE = re.compile(r"var PALETTE = \{[^}]*\};")


def theme_palette(script: Path, palette: dict) -> None:
    """Write the site's palette into atlas-theme.js, which gives it to the <body> of atlas's own
    pages (the theme's stylesheets colour a page by its ``data-md-color-*`` attributes): one
    copy in the site rather than one on every page."""
    colours = json.dumps({"primary": palette["primary"], "accent": palette["accent"]})
    text, found = _PALETTE.subn(lambda _: f"var PALETTE = {colours};", script.read_text(encoding="utf-8"))
    if found != 1:
        raise RuntimeError(f"{script} has no one PALETTE line for the site's palette")
    script.write_text(text, encoding="utf-8")


# Finds the site's root at view time: the deepest folder of the missing page's path that holds
# atlas-site.json (one synchronous request per level, on a page nobody should see often), and
# makes it the page's <base>, so the links below (made relative) lead into the site.
_FIND_ROOT = (
    '<script>(function(){var p=location.pathname.replace(/[^/]*$/,"").split("/");'
    'for(var n=p.length-1;n>0;n--){var r=p.slice(0,n).join("/")+"/",x=new XMLHttpRequest();'
    'try{x.open("HEAD",r+"atlas-site.json",false);x.send();'
    'if(x.status===200){document.write(\'<base href="\'+r.replace(/["<>&]/g,encodeURIComponent)+\'">\');return}}'
    'catch(e){}}})()</script>')
_NOT_FOUND = ('<p>There is no page at this address. <a href=".">Home</a> · <a href="search/">Search neurons</a></p>'
              '<noscript><p>Without JavaScript these links work only when the atlas is served at the '
              "server's root; elsewhere, go up to the atlas's own folder.</p></noscript>")


def _portable_404(page: Path) -> None:
    """404.html without --site-url. A static host serves it for any missing path, at any depth,
    and mkdocs writes its links from the server's root ("/assets/..."), which is wrong for a
    site under a sub-path (a GitHub Pages project site): the links become relative to a
    <base> that ``_FIND_ROOT`` sets to the site's root, wherever that is."""
    html = page.read_text(encoding="utf-8")
    html = re.sub(r'\b(href|src)="/', r'\1="', html)
    html = html.replace('new URL("/",location)', 'new URL(".",document.baseURI)')
    html = html.replace('"base": "/"', '"base": "."')
    head = '<meta charset="utf-8">'
    if head not in html or "<h1>404 - Not found</h1>" not in html:
        raise RuntimeError(f"{page} is not the theme's 404 page that atlas knows how to rewrite")
    html = html.replace(head, head + _FIND_ROOT, 1).replace("<h1>404 - Not found</h1>",
                                                            "<h1>404 - Not found</h1>" + _NOT_FOUND, 1)
    page.write_text(html, encoding="utf-8")


def _description(meta: dict) -> str:
    """The frame pages' meta description; the model id keeps only characters that need no
    escaping, since mkdocs' templates write it into an attribute as it is."""
    model = re.sub(r"[^\w./@ -]", "", str(meta["model"].get("id", "")))
    return f"An atlas of every MLP neuron of {model}: decoded tokens, exemplars, clusters and search."


def layer_rows(store: Store, layer: int, preview: int) -> list[tuple[int, str | None, list[str]]]:
    """(neuron, label, top `out` tokens) for every neuron of a layer, in two bulk queries."""
    labels = store.con.execute("SELECT neuron, label FROM neurons WHERE layer = ? ORDER BY neuron",
                               [layer]).fetchall()
    tokens: dict[int, list[str]] = {}
    for n, tok in store.con.execute(
            "SELECT neuron, token FROM decoded_tokens WHERE layer = ? AND side = 'out' "
            "AND polarity = 'top' AND rank < ? ORDER BY neuron, rank", [layer, preview]).fetchall():
        tokens.setdefault(n, []).append(tok)
    return [(n, label, tokens.get(n, [])) for n, label in labels]


def theme_assets(site: Path) -> list[str]:
    """The one stylesheet that atlas's own pages link: the frame's theme stylesheets (their
    names carry a hash) and atlas.css, concatenated, so a page needs one link and the browser
    one request, not a chain of @imports that it can only follow one after another. The
    theme's sheets refer to nothing by URL but their source maps, which are left out."""
    parts = []
    for pattern in ("main.*.min.css", "palette.*.min.css"):
        matches = sorted((site / "assets" / "stylesheets").glob(pattern))
        if not matches:
            raise AtlasError(f"mkdocs-material produced no assets/stylesheets/{pattern}; is the theme installed?")
        parts.append(matches[0])
    parts.append(site / "assets" / "atlas.css")
    text = "".join(f"/* {path.relative_to(site / 'assets').as_posix()} */\n"
                   + re.sub(r'/\*# sourceMappingURL=[^*]*\*/|@charset "UTF-8";', "",
                            path.read_text(encoding="utf-8")).strip() + "\n"
                   for path in parts)
    (site / "assets" / PAGES_CSS).write_text(
        '@charset "UTF-8";\n/* atlas\'s own pages (neurons, clusters, map, search): the theme, then atlas.css. */\n'
        + text,
        encoding="utf-8")
    return [f"assets/{PAGES_CSS}"]
