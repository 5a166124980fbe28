"""Corpus readers and the cutting of documents into model inputs.

A reader yields ``(source, text)`` documents; readers are looked up in ``READERS`` by
kind, and ``open_corpus`` picks one from a path. Documents are tokenised, joined with the
end-of-text token and cut into rows of exactly ``context`` tokens: each row is one model
input and one ``corpus_docs`` row, stored with the exact ids the model saw.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from atlas.errors import AtlasError
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


@reader("default")
def read_default(_path=None, **_) -> Iterator[Doc]:
    """Human-written text every Python install has: the documentation topics, then stdlib docstrings."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 200:
                where = path.relative_to(stdlib).as_posix()
                yield f"stdlib:{where}:{getattr(node, 'name', '')}".rstrip(":"), doc


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


def open_corpus(path: str | None, text_column: str = "text") -> Iterator[Doc]:
    """The corpus's documents, each distinct text once.

    Exact repeats are dropped (the standard library repeats docstrings across classes, and web
    corpora repeat boilerplate): a repeated passage would otherwise fill a neuron's exemplars
    with the same sentence from different inputs.
    """
    kind, p = corpus_kind(path)
    seen: set[bytes] = set()
    for source, text in READERS[kind](p, text_column=text_column):
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            yield source, text


def corpus_identity(path: str | None, text_column: str = "text") -> str:
    """A cheap key for "the same corpus as last time": file names, sizes and modification
    times (the Python version for the default corpus), so that a finished pass can be skipped
    without reading and tokenising the corpus again."""
    kind, p = corpus_kind(path)
    if kind == "default":
        parts: list = [sys.version, sysconfig.get_paths()["stdlib"]]
    else:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        parts = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return digest([kind, text_column, parts])


@dataclass
class Row:
    """One model input: exactly ``context`` token ids."""

    doc_id: int
    source: str
    token_ids: list[int]


def cut_rows(docs: Iterable[Doc], tokenizer, context: int, max_tokens: int | None) -> Iterator[Row]:
    """Tokenise documents, join them with the end-of-text token and cut rows of ``context`` tokens.

    A row starts with the BOS token where the tokenizer has one, so every row is a
    well-formed input on its own; ``source`` names the document the row starts in.
    Stops after ``max_tokens`` tokens (None: no cap). Deterministic for the same input.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sep = tokenizer.eos_token_id
    body = context - len(bos)
    if body < 1:
        raise AtlasError(f"context {context} is too short")
    buf: list[int] = []
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
        while len(buf) >= body:
            yield Row(doc_id, source, bos + buf[:body])
            doc_id += 1
            n_tokens += context
            buf = buf[body:]
            source = src
            if max_tokens is not None and n_tokens + context > max_tokens:
                return


def corpus_hash(rows: list[Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.doc_id, r.source, r.token_ids]).encode())
    return "sha256:" + h.hexdigest()
