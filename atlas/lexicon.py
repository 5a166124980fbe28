"""Word frequencies: which decoded terms are whole English words, which are function words, and
which words of other languages the labels stage asks the model to translate.

Concept matches and labels need two things that neither the model's vocabulary nor the word
vectors say: whether a term is a word at all ("monkey") or a piece of one (" eleph",
"itarian", which BPE vocabularies are full of, and which word vectors pooled from sub-word
tokens place by spelling), and which words are too common to name a concept ("which",
"might"). Both come from one list of English word frequencies: the one that PyPI's
``pyspellchecker`` wheel ships (``spellchecker/resources/en.json.gz``, 160,572 words with
counts, 650 KB). Nothing of the package is imported; only that file is read, as
``atlas.wordvec`` reads wordllama's. Without it atlas falls back to the word vectors' whole
words and the corpus (see ``atlas.site.concept_source``), and says so.

The same wheel ships lists of other languages (``LANGUAGES``, ``resources/<code>.json.gz``):
the labels stage asks the model what their commonest words mean (``atlas.model_examples``),
so that a query in French finds what the model reads it as.

This module imports no torch, so the site's search index can use it.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from dataclasses import dataclass
from functools import lru_cache

from atlas.resources import installed_package

PACKAGE = "pyspellchecker"
MODULE = "spellchecker"
FILE = "resources/{lang}.json.gz"
# The languages whose lists pyspellchecker 0.9 ships besides English, by code.
LANGUAGES = {"fr": "French", "es": "Spanish", "de": "German", "it": "Italian", "pt": "Portuguese", "nl": "Dutch",
             "ru": "Russian", "ar": "Arabic", "fa": "Persian", "lv": "Latvian", "eu": "Basque"}


@dataclass
class Lexicon:
    counts: dict[str, int]      # lower-case word -> count in the list's corpus
    source: dict                # name, version, file, words: what atlas_meta records

    def words(self, min_count: int) -> set[str]:
        """Words (letters only) counted at least ``min_count`` times."""
        return {w for w, c in self.counts.items() if c >= min_count and w.isalpha()}

    def commonest(self, n: int) -> list[str]:
        """The ``n`` most frequent words (letters only), commonest first."""
        return sorted((w for w in self.counts if w.isalpha()), key=lambda w: (-self.counts[w], w))[:n]


@lru_cache(maxsize=None)
def load(lang: str = "en") -> tuple[Lexicon | None, str]:
    """The lexicon of ``lang`` (English by default), or None and the reason it is not there; read
    once per process. Words are lower-cased, and the counts of spellings that meet are summed."""
    root = installed_package(MODULE)
    if root is None:
        return None, f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE})"
    file = FILE.format(lang=lang)
    try:
        with gzip.open(root / file, "rt", encoding="utf-8") as f:
            counts: dict[str, int] = {}
            for w, c in json.load(f).items():
                w = str(w).lower()
                counts[w] = counts.get(w, 0) + int(c)
    except Exception as e:      # missing or damaged: concepts go on with the fallback, and say so
        return None, f"{PACKAGE}'s {file} could not be read ({type(e).__name__}: {e})"
    version = importlib.metadata.version(PACKAGE)
    return Lexicon(counts, {"name": PACKAGE, "version": version, "file": file, "words": len(counts)}), ""
