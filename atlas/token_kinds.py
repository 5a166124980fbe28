"""What kind of token a decoded token is, for naming clusters that share no concept.

Most clusters of a small model share word pieces, code or function words rather than a
concept that word vectors can name ("aughed · uggage · ighthouse", "pathlib · hashlib ·
tempfile", "her · she · herself"). Their honest name is the kind of token their members
write. Each token gets one kind, from the first rule that fits:

- ``numbers``: no letters, and digits;
- ``punctuation``: neither letters nor digits (``?](``, ``'}),``);
- ``<Script> script``: letters, none of them Latin (``Greek script``: ``ζω``, ``ομαι``);
- ``Python names``: a keyword, built-in, standard-library module or a public name of a few
  common standard-library modules, as this interpreter lists them, and no English word
  (``getattr``, ``pathlib``, ``RuntimeError``; not ``list`` or ``time``);
- ``code``: an underscore or a lower-case letter followed by a capital (``DateTimeField``,
  ``setObjectName``, ``__init__``), or letters beside a bracket or operator (``_('``, ``{name}``);
- ``word endings``: a token that continues a word (no space before it), of at most
  ``ENDING_LETTERS`` letters, that ends at least ``ENDING_WORDS`` words of the lexicon
  (``ing``, ``ly``, ``ity``, ``er``);
- ``function words``: one of the lexicon's commonest words (``her``, ``was``);
- ``words``: a word of the lexicon: not a kind, a cluster of words is named by its concept
  or not at all;
- ``word pieces``: any other run of letters (``aughed``, ``olkien``, `` eleph``).

Without the lexicon there are no words, function words or endings: letters are then word
pieces unless another rule fits, so the kind names only what needs no lexicon (the labels
stage then names nothing by kind from letters alone).

This module imports no torch.
"""

from __future__ import annotations

import builtins
import importlib
import keyword
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass

NUMBERS, PUNCTUATION, PYTHON, CODE = "numbers", "punctuation", "Python names", "code"
FUNCTION, WORDS, ENDINGS, PIECES = "function words", "words", "word endings", "word pieces"
ENDING_LETTERS = 5
ENDING_WORDS = 300
# Standard-library modules whose public names a Python-heavy corpus writes as tokens.
PYTHON_MODULES = ("os", "os.path", "sys", "re", "json", "shutil", "itertools", "functools", "collections",
                  "typing", "pathlib", "math", "subprocess", "logging", "argparse", "string", "time", "random")
_CAMEL = re.compile(r"[a-z][A-Z]")
_EDGE = " \t\n\r\u00a0\u3000"
_CODE_SIGNS = set("=()[]{}<>|\\/@#$%^*+`~")


def python_names() -> set[str]:
    """Keywords, built-ins, standard-library module names and the public names of ``PYTHON_MODULES``."""
    names = set(keyword.kwlist) | set(dir(builtins)) | set(getattr(sys, "stdlib_module_names", ()))
    for module in PYTHON_MODULES:
        try:
            names |= {n for n in dir(importlib.import_module(module)) if not n.startswith("_")}
        except ImportError:                         # a trimmed interpreter: its names are what it has
            continue
    return {n for n in names if len(n) >= 3}


# Scripts named as Unicode's character names begin (the first word); letters of others are "other".
SCRIPTS = {"GREEK", "CYRILLIC", "ARMENIAN", "HEBREW", "ARABIC", "SYRIAC", "THAANA", "DEVANAGARI", "BENGALI",
           "GURMUKHI", "GUJARATI", "ORIYA", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM", "SINHALA", "THAI", "LAO",
           "TIBETAN", "MYANMAR", "GEORGIAN", "HANGUL", "ETHIOPIC", "CHEROKEE", "KHMER", "MONGOLIAN", "HIRAGANA",
           "KATAKANA", "BOPOMOFO", "CJK", "YI"}


def script(letters: str) -> str | None:
    """The script of a run of letters when none is Latin ("Greek", "CJK", "other"), else None."""
    names = Counter(unicodedata.name(ch, "UNKNOWN").split(" ")[0] for ch in letters)
    if "LATIN" in names:
        return None
    top = names.most_common(1)[0][0]
    if top not in SCRIPTS:
        return "other"
    return top if top == "CJK" else top.title()


@dataclass
class Kinds:
    """Classifies tokens; ``words`` and ``function`` are lower-case, empty without a lexicon."""

    words: set[str]
    function: set[str]
    python: set[str]
    endings: set[str]

    @classmethod
    def build(cls, lexicon=None, min_count: int = 50, function_words: int = 200) -> "Kinds":
        if lexicon is None:
            return cls(set(), set(), python_names(), set())
        words = lexicon.words(min_count)
        ends: Counter = Counter()
        for w in words:
            for n in range(1, ENDING_LETTERS + 1):
                if len(w) > n + 1:
                    ends[w[-n:]] += 1
        return cls(words, set(lexicon.commonest(function_words)), python_names(),
                   {e for e, c in ends.items() if c >= ENDING_WORDS})

    def of(self, token: str) -> str | None:
        """The token's kind; None for nothing to see (whitespace, or a byte fragment shown as U+FFFD)."""
        text = token.strip(_EDGE)
        if not text or "\ufffd" in text:
            return None
        letters = "".join(ch for ch in text if ch.isalpha())
        if not letters:
            return NUMBERS if any(ch.isdigit() for ch in text) else PUNCTUATION
        name = script(letters)
        if name:
            return f"{name} script"
        lower = text.lower()
        if text in self.python and lower not in self.words:
            return PYTHON
        if "_" in text or _CAMEL.search(text) or any(ch in _CODE_SIGNS for ch in text):
            return CODE
        if token[:1] not in _EDGE and lower in self.endings:
            return ENDINGS
        if lower in self.function:
            return FUNCTION
        if lower in self.words:
            return WORDS
        return PIECES


def dominant(kinds: list[str | None], least: int, share: float, pieces_share: float) -> str | None:
    """The kind that names a list of tokens, or None.

    A specific kind (not plain words, not word pieces) names it when it holds at least
    ``least`` tokens and ``share`` of them, the commonest such kind first; word pieces, the
    kind of whatever is left, need ``pieces_share`` of them (a majority)."""
    counts = Counter(k for k in kinds if k is not None)
    n = len(kinds)
    for kind, c in counts.most_common():
        if kind not in (WORDS, PIECES) and c >= least and c >= share * n:
            return kind
    return PIECES if counts.get(PIECES, 0) >= max(least, pieces_share * n) else None
