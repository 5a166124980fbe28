"""The search page of a site: the concept index, pagefind's full-text index, the page itself.

Called from ``render``. Full-text search over labels and tokens uses pagefind (its binary
ships in the ``pagefind-bin`` wheel). Pagefind indexes small documents written from the
store, one per neuron with just its label and decoded tokens, rather than the neuron pages:
that is faster than parsing the pages, and keeps exemplar text and numbers out of the index.
Pagefind's page list grows by about 5 bytes per page and every query downloads it, so above
``pagefind_max_neurons`` the site has the concept search only (see the README's figures).
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from atlas import faults
from atlas.errors import AtlasError
from atlas.site.search import INDEX_DIR, SCHEMA, write_index
from atlas.site.text import script_json

PAGEFIND_DIR = "pagefind"
DOC_SIDES = ("out", "in", "gate")   # order of the tokens in a full-text document


def pagefind_binary() -> Path:
    try:
        from pagefind_bin import get_executable
    except ImportError:
        raise AtlasError("full-text search needs pagefind: pip install 'pagefind[bin]' "
                         "(or render with --pagefind-max-neurons 0 to leave it out)") from None
    try:
        return get_executable()
    except FileNotFoundError as e:
        raise AtlasError(f"the pagefind-bin package has no binary for this platform ({e})") from None


def write_documents(con, root: Path) -> int:
    """One tiny HTML document per neuron at ``root/neurons/<layer>/<neuron>/index.html``; returns the count.

    The title is the neuron's name and label; the body its label and decoded tokens, top
    before bottom, `out` first. Every string is escaped: token text comes from the tokenizer.
    """
    side_order = "CASE side " + " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(DOC_SIDES)) + " END"
    cur = con.execute(f"""
        SELECT n.layer, n.neuron, n.label, t.tokens FROM neurons n LEFT JOIN (
            SELECT layer, neuron, flatten(list(toks ORDER BY polarity = 'bottom', so)) AS tokens FROM (
                SELECT layer, neuron, polarity, {side_order} AS so, list(token ORDER BY rank) AS toks
                FROM decoded_tokens GROUP BY ALL) GROUP BY ALL) t USING (layer, neuron)
        ORDER BY n.layer, n.neuron""")
    count, made = 0, set()
    while rows := cur.fetchmany(8192):
        for layer, neuron, label, tokens in rows:
            if layer not in made:
                (root / "neurons" / str(layer)).mkdir(parents=True)
                made.add(layer)
            name = f"L{layer}/N{neuron}" + (f" · {' '.join(label.split())}" if label else "")
            words = " ".join(html.escape(" ".join(t.split())) for t in tokens or [] if t and t.strip())
            page = root / "neurons" / str(layer) / str(neuron)
            page.mkdir()
            (page / "index.html").write_text(
                f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(name)}</title>'
                f"</head><body><h1>{html.escape(name)}</h1><p>{words}</p></body></html>\n", encoding="utf-8")
            count += 1
    return count


def write_fulltext(con, site: Path) -> dict:
    """Run pagefind over the neurons' documents, writing its bundle to ``site/pagefind``."""
    binary = pagefind_binary()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atlas-pagefind-") as tmp:
        docs = write_documents(con, Path(tmp))
        docs_s = time.perf_counter() - start
        proc = subprocess.run([str(binary), "--site", tmp, "--output-path", str(site / PAGEFIND_DIR),
                               "--glob", "neurons/**/index.html", "--force-language", "en", "--silent"],
                              capture_output=True, text=True)
    faults.point("render", "pagefind finished")
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        raise AtlasError(f"pagefind could not index the site: {last}")
    # The UI bundles and playground are not used: the search page draws its own results.
    for extra in (site / PAGEFIND_DIR).glob("pagefind-*ui*"):
        extra.unlink()
    check_bundle(site / PAGEFIND_DIR, docs)
    size = sum(p.stat().st_size for p in (site / PAGEFIND_DIR).rglob("*") if p.is_file())
    return {"documents": docs, "bytes": size, "documents_seconds": round(docs_s, 3),
            "seconds": round(time.perf_counter() - start, 3)}


def check_bundle(bundle: Path, documents: int) -> None:
    """Refuse a pagefind bundle that is not whole, in one line.

    Pagefind exits 0 even when its writes fail: on a full disk it left its entry file, worker
    and wasm as 0-byte files, and the site that replaced the good one could not search. So
    what it wrote is checked: every file non-empty, the entry JSON whole and counting every
    document, and each language's metadata and wasm file present.
    """
    def broken(why: str) -> AtlasError:
        return AtlasError(f"pagefind wrote a broken search bundle ({why}); is the disk full? "
                          "the published site was left as it was")

    empty = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and not p.stat().st_size)
    if empty:
        raise broken(f"{len(empty)} empty files, e.g. {empty[0]}")
    for name in ("pagefind.js", "pagefind-worker.js", "pagefind-entry.json"):
        if not (bundle / name).is_file():
            raise broken(f"no {name}")
    try:
        languages = json.loads((bundle / "pagefind-entry.json").read_text(encoding="utf-8"))["languages"]
        pages = sum(int(lang["page_count"]) for lang in languages.values())
        needed = [f"pagefind.{lang['hash']}.pf_meta" for lang in languages.values()]
        needed += [f"wasm.{lang['wasm']}.pagefind" for lang in languages.values()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise broken(f"pagefind-entry.json does not parse: {type(e).__name__}") from None
    if pages != documents:
        raise broken(f"its entry counts {pages} of the {documents} documents")
    missing = [name for name in needed if not (bundle / name).is_file()]
    if missing:
        raise broken(f"no {missing[0]}")


def write_search_site(con, env, site: Path, page_site: dict, n_neurons: int, templates: Path,
                      postings: int, pagefind_max_neurons: int, concepts: bool = True) -> dict:
    """Write ``search/`` (page and concept index) and, for atlases small enough, ``pagefind/``."""
    info = {"concept": write_index(con, site / INDEX_DIR, postings, concepts)}
    fulltext = 0 < n_neurons <= pagefind_max_neurons
    if fulltext:
        info["fulltext"] = write_fulltext(con, site)
    for name in ("atlas-search.js", "atlas-search.css"):
        shutil.copyfile(templates / "assets" / name, site / "assets" / name)
    (site / "search" / "index.html").write_text(env.get_template("search.html").render(
        site=page_site, root="../", canonical=None, n_neurons=n_neurons, postings=postings, fulltext=fulltext,
        data_json=script_json({"schema": SCHEMA, "fulltext": fulltext})), encoding="utf-8")
    return info
