"""The stage contract: what every stage declares, how it knows it is done, and how it writes rows.

A stage is a module with ``run(ctx, cfg) -> dict``, registered in ``atlas.stages.STAGES``
with its config class and the stages whose rows it reads. Every stage records in
``atlas_meta`` (key ``stage.<name>``) a status, its fingerprint and the fingerprints of
the stages it read (``inputs``):

- its **fingerprint** is a digest of its own inputs (weights, settings, corpus ...) and of
  the fingerprints of the stages it reads, so a stage whose upstream changed never matches
  its old record and runs again;
- a finished stage is **stale** when a stage it read has since run again under another
  fingerprint, or is running or gone (``atlas.store.stale_stages``, torch-free, which
  ``atlas info`` and ``render`` use): a decode rerun with new settings therefore leaves
  exemplars, clusters and clamp check visibly stale until ``atlas build`` reruns them.

This module imports no torch: the site and the command line read records through it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa

from atlas.errors import AtlasError
from atlas.store import Store, finished_stage


def digest(inputs: Any) -> str:
    """16 hex digits of the sha256 of ``inputs`` as sorted JSON: the fingerprint of anything."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    """A stage as the registry knows it; its module is imported only when it runs."""

    name: str
    config: type
    reads: tuple[str, ...]      # stages whose rows this one reads (a missing one counts as None)
    module: str                 # holds ``run(ctx, cfg) -> dict``

    def run(self, ctx: "Context", cfg) -> dict:
        return importlib.import_module(self.module).run(ctx, cfg)


@dataclass
class Context:
    """What a stage runs with: the open store, the model (loaded on first use) and its identity."""

    store: Store
    stage: Stage
    weights_hash: str
    get_lm: Callable[[], Any]           # loads the model the first time it is called
    device_type: str = "cpu"            # where the model runs: the clamp stage's default budget depends on it
    progress: bool = True
    # How the model was asked for (``--model``, ``--device``, ``--dtype``): Ray workers load it the same way.
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    @property
    def lm(self):
        return self.get_lm()

    def inputs(self) -> dict[str, str | None]:
        """The fingerprints of the stages this one reads, None for those not finished."""
        return inputs_of(self.store.con, self.stage)

    def fingerprint(self, **own: Any) -> str:
        """This stage's fingerprint: its own inputs and, when it reads any, the fingerprints of those stages."""
        reads = self.inputs()
        return digest({**own, "reads": reads} if reads else own)

    def record(self) -> dict:
        """This stage's record, finished or not; {} when it never ran."""
        return self.store.meta(f"stage.{self.stage.name}") or {}

    def is_done(self, fingerprint: str) -> bool:
        record = finished_stage(self.store.con, self.stage.name)
        return record is not None and record.get("fingerprint") == fingerprint

    def require(self, name: str, what: str) -> dict:
        """The record of a finished stage this one needs; a one-line error naming the command if none."""
        record = finished_stage(self.store.con, name)
        if record is None:
            raise AtlasError(f"{self.store.path} has no finished {name} stage ({what}); run `atlas {name}` first")
        return record

    def start(self, fingerprint: str, cfg) -> None:
        """Mark the stage running: until it finishes, every stage that read it counts as stale."""
        write_record(self.store, self.stage, "running", fingerprint, asdict(cfg))

    def finish(self, fingerprint: str, cfg, **extra: Any) -> None:
        """Record the stage as done; call inside the transaction that wrote its rows."""
        write_record(self.store, self.stage, "done", fingerprint, asdict(cfg), **extra)


def inputs_of(con, stage: Stage) -> dict[str, str | None]:
    """The fingerprints of the stages ``stage`` reads as they are now, None for those not finished."""
    return {name: (finished_stage(con, name) or {}).get("fingerprint") for name in stage.reads}


def write_record(store: Store, stage: Stage, status: str, fingerprint: str, config: dict, **extra: Any) -> None:
    """The one writer of ``stage.<name>`` records: status, fingerprint, config, and what it read."""
    store.set_meta(f"stage.{stage.name}", {**extra, "status": status, "fingerprint": fingerprint,
                                           "config": config, "inputs": inputs_of(store.con, stage)})


@contextmanager
def registered(con, name: str, data: pa.Table) -> Iterator[None]:
    """``data`` visible to SQL as the view ``name`` while the block runs."""
    con.register(name, data)
    try:
        yield
    finally:
        con.unregister(name)


def insert_arrow(con, table: str, data: pa.Table, order: str | None = None, select: str = "t.*",
                 join: str = "", by_name: bool = True) -> None:
    """Insert the Arrow table ``data`` (aliased ``t``) into ``table``, optionally joined, selected and ordered.

    With the default ``select`` the columns go in by name, so ``data`` may hold a subset of
    the table's columns in any order.
    """
    target = f"{table} BY NAME" if by_name and select == "t.*" else table
    with registered(con, "atlas_new_rows", data):
        con.execute(f"INSERT INTO {target} SELECT {select} FROM atlas_new_rows t {join}"
                    + (f" ORDER BY {order}" if order else ""))


def update_from_arrow(con, table: str, data: pa.Table, keys: tuple[str, ...] = ("layer", "neuron")) -> None:
    """Set ``table``'s columns named in ``data`` from the rows of ``data`` with the same ``keys``."""
    sets = ", ".join(f"{c} = s.{c}" for c in data.column_names if c not in keys)
    match = " AND ".join(f"{table}.{k} = s.{k}" for k in keys)
    with registered(con, "atlas_new_rows", data):
        con.execute(f"UPDATE {table} SET {sets} FROM atlas_new_rows s WHERE {match}")


def stage_records(con) -> dict[str, dict]:
    """Every stage's record in ``atlas_meta``, finished or not, by stage name."""
    rows = con.execute("SELECT key, value FROM atlas_meta WHERE key LIKE 'stage.%' ORDER BY key").fetchall()
    return {key.split(".", 1)[1]: json.loads(value) for key, value in rows}


def stale_stages(con, stages: dict[str, Stage]) -> dict[str, str]:
    """Finished stages whose inputs changed since they ran, each with the reason in words.

    A stage is stale when a stage it read is no longer finished under the fingerprint it
    recorded (run again, running, or gone), or is itself stale; a record written before
    atlas recorded inputs counts as stale when its stage reads any.
    """
    records = stage_records(con)
    current = {name: r.get("fingerprint") if r.get("status") == "done" else None for name, r in records.items()}
    stale: dict[str, str] = {}
    for name in stages:                             # registry order is build order: upstream first
        record = records.get(name)
        if not record or record.get("status") != "done":
            continue
        inputs = record.get("inputs")
        if inputs is None:
            if stages[name].reads:
                stale[name] = "it ran before atlas recorded what it read"
            continue
        for up, fp in inputs.items():
            if up in stale:
                stale[name] = f"{up} is stale"
            elif current.get(up) != fp:
                stale[name] = f"{up} changed since it ran" if current.get(up) else f"{up} is not finished"
            if name in stale:
                break
    return stale
