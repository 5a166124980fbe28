"""A disk that fills while pagefind writes its bundle: the render fails in one line, the old site stays.

Pagefind exits 0 when its writes fail, so this is a real full disk, not a refused write of
atlas's own: the output directory is a small tmpfs (mounting one needs root; the test skips
where ``mount`` is refused), filled with a file until what is left holds the new site's
pages and a third of pagefind's bundle. The render is held still right after pagefind
(``ATLAS_FAULT=render:pagefind finished:stop``) while the test frees the disk again, so
every write of atlas's own after pagefind succeeds: only a check of what pagefind wrote
can stop the broken bundle from being published, as it was before that check.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlas.bench.synthetic import make_synthetic_store

pytestmark = pytest.mark.faults
RENDER = ["--no-exports", "--quiet"]
BLOCK = 4096


def atlas(*args, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "atlas", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def site_tree(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(site.rglob("*")) if p.is_file()}


def blocks(paths) -> int:
    """Bytes that files take on tmpfs: whole pages."""
    return sum(-(-p.stat().st_size // BLOCK) * BLOCK for p in paths if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_during_pagefind_keeps_the_published_site(small_disk):
    out = small_disk / "out"
    out.mkdir()
    make_synthetic_store(out / "atlas.duckdb", n_layers=1, d_mlp=256, vocab_size=512, top_k=5, bottom_k=3)
    first = atlas("render", out, *RENDER)
    assert first.returncode == 0, first.stderr
    site = out / "site"
    published = site_tree(site)
    bundle = site / "pagefind"
    assert (bundle / "pagefind-entry.json").is_file()
    pages = blocks(p for p in site.rglob("*") if bundle not in p.parents)
    pagefind = blocks(bundle.rglob("*"))

    # Leave room for the new site's pages and a third of pagefind's bundle, and nothing more.
    st = os.statvfs(small_disk)
    room = pages + pagefind // 3
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - room)

    proc = atlas("render", out, "--force", *RENDER, env={"ATLAS_FAULT": "render:pagefind finished:stop"},
                 wait=False)
    try:
        deadline = time.monotonic() + 300
        while not stopped(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stopped(proc.pid), f"the render never reached pagefind's end: {proc.communicate()}"
        filler.unlink()                 # room again for every write after pagefind
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:         # the render this test started, and nothing else
            proc.kill()
            proc.communicate()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("error: pagefind wrote a broken search bundle") and "Traceback" not in stderr, lines[0]
    assert site_tree(site) == published, "the published site changed"
    assert sorted(p.name for p in out.iterdir()) == [".atlas.lock", "atlas.duckdb", "site"]

    # With space, the same render publishes the same site.
    again = atlas("render", out, "--force", *RENDER)
    assert again.returncode == 0, again.stderr
    assert site_tree(site) == published
