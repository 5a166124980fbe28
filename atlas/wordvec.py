"""Static word vectors for concepts: the embedding table that PyPI's ``wordllama`` wheel ships.

Why this resource (measured, README "Concepts"): the wheel is 19 MB, installs without
root and without network at run time, and carries a 32,000-token x 256-dimension table
(``weights/l2_supercat_256.safetensors``, 16 MB) trained so that similar texts have
similar mean token vectors. A word's vector is the mean of its tokens' rows, unit length,
exactly as wordllama's own ``embed`` pools; nothing of the package is imported (its
dependencies pin numpy 2 and pydantic, which atlas does not need), only its two data
files are read, with ``safetensors`` and ``tokenizers`` that transformers already brings.

This module imports no torch, so the site's search index can use it.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from atlas.resources import installed_package

PACKAGE = "wordllama"
WEIGHTS = "weights/l2_supercat_256.safetensors"
TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"


@dataclass
class WordVectors:
    """Unit word vectors from a static token-embedding table."""

    table: np.ndarray           # [vocab, dim] float32
    tokenizer: object           # tokenizers.Tokenizer
    source: dict                # name, version, file: what atlas_meta records

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def embed(self, words: list[str], batch: int = 4096) -> np.ndarray:
        """[len(words), dim] float32 unit vectors; a word without tokens gets a zero row."""
        out = np.zeros((len(words), self.dim), np.float32)
        for lo in range(0, len(words), batch):
            encoded = self.tokenizer.encode_batch(words[lo:lo + batch], add_special_tokens=False)
            for i, enc in enumerate(encoded, lo):
                ids = [t for t in enc.ids if 0 <= t < len(self.table)]
                if ids:
                    out[i] = self.table[ids].mean(0)
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norm > 0, norm, 1)


    def words(self) -> list[str]:
        """The table's whole-word tokens (SentencePiece's ``▁`` prefix, letters only, 3+), lower-cased."""
        vocab = self.tokenizer.get_vocab()
        return sorted({t[1:].lower() for t in vocab if t.startswith("\u2581") and len(t) > 3 and t[1:].isalpha()})


def package_dir() -> Path | None:
    """Where the wordllama package is installed, found without importing it (None: not installed)."""
    return installed_package(PACKAGE)


@lru_cache(maxsize=1)
def load() -> tuple[WordVectors | None, str]:
    """The word vectors, or None and the reason they are not there (the build reports it); read once per process."""
    root = package_dir()
    if root is None:
        return None, f"{PACKAGE} is not installed (pip install --no-deps {PACKAGE}): concept matches left out"
    weights, tok_file = root / WEIGHTS, root / TOKENIZER
    if not weights.is_file() or not tok_file.is_file():
        return None, f"{PACKAGE} at {root} lacks {WEIGHTS} or {TOKENIZER}: concept matches left out"
    try:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        tensors = load_file(str(weights))
        table = next(iter(tensors.values())).astype(np.float32)
        tokenizer = Tokenizer.from_file(str(tok_file))
        tokenizer.no_padding()
        tokenizer.no_truncation()
    except Exception as e:      # a damaged file: the build goes on without concepts, and says so
        return None, f"{PACKAGE}'s data could not be read ({type(e).__name__}: {e}): concept matches left out"
    version = importlib.metadata.version(PACKAGE)
    return WordVectors(table, tokenizer, {"name": PACKAGE, "version": version, "file": WEIGHTS,
                                          "dim": int(table.shape[1]), "tokens": int(table.shape[0])}), ""
