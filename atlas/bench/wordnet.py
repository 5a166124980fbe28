"""WordNet 3.0's noun hierarchy, read from Debian's ``wordnet-base`` files, for judging concept search.

The concept benchmark needs, per category ("animal", "colour" ...), the words that belong
to it, decided by something other than the word vectors that concept search uses. WordNet
is that: a word belongs to a category when one of its first ``SENSES`` noun senses has the
category's synset among its hypernyms (``@`` and instance ``@i`` pointers, followed to the
root). Only ``index.noun``, ``data.noun`` and ``noun.exc`` are read.

WordNet is optional: Debian's package needs root (``apt-get install wordnet-base``), or
its files can be unpacked anywhere (``apt-get download wordnet-base && dpkg-deb -x ...``)
and passed with ``--wordnet DIR``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from atlas.errors import AtlasError

DEFAULT_DIR = Path("/usr/share/wordnet")
SENSES = 1          # a word's commonest noun sense counts (the second adds noise: "head" as an animal)


class WordNet:
    def __init__(self, root: str | Path = DEFAULT_DIR):
        root = Path(root)
        missing = [f for f in ("index.noun", "data.noun", "noun.exc") if not (root / f).is_file()]
        if missing:
            raise AtlasError(f"no WordNet at {root} (missing {', '.join(missing)}): install Debian's "
                             "wordnet-base, or unpack it and pass --wordnet DIR")
        self.root = root
        self.senses: dict[str, list[int]] = {}          # lemma -> synset offsets, commonest first
        for line in (root / "index.noun").read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):
                continue                                # the licence header
            f = line.split()
            n_synsets, n_ptr = int(f[2]), int(f[3])
            self.senses[f[0]] = [int(x) for x in f[6 + n_ptr:6 + n_ptr + n_synsets]]
        self.hypernyms: dict[int, list[int]] = {}
        for line in (root / "data.noun").read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):
                continue
            f = line.split()
            n_words = int(f[3], 16)
            i = 4 + 2 * n_words
            n_ptr = int(f[i])
            ups = []
            for j in range(n_ptr):
                sym, off = f[i + 1 + 4 * j], f[i + 2 + 4 * j]
                if sym in ("@", "@i"):
                    ups.append(int(off))
            self.hypernyms[int(f[0])] = ups
        self.exceptions = {}
        for line in (root / "noun.exc").read_text(encoding="latin-1").splitlines():
            f = line.split()
            if len(f) >= 2:
                self.exceptions[f[0]] = f[1]
        self._closure = lru_cache(maxsize=None)(self._ancestors)

    def _ancestors(self, offset: int) -> frozenset[int]:
        seen, stack = {offset}, [offset]
        while stack:
            for up in self.hypernyms.get(stack.pop(), ()):
                if up not in seen:
                    seen.add(up)
                    stack.append(up)
        return frozenset(seen)

    def lemma(self, word: str) -> str | None:
        """The WordNet noun lemma of a word: itself, its exception form, or a plural stripped."""
        w = word.lower().replace(" ", "_")
        if w in self.senses:
            return w
        if w in self.exceptions and self.exceptions[w] in self.senses:
            return self.exceptions[w]
        for suffix, repl in (("ies", "y"), ("es", ""), ("s", "")):
            if w.endswith(suffix) and w[:-len(suffix)] + repl in self.senses:
                return w[:-len(suffix)] + repl
        return None

    def synset(self, lemma: str, sense: int = 1) -> int:
        offsets = self.senses.get(lemma)
        if not offsets or sense > len(offsets):
            raise AtlasError(f"WordNet has no noun sense {sense} of {lemma!r}")
        return offsets[sense - 1]

    def belongs(self, word: str, category: int) -> bool:
        """Whether one of ``word``'s first ``SENSES`` noun senses falls under the synset ``category``."""
        lemma = self.lemma(word)
        if lemma is None:
            return False
        return any(category in self._closure(s) for s in self.senses[lemma][:SENSES])
