"""The processes that write neuron pages: blocks of neurons handed out to a worker pool.

Each worker opens the store read-only once and renders one block (``neuron_pages.BLOCK``
neurons of one layer) at a time, so both the work and the memory stay even to the end.
A small site is rendered inline on the caller's connection instead.

Workers die with their parent, however it dies: a worker holds the store open, and an
orphan would keep every later ``atlas build`` out of it. On Linux the kernel sends each
worker ``SIGKILL`` when the parent ends (``PR_SET_PDEATHSIG``); elsewhere, and as a second
guard, a thread in each worker exits it once its parent's pid has changed. When the parent
stops on an exception (Ctrl-C, SIGTERM, a full disk), it terminates the workers before it
re-raises, instead of letting them finish the queued blocks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import active_children, get_context
from typing import Any

from tqdm.auto import tqdm

from atlas import faults
from atlas.site.neuron_pages import render_block
from atlas.site.templates import environment
from atlas.store import Store

_worker: dict[str, Any] = {}     # per process: the jinja template and, in workers, the store


PR_SET_PDEATHSIG = 1            # <linux/prctl.h>
WATCH_S = 0.5                   # how often a worker checks that its parent is alive


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends: at once on Linux, within ``WATCH_S`` elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass                # no prctl: the watchdog below still ends the process
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="atlas-parent-watch", daemon=True).start()


def _init_worker(store_path: str, memory_mb: int, parent: int) -> None:
    die_with_parent(parent)
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
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                   initargs=(str(store.path), max(256, memory_mb // 4), os.getpid()))
        try:
            for job, result in zip(jobs, pool.map(_render_block, jobs)):
                add(result)
                faults.point("render", f"layer {job['layer']} block {job['lo']}")
        except BaseException:
            stop_workers(pool)
            raise
        pool.shutdown()
    return counts


def stop_workers(pool: ProcessPoolExecutor, timeout: float = 5.0) -> None:
    """Cancel the queued blocks and terminate the running workers, waiting up to ``timeout`` seconds."""
    pool.shutdown(wait=False, cancel_futures=True)
    children = active_children()        # the pool's workers: the only processes render starts
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes (user + system)."""
    import resource

    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime
