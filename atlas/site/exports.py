"""Downloads of a site: the store itself and one Parquet file per public table.

Written by ``render`` into ``exports/`` beside the pages, from the same store the pages are
rendered from, so a reader can check any number on a page against the rows it came from.
Rows are written in key order, so the same store gives the same files, byte for byte.
Stage timings are left out of both copies of ``atlas_meta`` (they differ between builds of
the same inputs, and stay in the build's own store); the exported ``atlas.duckdb`` then holds
the same rows for the same inputs, though not the same bytes: DuckDB does not lay out a
file the same way twice, even for two copies of one store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb

from atlas.errors import AtlasError
from atlas.schema import EXPORT_TABLES
from atlas.store import without_timings

STORE_FILE = "atlas.duckdb"


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def write_exports(con, store_path: Path, out_dir: Path) -> list[dict]:
    """Write ``atlas.duckdb`` and ``<table>.parquet`` into ``out_dir``; returns what was written.

    ``con`` is an open (read-only) connection to the store at ``store_path``. The store is
    copied as a file, which keeps it byte-identical; a store with a write-ahead log (a
    stage that did not close cleanly) is copied through DuckDB instead, so nothing in the
    log is lost.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    con.execute("SET enable_progress_bar = false")
    written: list[dict] = []
    target = out_dir / STORE_FILE
    if store_path.with_name(store_path.name + ".wal").exists():
        copier = duckdb.connect()
        try:
            copier.execute("SET enable_progress_bar = false")
            copier.execute(f"ATTACH {_quote(store_path)} AS src (READ_ONLY)")
            copier.execute(f"ATTACH {_quote(target)} AS dst")
            copier.execute("COPY FROM DATABASE src TO dst")
        except duckdb.Error as e:
            raise AtlasError(f"cannot export {store_path}: {str(e).splitlines()[0]}") from None
        finally:
            copier.close()
    else:
        shutil.copyfile(store_path, target)
    copy = duckdb.connect(str(target))
    try:
        copy.execute("SET enable_progress_bar = false")
        _drop_timings(copy)
        present = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        for table, order in EXPORT_TABLES.items():
            if table not in present:
                continue
            path = out_dir / f"{table}.parquet"
            source = copy if table == "atlas_meta" else con    # the copy's atlas_meta has no timings
            source.execute(f"COPY (SELECT * FROM {table} ORDER BY {order}) TO {_quote(path)} "
                           "(FORMAT parquet, COMPRESSION zstd)")
            rows = source.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            written.append({"file": path.name, "table": table, "rows": rows, "bytes": path.stat().st_size})
    finally:
        copy.close()
    written.insert(0, {"file": STORE_FILE, "table": None, "rows": None, "bytes": target.stat().st_size})
    return written


def _drop_timings(copy) -> None:
    """Rewrite the exported store's atlas_meta without stage timings (``store.without_timings``)."""
    rows = copy.execute("SELECT key, value FROM atlas_meta ORDER BY key").fetchall()
    changed = [(json.dumps(without_timings(json.loads(v)), sort_keys=True), k) for k, v in rows]
    changed = [(v, k) for (v, k), (_, old) in zip(changed, rows) if v != old]
    if changed:
        copy.executemany("UPDATE atlas_meta SET value = ? WHERE key = ?", changed)
        copy.execute("CHECKPOINT")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"
