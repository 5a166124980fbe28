"""Where atlas's own files are: the site templates, ``mkdocs.yml`` and ``data/``.

In a checkout (and an editable install) they are the top-level ``site_templates/``,
``mkdocs.yml`` and ``data/``; an installed wheel has no checkout, so ``setup.py`` copies
all three into the package as ``atlas/_bundled/``. ``data/`` holds the files that code and
tests share, one copy each: the clamp stage's probe prompts, the concept lists, and the
hostile strings that every renderer must escape.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any


def _root() -> Path:
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "site_templates").is_dir() and (checkout / "mkdocs.yml").is_file():
        return checkout
    return Path(__file__).resolve().parent / "_bundled"


ROOT = _root()
TEMPLATES = ROOT / "site_templates"
MKDOCS_YML = ROOT / "mkdocs.yml"
DATA = ROOT / "data"
PROBE_PROMPTS = DATA / "probe_prompts.txt"


@lru_cache(maxsize=None)
def data_json(name: str) -> Any:
    """A JSON file of ``data/`` (``concepts.json``, ``hostile.json``), read once per process."""
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def concepts(kind: str) -> list[str]:
    """A list of ``data/concepts.json``: ``clamp_check``, ``held_out_prompts`` or ``everyday``."""
    return list(data_json("concepts.json")[kind])


def installed_package(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None: not installed). The
    data packages atlas reads (the embedded model, word vectors, word counts) are never imported:
    their own dependencies are not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def npm_package(name: str, env: str | None = None) -> Path:
    """Where ``scripts/setup`` installs the npm package ``name`` (the venv's share/atlas/npm, so
    that no root is needed), or the folder the environment variable ``env`` names. The caller
    checks that the files it reads are there."""
    where = os.environ.get(env) if env else None
    return Path(where) if where else Path(sys.prefix) / "share" / "atlas" / "npm" / "node_modules" / name


def hostile(kind: str) -> list[str]:
    """A list of ``data/hostile.json``: ``tokens``, ``labels`` or ``payloads``."""
    return list(data_json("hostile.json")[kind])
