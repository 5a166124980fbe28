"""Kills of a render that has page workers: no worker may outlive its parent, and a rerun finishes.

A synthetic store of 4,096 neurons (two layers of 2,048) renders with 2 spawn workers
(``PAGES_PER_WORKER`` is 2,000). The parent is killed with SIGKILL and with SIGTERM, at a
render fault point (``ATLAS_FAULT=render:3``, after the second block of pages) and at a
random moment after its workers started. Then no process the parent started may be alive
a few seconds later, the store must open for writing (an orphan holding it would refuse
that), SIGTERM must end with one line and exit code 143, and a rerun must give the clean
render's site, file for file.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from atlas.bench.synthetic import make_synthetic_store
from atlas.site.render import PAGES_PER_WORKER
from helpers import FAULT_COUNTS

pytestmark = [pytest.mark.faults, pytest.mark.slow]
SEED = int(os.environ.get("ATLAS_FAULT_SEED", "0"))
RENDER = ["--workers", "2", "--no-exports", "--quiet"]
SURVIVAL_S = 5.0            # the longest any process may outlive the killed parent

# (signal, moment): a fault point's name in ATLAS_FAULT, or "random" after the workers started.
# The names are what the fault summary counts as kill points.
KILLS = [("SIGKILL", "render:3"), ("SIGTERM", "render:3:term"), ("SIGKILL", "random"), ("SIGTERM", "random")]


def atlas(*args, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "atlas", *map(str, args)]
    full_env = dict(os.environ, **(env or {}))
    if not wait:     # its own session: the test can end everything it started, and nothing else
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, None for one that is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[1]))


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (its page workers and multiprocessing's resource tracker)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st and st[1] == pid:
                kids.append(int(entry.name))
    return kids


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the atlas parent started it): whatever it left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(int(entry.name)):
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def site_tree(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(site.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("render-kill")
    out = root / "clean"
    out.mkdir()
    # Two layers of 2,048: enough pages for two workers, four blocks of 1,024 to kill between.
    make_synthetic_store(out / "atlas.duckdb", n_layers=2, d_mlp=2048, vocab_size=512, top_k=5, bottom_k=3)
    assert 4096 // PAGES_PER_WORKER >= 2, "the store must be big enough for two page workers"
    proc = atlas("render", out, *RENDER)
    assert proc.returncode == 0, proc.stderr
    assert '"workers": 2' in proc.stdout, proc.stdout
    return {"root": root, "store": out / "atlas.duckdb", "site": site_tree(out / "site")}


@pytest.mark.parametrize("sig,moment", KILLS, ids=[f"{s}-{m}" for s, m in KILLS])
def test_a_killed_multi_worker_render_leaves_no_process_and_reruns(clean, sig, moment, tmp_path):
    FAULT_COUNTS["kill points"].add(("render with 2 workers", sig, moment))
    out = tmp_path / "out"
    out.mkdir()
    (out / "atlas.duckdb").write_bytes(clean["store"].read_bytes())
    fault = {} if moment == "random" else {"ATLAS_FAULT": moment}
    proc = atlas("render", out, "--force", *RENDER, env=fault, wait=False)
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            workers = [p for p in children(proc.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()] if _stat(proc.pid) else []
            time.sleep(0.02)
        assert len(workers) >= 2, f"the render never started two workers: {proc.communicate()}"
        if moment == "random":
            time.sleep(random.Random(f"{SEED}-{sig}").uniform(0.0, 0.4))
            assert any(_stat(w) for w in workers), "the workers had finished before the kill"
            os.kill(proc.pid, getattr(signal, sig))
        # wait, not communicate: an orphan holding the pipes would keep communicate from returning.
        proc.wait(timeout=60)
        died = time.monotonic()
        while time.monotonic() - died < SURVIVAL_S and session_members(proc.pid):
            time.sleep(0.05)
        left = session_members(proc.pid)
        assert not left, f"processes outlived the parent by {SURVIVAL_S} s: {left} (workers: {workers})"
        stderr = proc.stderr.read()
        assert proc.returncode == (-signal.SIGKILL if sig == "SIGKILL" else 143), stderr
        if sig == "SIGTERM":
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM)"), stderr
    finally:
        if session_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)      # the session this test started, only
        proc.stdout.close()
        proc.stderr.close()
    # Nothing holds the store: it opens for writing, which any orphan's read lock would refuse.
    duckdb.connect(str(out / "atlas.duckdb")).close()
    rerun = atlas("render", out, *RENDER)
    assert rerun.returncode == 0, rerun.stderr
    assert site_tree(out / "site") == clean["site"]
    assert not any(p.name.startswith(".site.") for p in out.iterdir()), sorted(out.iterdir())
