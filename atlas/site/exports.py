"""Downloads of a site: the store itself and one Parquet file per public table.

Written by ``render`` into ``exports/`` beside the pages, from the same store the pages are
rendered from, so a reader can check any number on a page against the rows it came from.
Rows are written in key order, so the same store gives the same files, byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb

from atlas.errors import AtlasError
from atlas.schema import EXPORT_TABLES

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
    written = []
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
    written.append({"file": STORE_FILE, "table": None, "rows": None, "bytes": target.stat().st_size})

    present = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    for table, order in EXPORT_TABLES.items():
        if table not in present:
            continue
        path = out_dir / f"{table}.parquet"
        con.execute(f"COPY (SELECT * FROM {table} ORDER BY {order}) TO {_quote(path)} "
                    "(FORMAT parquet, COMPRESSION zstd)")
        rows = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        written.append({"file": path.name, "table": table, "rows": rows, "bytes": path.stat().st_size})
    return written


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"
