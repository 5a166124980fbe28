"""The DuckDB store: one file that holds every number an atlas shows.

The tables are defined in ``atlas/schema.py``; their names are a public API (see DESIGN.md).
Every stage writes inside a transaction and records its progress in the same transaction,
so a crash leaves either the old state or the new one, never a store that looks complete.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb

from atlas import __version__
from atlas.errors import AtlasError
from atlas.schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION



def finished_stage(con, stage: str) -> dict | None:
    """What a finished ``stage`` recorded on the connection ``con``, or None if it has not finished."""
    row = con.execute("SELECT value FROM atlas_meta WHERE key = ?", [f"stage.{stage}"]).fetchone()
    status = json.loads(row[0]) if row else None
    return status if status and status.get("status") == "done" else None


def without_timings(value: Any) -> Any:
    """``value`` (atlas_meta JSON) less its timings (``seconds``, ``*_seconds``, ``*_s``), which
    differ between equal builds."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if not (k == "seconds" or k.endswith(("_seconds", "_s")))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def lock_holder(message: str) -> str:
    """Who holds the store, as DuckDB's lock error names it ("... is held in /usr/bin/python3 (PID 123)")."""
    m = re.search(r"held in (.*?) \(PID (\d+)\)", message)
    if not m:
        return "another process"
    return f"another process (PID {m.group(2)}, {Path(m.group(1)).name})"


class Store:
    """An open ``atlas.duckdb``. Use as a context manager, or call ``close()``."""

    def __init__(self, path: str | Path, read_only: bool = False, memory_mb: int | None = None):
        """``memory_mb`` caps DuckDB's memory (it spills to disk beyond it); None leaves DuckDB's default."""
        self.path = Path(path)
        if read_only and not self.path.is_file():
            raise AtlasError(f"no atlas store at {self.path}")
        config = {"memory_limit": f"{int(memory_mb)}MB"} if memory_mb else {}
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only, config=config)
            self.con.execute("SET enable_progress_bar = false")     # atlas draws its own bars
        except duckdb.IOException as e:
            msg = str(e).splitlines()[0]
            if "lock" in msg.lower():
                raise AtlasError(f"{self.path} is in use by {lock_holder(msg)}; close it there "
                                 "(a notebook's duckdb.connect, another atlas command) and rerun") from None
            raise AtlasError(f"cannot open store {self.path}: {msg}") from None
        except duckdb.Error as e:
            raise AtlasError(f"{self.path} is not an atlas store ({str(e).splitlines()[0]})") from None
        try:
            self._check_version(read_only)
        except BaseException:
            self.con.close()
            raise
        if not read_only:
            self.con.execute(SCHEMA)        # adds the tables of newer stages; never changes existing ones

    def _check_version(self, read_only: bool) -> None:
        """Refuse, or migrate, a store of another schema version before anything is written to it."""
        tables = {r[0] for r in self.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        fresh = not tables or ("atlas_meta" in tables and
                               self.con.execute("SELECT count(*) FROM atlas_meta").fetchone()[0] == 0)
        if fresh and not read_only:
            with self.transaction():        # one commit: a kill never leaves a store without its version
                self.con.execute(SCHEMA)
                self.set_meta("schema_version", SCHEMA_VERSION)
            return
        if "atlas_meta" not in tables:
            raise AtlasError(f"{self.path} is not an atlas store (no atlas_meta table)")
        version = self.meta("schema_version")
        if version is None:
            raise AtlasError(f"{self.path} has no schema_version: it was written before atlas recorded one, "
                             "or by another program; rebuild it into a new directory")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise AtlasError(f"{self.path} has store schema v{version}, newer than the v{SCHEMA_VERSION} this "
                             f"atlas {__version__} reads: upgrade atlas (pip install -U atlas-neurons)")
        if version < SCHEMA_VERSION:
            steps = [MIGRATIONS.get(v) for v in range(version, SCHEMA_VERSION)]
            if None in steps:
                raise AtlasError(f"{self.path} has store schema v{version}; this atlas {__version__} reads "
                                 f"v{SCHEMA_VERSION} and cannot migrate it: rebuild it into a new directory")
            if read_only:
                raise AtlasError(f"{self.path} has store schema v{version}; run `atlas build` on it once "
                                 f"to migrate it to v{SCHEMA_VERSION}")
            with self.transaction():
                for step in steps:
                    step(self.con)
                self.set_meta("schema_version", SCHEMA_VERSION)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    # -- metadata ------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        row = self.con.execute("SELECT value FROM atlas_meta WHERE key = ?", [key]).fetchone()
        return default if row is None else json.loads(row[0])

    def all_meta(self) -> dict[str, Any]:
        rows = self.con.execute("SELECT key, value FROM atlas_meta ORDER BY key").fetchall()
        return {k: json.loads(v) for k, v in rows}

    def set_meta(self, key: str, value: Any) -> None:
        self.con.execute("INSERT OR REPLACE INTO atlas_meta VALUES (?, ?)",
                         [key, json.dumps(value, sort_keys=True)])

    # -- units of a stage's work (the records themselves: atlas/stages/contract.py) ------
    def units_done(self, stage: str, fingerprint: str) -> set[str]:
        rows = self.con.execute("SELECT unit FROM stage_progress WHERE stage = ? AND fingerprint = ?",
                                [stage, fingerprint]).fetchall()
        return {r[0] for r in rows}

    def mark_unit(self, stage: str, unit: str, fingerprint: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO stage_progress VALUES (?, ?, ?)", [stage, unit, fingerprint])

    def reset_stage(self, stage: str) -> None:
        self.con.execute("DELETE FROM stage_progress WHERE stage = ?", [stage])
        self.con.execute("DELETE FROM atlas_meta WHERE key = ?", [f"stage.{stage}"])

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def count(self, table: str) -> int:
        return self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
