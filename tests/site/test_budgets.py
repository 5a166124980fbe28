"""Site budgets: two files per neuron, a bounded number of shared files, no folder or file
over the hosts' limits; the default atlas passes `atlas publish --check` for GitHub Pages and
a Hugging Face Space."""

from __future__ import annotations

import pytest

from atlas.bench.synthetic import make_synthetic_store
from atlas.config import RenderConfig
from atlas.publish.hosts import HOSTS, MiB, problems, scan
from atlas.site.render import render
from helpers import atlas

SHARED_FILES = 7_800          # files besides the neurons' that a 46,080-neuron atlas may have (issue 16)
# Bytes a neuron may take, page and JSON, on the synthetic store with every section (its tokens are
# longer than real ones). Issue 16's thin page: page 9,159 -> 7,300 B on average, then 7,360 -> 5,969 B
# once the reading sides, neighbours and reproduce section were drawn from the JSON and the layout
# lost its palette attributes and two wrappers (default atlas: 7,065 -> 5,630 B); the JSON is
# 7,414 B. The targets, 12 KB at the 8B shape and ~10.4 KB on the default atlas (README,
# "Where it stands"), are not met yet: these keep what was reached.
PAGE_BYTES, NEURON_BYTES = 6_100, 15_000
MAX_PER_FOLDER = 10_000
MAX_FILE = 25 * MiB


def _neuron_files(site) -> int:
    return sum(1 for p in (site / "neurons").rglob("*") if p.is_file())


def test_a_site_with_every_section_keeps_to_the_file_budgets(tmp_path):
    store = make_synthetic_store(tmp_path / "atlas.duckdb", 2, 64, vocab_size=512, clusters=True, corpus=True,
                                 clamp=True)
    render(store, tmp_path / "site", RenderConfig(workers=1), progress=False)
    site, n = tmp_path / "site", 2 * 64
    stats = scan(site)
    assert _neuron_files(site) == 2 * n                       # a page and its JSON, nothing else
    assert stats["files"] - 2 * n <= 200                      # shared: frame, assets, search shards, clusters, map
    assert stats["fullest_entries"] <= MAX_PER_FOLDER and stats["largest_bytes"] <= MAX_FILE
    assert not (site / "exports").exists() and (tmp_path / "exports/atlas.duckdb").is_file()
    assert not (site / "pagefind").exists()
    pages = [p.stat().st_size for p in site.glob("neurons/*/*/index.html")]
    data = [p.stat().st_size for p in site.glob("neurons/*/*.json")]
    assert len(pages) == len(data) == n
    assert sum(pages) / n < PAGE_BYTES and (sum(pages) + sum(data)) / n < NEURON_BYTES, (sum(pages) / n, sum(data) / n)


@pytest.mark.slow
def test_the_default_atlas_fits_github_pages_and_a_space(default_atlas):
    site = default_atlas / "site"
    stats = scan(site)
    n = 46_080
    assert _neuron_files(site) == 2 * n
    assert stats["files"] <= 100_000 and stats["files"] - 2 * n <= SHARED_FILES, stats["files"]
    assert stats["fullest_entries"] <= MAX_PER_FOLDER, stats["fullest_folder"]
    assert stats["largest_bytes"] <= MAX_FILE, stats["largest_file"]
    for host in ("github-pages", "huggingface"):
        assert problems(stats, HOSTS[host]) == []
        proc = atlas("publish", default_atlas, "--check", host)
        assert proc.returncode == 0 and f"fits {host}" in proc.stdout, proc.stderr
    assert (default_atlas / "exports/atlas.duckdb").is_file() and not (site / "exports").exists()
