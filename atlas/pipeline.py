"""The build: stages in order, each skipped when the store already holds its result.

``build()`` is what ``atlas build`` runs; the other functions are the single stages that
``atlas decode`` and ``atlas render`` run, and are as usable from a notebook.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from pathlib import Path

from atlas import __version__
from atlas.stages.clamp import ClampConfig, run_clamp
from atlas.stages.cluster import ClusterConfig, run_cluster
from atlas.stages.decode import DecodeConfig, fingerprint, run_decode
from atlas.errors import AtlasError
from atlas.stages.exemplars import ExemplarConfig, check_corpus, quick_key, run_exemplars
from atlas.lock import output_lock
from atlas.model.load import DEFAULT_MODEL, LoadedModel, hash_weights, load_model, pick_device, resolve
from atlas.config import RenderConfig
from atlas.site.render import render
from atlas.store import Store

STORE_NAME = "atlas.duckdb"
SITE_NAME = "site"
HOOK_POINT = "input of the MLP's down projection (mlp.out)"


def prepare_out(out: str | Path) -> Path:
    """Create the output directory, or fail in one line if it cannot hold an atlas."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise AtlasError(f"output {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".atlas-write-test-"):
            pass
    except OSError as e:
        raise AtlasError(f"cannot write to output directory {out}: {e.strerror}") from None
    return out


def store_path(out: str | Path) -> Path:
    out = Path(out)
    return out if out.suffix == ".duckdb" else out / STORE_NAME


def _created_at() -> str:
    # SOURCE_DATE_EPOCH pins the one timestamp an atlas carries, for reproducible builds.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch else dt.datetime.now(dt.timezone.utc)
    return when.replace(microsecond=0).isoformat()


def record_model(store: Store, lm: LoadedModel, weights_hash: str) -> None:
    store.set_meta("model", lm.describe())
    store.set_meta("weights_hash", weights_hash)
    store.set_meta("tool_version", __version__)
    store.set_meta("hook_point", HOOK_POINT)
    if store.meta("created_at") is None:
        store.set_meta("created_at", _created_at())


def _check_same_model(store: Store, weights_hash: str, force: bool) -> None:
    old = store.meta("weights_hash")
    if old is not None and old != weights_hash and not force:
        model = (store.meta("model") or {}).get("id", "another model")
        raise AtlasError(f"{store.path} holds an atlas of {model} (weights {old[:19]}…); "
                         "use another --out, or --force to replace it")


class Build:
    """One output directory and the model it is built from; the model loads only when a stage needs it."""

    def __init__(self, out: str | Path, model: str | None = DEFAULT_MODEL, device: str = "auto",
                 dtype: str = "auto", force: bool = False, progress: bool = True):
        self.out = prepare_out(out)
        self.model_spec, self.device, self.dtype = model, device, dtype
        self.progress = progress
        _, _, _, files = resolve(model)
        self.weights_hash = hash_weights(files)
        with output_lock(self.out):
            if force and store_path(self.out).exists():
                store_path(self.out).unlink()
            with Store(store_path(self.out)) as store:
                _check_same_model(store, self.weights_hash, force)
        self._lm: LoadedModel | None = None

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            self._lm = load_model(self.model_spec, self.device, self.dtype)
        return self._lm

    def decode(self, cfg: DecodeConfig = DecodeConfig()) -> dict:
        with output_lock(self.out), Store(store_path(self.out)) as store:
            if store.stage_done("decode", fingerprint(self.weights_hash, cfg)):
                return {"skipped": True}
            record_model(store, self.lm, self.weights_hash)
            return run_decode(store, self.lm, cfg, self.weights_hash, self.progress)

    def exemplars(self, cfg: ExemplarConfig = ExemplarConfig()) -> dict:
        with output_lock(self.out), Store(store_path(self.out)) as store:
            if store.stage_status("decode") is None or store.stage_status("decode").get("status") != "done":
                raise AtlasError(f"{store.path} has no finished decode stage; run `atlas decode` first")
            cfg.validate()
            done = store.stage_status("exemplars") or {}
            if done.get("status") == "done" and done.get("quick_key") == quick_key(self.weights_hash, cfg):
                return {"skipped": True}
            return run_exemplars(store, self.lm, cfg, self.weights_hash, self.progress)

    def cluster(self, cfg: ClusterConfig = ClusterConfig()) -> dict:
        # The model loads only if the geometry must be computed; relabelling needs the store alone.
        with output_lock(self.out), Store(store_path(self.out)) as store:
            return run_cluster(store, lambda: self.lm, cfg, self.weights_hash, self.progress)

    def clamp(self, cfg: ClampConfig = ClampConfig()) -> dict:
        # Reads normalisers (exemplars) and, when present, clusters to pick neurons on a CPU.
        with output_lock(self.out), Store(store_path(self.out)) as store:
            return run_clamp(store, lambda: self.lm, cfg, self.weights_hash, pick_device(self.device).type,
                             self.progress)

    def render(self, cfg: RenderConfig | None = None, force: bool = False) -> dict:
        return render_site(self.out, cfg, self.progress, force)


def render_site(out: str | Path, cfg: RenderConfig | None = None, progress: bool = True,
                force: bool = False) -> dict:
    out = Path(out)
    # A directory that does not exist holds no store: render says so, with nothing to lock.
    with output_lock(out) if out.is_dir() else contextlib.nullcontext():
        return render(store_path(out), out / SITE_NAME, cfg or RenderConfig(), progress=progress, force=force)


def build(out: str | Path, model: str | None = DEFAULT_MODEL, decode: DecodeConfig = DecodeConfig(),
          render: RenderConfig | None = None, exemplars: ExemplarConfig = ExemplarConfig(),
          device: str = "auto", dtype: str = "auto", force: bool = False, progress: bool = True,
          cluster: ClusterConfig = ClusterConfig(), clamp: ClampConfig = ClampConfig()) -> dict:
    """Run every stage into ``out`` (``atlas.duckdb`` and ``site/``), resuming where a run stopped."""
    for cfg in (decode, exemplars, cluster, clamp, render or RenderConfig()):
        cfg.validate()              # bad settings and a bad corpus fail now, not after a stage or two
    check_corpus(exemplars)
    b = Build(out, model, device, dtype, force, progress)
    # Clustering runs after the corpus pass so that cluster labels can use exemplar tokens.
    with output_lock(b.out):        # held across the stages: a second build is refused, not interleaved
        # The clamp check runs after clustering so that a CPU budget can take neurons from every cluster.
        return {"decode": b.decode(decode), "exemplars": b.exemplars(exemplars), "cluster": b.cluster(cluster),
                "clamp": b.clamp(clamp), "render": b.render(render, force)}
