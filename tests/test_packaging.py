"""An installed wheel, not only a checkout, renders a site: the templates travel inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # pyproject.toml's build-system asks for setuptools>=77; without build isolation it must be here.
    setuptools = pytest.importorskip("setuptools", reason="building a wheel needs setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"building a wheel needs setuptools>=77 (found {setuptools.__version__})")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files to build from are unknown")
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the tracked files, so the build leaves nothing behind in the checkout.
    src = out / "src"
    files = listed.stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    # First a build with a template that is then removed: the build/ it leaves must not carry
    # that template into the next wheel.
    stale = src / "site_templates" / "stale.html"
    stale.write_text("removed since", encoding="utf-8")
    build_wheel(src, out / "first")
    stale.unlink()
    return build_wheel(src, out / "dist")


def build_wheel(src: Path, dist: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(src)], check=True, capture_output=True)
    (whl,) = dist.glob("atlas_neurons-*.whl")
    return whl


def test_the_wheel_carries_every_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.relative_to(REPO).as_posix() for p in (REPO / "site_templates").rglob("*") if p.is_file()}
    assert templates and {f"atlas/_bundled/{t}" for t in templates} == {n for n in names if "/site_templates/" in n}
    assert "atlas/_bundled/mkdocs.yml" in names and "atlas/_bundled/data/probe_prompts.txt" in names


def test_an_installed_wheel_renders_a_site(wheel, tmp_path):
    target = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(target)
    script = """
import sys
import atlas.site.render as r
from atlas.config import RenderConfig
from atlas.site.render import render
from atlas.bench.synthetic import make_synthetic_store
assert r.__file__.startswith(sys.argv[1]), r.__file__          # the installed copy, not the checkout
assert r.TEMPLATES.is_relative_to(sys.argv[1]), r.TEMPLATES
store = make_synthetic_store("atlas.duckdb", 2, 16, vocab_size=256, corpus=True, clamp=True)
print(render(store, "site", RenderConfig(workers=1), progress=False)["neurons"])
"""
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", script, str(target)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "32"
    page = (tmp_path / "site" / "neurons" / "1" / "15" / "index.html").read_text(encoding="utf-8")
    assert "L1/N15" in page or "L1 / N15" in page
    assert (tmp_path / "site" / "search" / "index.html").is_file()
    assert (tmp_path / "site" / "assets" / "atlas-neuron.js").is_file()
