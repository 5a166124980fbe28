"""The processes that write neuron pages: blocks of neurons handed out to a worker pool.

Each worker opens the store read-only once and renders one block (``neuron_pages.BLOCK``
neurons of one layer) at a time, so both the work and the memory stay even to the end.
A small site is rendered inline on the caller's connection instead.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from tqdm.auto import tqdm

from atlas import faults
from atlas.site.neuron_pages import render_block
from atlas.site.templates import environment
from atlas.store import Store

_worker: dict[str, Any] = {}     # per process: the jinja template and, in workers, the store


def _init_worker(store_path: str, memory_mb: int) -> None:
    _worker["store"] = Store(store_path, read_only=True, memory_mb=memory_mb)    # closed when the worker exits
    # One worker per core already: DuckDB threads of its own would only contend with them.
    _worker["store"].con.execute("SET threads = 1")


def _render_block(job: dict, con=None) -> tuple[int, int, int]:
    """One block of neuron pages (see ``neuron_pages.render_block``), in a worker or inline."""
    if "template" not in _worker:
        _worker["template"] = environment().get_template("neuron.html")
    return render_block(job, con or _worker["store"].con, _worker["template"])


def run_jobs(jobs: list[dict], store: Store, workers: int, total: int, progress: bool, memory_mb: int,
             pages_per_worker: int) -> dict:
    """Render blocks inline on ``store``, or in worker processes when there is work for several.

    ``workers`` is the most processes to use (0: one per core); a process is started per
    ``pages_per_worker`` pages at most. Returns the pages written and their bytes (pages,
    JSON), and how many processes wrote them.
    """
    # A worker costs a fraction of a second of imports and a vocabulary lookup, the time of
    # a few hundred pages: only start as many as the site has work for.
    workers = min(workers or os.cpu_count() or 1, len(jobs), max(1, total // pages_per_worker))
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


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes (user + system)."""
    import resource

    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
