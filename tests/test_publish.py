"""`atlas publish`: host limits named with what breaks them, a git push to a real bare repository
that a rerun repeats only for what changed, and the sync command for object storage."""

from __future__ import annotations

import os
import subprocess

import pytest

from atlas.bench.synthetic import make_synthetic_store
from atlas.config import RenderConfig
from atlas.publish.hosts import Host, problems, scan
from atlas.site.render import render
from helpers import atlas


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    store = make_synthetic_store(root / "atlas.duckdb", n_layers=2, d_mlp=40, vocab_size=256, top_k=5, bottom_k=3)
    render(store, root / "site", RenderConfig(workers=1, exports=False), progress=False)
    return root


def _git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_every_broken_limit_is_named_with_what_breaks_it(atlas_dir):
    stats = scan(atlas_dir / "site")
    assert stats["files"] == sum(1 for p in (atlas_dir / "site").rglob("*") if p.is_file())
    assert stats["fullest_folder"] == "neurons/0" and stats["fullest_entries"] == 80     # a page folder + JSON each
    assert not (atlas_dir / "site/assets/javascripts/lunr").exists()         # the theme's unused search
    tiny = Host("tiny", "git", max_bytes=1000, max_files=10, max_per_folder=60, max_file_bytes=stats["largest_bytes"] - 1)
    broken = problems(stats, tiny)
    assert f"{stats['bytes']:,} bytes in all, over tiny's 1,000" in broken
    assert f"{stats['files']:,} files, over tiny's 10" in broken
    assert "folder neurons/0/ holds 80 entries, over tiny's 60 per folder" in broken
    assert "folder neurons/1/ holds 80 entries, over tiny's 60 per folder" in broken
    assert f"file {stats['largest_file']} is {stats['largest_bytes']:,} bytes, over tiny's " \
           f"{stats['largest_bytes'] - 1:,} per file" in broken
    assert problems(stats, Host("roomy", "git", 10**9, 10**5, 10**4, 2**25)) == []


def test_a_site_over_a_limit_is_refused_before_anything_is_pushed(atlas_dir, tmp_path):
    ok = atlas("publish", atlas_dir, "--check", "huggingface")
    assert ok.returncode == 0 and "fits huggingface" in ok.stdout, ok.stderr
    big = atlas_dir / "site" / "big.bin"
    with open(big, "wb") as f:          # sparse: 26 MiB of size, no disk
        f.truncate(26 * 2**20)
    try:
        proc = atlas("publish", atlas_dir, "--check", "cloudflare-pages")
        assert proc.returncode == 2 and proc.stderr.startswith("error: the site breaks 1 limit(s) of cloudflare-pages")
        assert f"file big.bin is {26 * 2**20:,} bytes, over cloudflare-pages's {25 * 2**20:,} per file" in proc.stderr
        assert "Traceback" not in proc.stderr
        bare = tmp_path / "remote.git"
        _git("init", "--bare", "-q", str(bare))
        proc = atlas("publish", atlas_dir, "--to", "cloudflare-pages", "--remote", "proj")
        assert proc.returncode == 2 and "nothing was uploaded" in proc.stderr and proc.stdout == ""
    finally:
        big.unlink()
    bad = atlas("publish", atlas_dir, "--check", "geocities")
    assert bad.returncode == 2 and "unknown host 'geocities'" in bad.stderr
    assert atlas("publish", atlas_dir).returncode == 2
    assert atlas("publish", tmp_path / "nothing", "--check", "huggingface").returncode == 2


def test_push_to_a_bare_repository_and_rerun_pushes_only_what_changed(atlas_dir, tmp_path):
    bare = tmp_path / "remote.git"
    _git("init", "--bare", "-q", str(bare))
    objects = lambda: set(_git("rev-list", "--objects", "--all", cwd=bare).split("\n"))  # noqa: E731

    first = atlas("publish", atlas_dir, "--to", "github-pages", "--remote", bare, "--quiet")
    assert first.returncode == 0, first.stderr
    files = set(_git("ls-tree", "-r", "--name-only", "gh-pages", cwd=bare).split())
    site = atlas_dir / "site"
    assert files == {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()} | {".nojekyll"}
    page = "neurons/1/3/index.html"
    assert _git("show", f"gh-pages:{page}", cwd=bare) == (site / page).read_text()
    before = objects()

    again = atlas("publish", atlas_dir, "--to", "github-pages", "--remote", bare, "--quiet")
    assert again.returncode == 0 and '"pushed": false' in again.stdout, again.stdout
    assert objects() == before

    original = (site / page).read_bytes()
    try:
        (site / page).write_bytes(original.replace(b"</body>", b"<!-- changed --></body>"))
        third = atlas("publish", atlas_dir, "--to", "github-pages", "--remote", bare, "--quiet")
        assert third.returncode == 0 and '"changed": 1' in third.stdout, third.stdout + third.stderr
    finally:
        (site / page).write_bytes(original)
    # One commit, the four trees on the page's path and its one blob: nothing else was sent.
    assert len(objects() - before) == 6
    assert len(_git("rev-list", "gh-pages", cwd=bare).split()) == 2
    assert "<!-- changed -->" in _git("show", f"gh-pages:{page}", cwd=bare)


def test_object_storage_gets_the_exact_sync_command(atlas_dir):
    proc = atlas("publish", atlas_dir, "--to", "object-storage", "--remote", "s3://my-bucket/atlas")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"aws s3 sync {atlas_dir / 'site'} s3://my-bucket/atlas --delete --size-only"
    gcs = atlas("publish", atlas_dir, "--to", "object-storage", "--remote", "gs://b/p")
    assert gcs.stdout.startswith("gcloud storage rsync --recursive")
    assert os.path.isdir(atlas_dir / "site")


def test_a_space_gets_the_front_matter_that_makes_it_static(atlas_dir, tmp_path):
    bare = tmp_path / "space.git"
    _git("init", "--bare", "-q", str(bare))
    proc = atlas("publish", atlas_dir, "--to", "huggingface", "--remote", bare, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "sdk: static" in _git("show", "main:README.md", cwd=bare)
    assert _git("show", "main:index.html", cwd=bare) == (atlas_dir / "site/index.html").read_text()


def test_a_bad_exports_url_is_refused_in_one_line(atlas_dir):
    proc = atlas("render", atlas_dir, "--exports-url", "ftp://example.org/x/", "--quiet")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --exports-url 'ftp://example.org/x/' is not")
    assert len(proc.stderr.strip().splitlines()) == 1
