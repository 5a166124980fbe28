"""Shared fixtures: seeds, the fault-count summary, and the expensive things built once per session:
tiny models (one per architecture), the default atlas, and a headless Chromium.

Plain helpers (model factories, the CLI runner, the static server) are in helpers.py.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CHROMIUM, CHROMIUM_ARGS, DEFAULT_BUILD, FAULT_COUNTS, atlas, save_tiny_model, served

# GGUF models converted by load_model (atlas.model.load.gguf_cache_dir) go to a folder of this
# session, not the user's cache; set ATLAS_MODEL_CACHE to keep one across sessions.
if "ATLAS_MODEL_CACHE" not in os.environ:
    os.environ["ATLAS_MODEL_CACHE"] = tempfile.mkdtemp(prefix="atlas-model-cache-")
    atexit.register(shutil.rmtree, os.environ["ATLAS_MODEL_CACHE"], True)


def pytest_terminal_summary(terminalreporter):
    if any(FAULT_COUNTS.values()):
        terminalreporter.write_sep("-", "fault injection")
        terminalreporter.write_line(", ".join(f"{len(tried)} {what}" for what, tried in FAULT_COUNTS.items())
                                    + " tried")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``make(arch="llama", vocab=64)``: the directory of a saved tiny model with its tokenizer.

    Each (arch, vocab) is built once per session and shared, so tests only read it (copy it
    to change it)."""
    made: dict[tuple[str, int], Path] = {}

    def make(arch: str = "llama", vocab: int = 64) -> Path:
        if (arch, vocab) not in made:
            made[arch, vocab] = save_tiny_model(tmp_path_factory.mktemp(f"model-{arch}-{vocab}"), arch, vocab)
        return made[arch, vocab]
    return make


@pytest.fixture(scope="session")
def default_atlas(tmp_path_factory) -> Path:
    """The embedded default model built once by `atlas build` (the slow tests share it; see DEFAULT_BUILD)."""
    out = tmp_path_factory.mktemp("default-atlas")
    proc = atlas("build", "--out", out, *DEFAULT_BUILD, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default model loaded once on the CPU for the slow tests that run it by hand
    (each load costs seconds of parsing the GGUF file on 2 cores); tests must leave no hook on it."""
    from atlas.model.load import load_model
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs, no dashboard, on loopback): starting
    one costs seconds on 2 cores, so every Ray test joins this one (``--ray auto`` finds it)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'atlas-neurons[ray]')")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level=logging.ERROR)
    yield ray
    from atlas import distributed

    distributed.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_site(tmp_path_factory):
    """(root, base URL): a 2 x 8 synthetic atlas with every section, rendered to ``root/site`` and
    served on loopback for the whole session; the browser tests that only read pages share it."""
    from atlas.bench.synthetic import make_synthetic_store
    from atlas.config import RenderConfig
    from atlas.site.render import render

    root = tmp_path_factory.mktemp("synthetic-site")
    store = make_synthetic_store(root / "atlas.duckdb", 2, 8, vocab_size=512, clusters=True, corpus=True, clamp=True)
    render(store, root / "site", RenderConfig(workers=1), progress=False)
    with served(root / "site") as base:
        yield root, base


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium driven by Playwright for the whole session."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed (pip install playwright)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def browser(chromium):
    """The session's Chromium; the contexts (and pages) a test opens are closed after it."""
    before = set(chromium.contexts)
    yield chromium
    for context in chromium.contexts:
        if context not in before:
            context.close()
