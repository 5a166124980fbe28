"""`atlas bench render`: neuron pages per second on a synthetic store, against plain file writes.

The store has the shape asked for (default Llama-3.1-8B: 32 layers x 14,336 neurons) and
every section a GPU-built atlas has: decoded sides, corpus-pass rows, the clamp check of
every neuron and, unless turned off, a real cluster stage. The render runs in a fresh process, exactly as ``atlas render``
would, so its peak memory is its own. The bound is the cheapest way to put the same
bytes on disk: the same directories and files, written with plain ``open``/``write`` by
the same number of processes, block by block; only the writes are timed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from atlas.errors import AtlasError
from atlas.publish.hosts import scan


def parse_shape(shape: str) -> tuple[int, int]:
    try:
        layers, neurons = (int(x) for x in shape.lower().replace(",", "").split("x"))
    except ValueError:
        raise AtlasError(f"--shape {shape!r} is not LAYERSxNEURONS, e.g. 32x14336") from None
    if layers <= 0 or neurons <= 0:
        raise AtlasError(f"--shape {shape!r} needs at least one layer and one neuron")
    return layers, neurons


def _render_child(store: str, site: str, workers: int) -> None:
    """Runs in the child process: render, then print the stats and this process tree's peak memory."""
    import resource

    from atlas.config import RenderConfig
    from atlas.site.render import render

    stats = render(store, site, RenderConfig(workers=workers, exports=False), progress=False, force=True)
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats["peak_rss_worker_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(stats))


def _write_block(job: tuple[str, str, int, int, int]) -> tuple[float, float, int]:
    """Rewrite one block's pages and JSON from ``site`` under ``scratch`` with plain writes.

    Returns the wall and CPU seconds of the writes alone, and the bytes written.
    """
    site, scratch, layer, lo, hi = job
    src, dst = os.path.join(site, "neurons", str(layer)), os.path.join(scratch, f"{layer}-{lo}")
    files = []
    for n in range(lo, hi):
        with open(os.path.join(src, str(n), "index.html"), "rb") as f:
            page = f.read()
        with open(os.path.join(src, f"{n}.json"), "rb") as f:
            files.append((str(n), page, f.read()))
    os.makedirs(dst)
    start, cpu = time.perf_counter(), time.process_time()
    for n, page, data in files:
        os.mkdir(os.path.join(dst, n))
        with open(os.path.join(dst, n, "index.html"), "wb") as f:
            f.write(page)
        with open(os.path.join(dst, f"{n}.json"), "wb") as f:
            f.write(data)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(dst)          # keeps the bound's disk use to one block per process
    return seconds, cpu, sum(len(p) + len(d) for _, p, d in files)


def bench_render(shape: str = "32x14336", layers: int = 0, neurons: int = 0, store: str | Path | None = None,
                 workers: int = 0, clusters: bool = True, keep: str | Path | None = None) -> dict:
    """Render every neuron page of a synthetic store; time it against plain writes of the same bytes."""
    from atlas.site.neuron_pages import BLOCK
    from atlas.bench.synthetic import make_synthetic_store

    n_layers, d_mlp = parse_shape(shape)
    n_layers, d_mlp = layers or n_layers, neurons or d_mlp
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-render-"))
    try:
        store_path = Path(store) if store else work / "atlas.duckdb"
        store_s = None
        if not store_path.exists():
            start = time.perf_counter()
            # Every section a GPU build gives, the clamp check of every neuron and concept postings included.
            make_synthetic_store(store_path, n_layers, d_mlp, vocab_size=32768, corpus=True, clusters=clusters,
                                 clamp=True, concepts=27_000, progress=True)
            store_s = time.perf_counter() - start
        site = Path(keep) if keep else work / "site"
        proc = subprocess.run([sys.executable, "-c", "import sys; from atlas.bench.render import _render_child; "
                               "_render_child(*sys.argv[1:3], int(sys.argv[3]))", str(store_path), str(site), str(workers)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise AtlasError(f"render failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if (r["layers"], r["neurons"]) != (n_layers, n_layers * d_mlp):
            raise AtlasError(f"{store_path} holds {r['layers']} layers, {r['neurons']:,} neurons, not the "
                             f"{n_layers} x {d_mlp:,} asked for; pass another --store")

        scratch = work / "bound"
        scratch.mkdir()
        jobs = [(str(site), str(scratch), layer, lo, min(lo + BLOCK, d_mlp))
                for layer in range(n_layers) for lo in range(0, d_mlp, BLOCK)]
        bound_workers = r["workers"]
        if bound_workers <= 1:
            results = [_write_block(job) for job in jobs]
        else:
            with ProcessPoolExecutor(bound_workers, mp_context=get_context("spawn")) as pool:
                results = list(pool.map(_write_block, jobs))
        # Each process timed its own writes; with the same processes sharing the work, the
        # bound's wall time is their sum over the number of processes.
        # What the site holds, as a host counts it (exports are written beside it, not in it).
        site_stats = scan(site)
        bound_s = sum(r[0] for r in results) / bound_workers
        bound_cpu_s = sum(r[1] for r in results)
        total_bytes = sum(r[2] for r in results)
        load = os.getloadavg()[0]
    finally:
        # The scratch directory holds the bound's files and, unless --store named one, the
        # store; a kept site lives elsewhere (``keep``), so nothing here outlives the run.
        shutil.rmtree(work, ignore_errors=True)
    n = r["neurons"]
    return {
        "stage": "render", "shape": f"{n_layers} x {d_mlp}", "neurons": n, "workers": r["workers"],
        "cpus": os.cpu_count(), "store_s": store_s, "pages_s": r["pages_seconds"],
        "pages_per_s": n / r["pages_seconds"], "bound_s": bound_s, "bound_pages_per_s": n / bound_s,
        "ratio": r["pages_seconds"] / bound_s, "pages_cpu_s": r["pages_cpu_seconds"], "bound_cpu_s": bound_cpu_s,
        "cpu_ratio": r["pages_cpu_seconds"] / bound_cpu_s if bound_cpu_s > 0 else None,
        # What the same CPU work gives on idle cores, one per render process: a shared
        # machine's wall time says more about its other tenants than about the renderer.
        "pages_per_s_free_cores": n * r["workers"] / r["pages_cpu_seconds"], "load_average": load,
        "bytes": total_bytes, "avg_page_bytes": r["avg_page_bytes"],
        "avg_json_bytes": r["avg_json_bytes"], "peak_rss_mb": r["peak_rss_mb"],
        "peak_rss_worker_mb": r["peak_rss_worker_mb"], "clusters": clusters,
        "site_bytes": site_stats["bytes"], "site_files": site_stats["files"],
        "bytes_per_neuron": site_stats["bytes"] / n, "files_per_neuron": site_stats["files"] / n,
        "fullest_folder": site_stats["fullest_folder"], "fullest_entries": site_stats["fullest_entries"],
        "largest_file": site_stats["largest_file"], "largest_bytes": site_stats["largest_bytes"],
    }


def print_render_table(r: dict) -> None:
    rows = [
        ("store", f"synthetic {r['shape']} = {r['neurons']:,} neurons, with corpus sections, clamp checks"
                  + (" and clusters" if r["clusters"] else "")
                  + (f" (made in {r['store_s']:.0f} s)" if r["store_s"] is not None else " (reused)")),
        ("processes", f"{r['workers']} render workers on {r['cpus']} CPUs"),
        ("render", f"{r['pages_s']:.1f} s ({r['pages_per_s']:,.0f} pages/s, each page + its JSON)"),
        ("plain writes", f"{r['bound_s']:.1f} s ({r['bound_pages_per_s']:,.0f} pages/s, same bytes and files)"),
        ("ratio", f"{r['ratio']:.2f} (render time / plain-write time)"),
        ("CPU", f"{r['pages_cpu_s']:.1f} s rendering, {r['bound_cpu_s']:.1f} s writing (ratio {r['cpu_ratio']:.2f}); "
                f"{r['pages_per_s_free_cores']:,.0f} pages/s on {r['workers']} free cores"),
        ("machine", f"load average {r['load_average']:.1f} at the end (other work shares the CPUs)"),
        ("bytes", f"{r['bytes'] / 2**30:,.2f} GiB; page {r['avg_page_bytes']:,} B, JSON {r['avg_json_bytes']:,} B "
                  "on average (plus shared assets)"),
        ("site", f"{r['site_bytes'] / 1e9:,.2f} GB in {r['site_files']:,} files: {r['bytes_per_neuron'] / 1000:,.1f} KB "
                 f"and {r['files_per_neuron']:.3f} files per neuron, everything included"),
        ("largest folder", f"{r['fullest_folder']}/ ({r['fullest_entries']:,} entries)"),
        ("largest file", f"{r['largest_file']} ({r['largest_bytes'] / 2**20:,.2f} MiB)"),
        ("peak memory", f"{r['peak_rss_mb']:,.0f} MiB main process, {r['peak_rss_worker_mb']:,.0f} MiB largest worker"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
