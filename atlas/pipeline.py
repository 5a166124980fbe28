"""The build: stages in order, each skipped when the store already holds its result.

``build()`` is what ``atlas build`` runs; the other functions are the single stages that
``atlas decode`` and ``atlas render`` run, and are as usable from a notebook.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from atlas.config import (ClampConfig, ClusterConfig, DecodeConfig, DescribeConfig, ExemplarConfig, LabelsConfig,
                          RenderConfig, check_device)
from atlas.errors import AtlasError
from atlas.lock import output_lock
from atlas.model.files import DEFAULT_MODEL, hash_weights, resolve
from atlas.stages import STAGES
from atlas.stages.contract import Context
from atlas.store import Store

STORE_NAME = "atlas.duckdb"
SITE_NAME = "site"


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
        check_device(device)
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
        self._lm = None
        # Stage settings to check against the model as soon as it loads, before a stage writes:
        # `build` adds every stage's, so that a --context the model cannot read fails before decode.
        self.settings: list = []

    @property
    def lm(self):
        if self._lm is None:
            from atlas.model.load import load_model           # torch: only once a stage needs the model
            lm = load_model(self.model_spec, self.device, self.dtype)
            for cfg in self.settings:
                check_model_settings(cfg, lm.limits())
            self._lm = lm
        return self._lm

    def _device_type(self) -> str:
        from atlas.model.load import pick_device
        return pick_device(self.device).type

    def run_stage(self, name: str, cfg=None) -> dict:
        """Run one registered stage (``decode``, ``exemplars``, ``cluster``, ``clamp`` ...) on this build."""
        stage = STAGES[name]
        cfg = stage.config() if cfg is None else cfg
        cfg.validate()
        if self._lm is not None:
            check_model_settings(cfg, self._lm.limits())
        elif cfg not in self.settings:
            self.settings.append(cfg)
        with output_lock(self.out), Store(store_path(self.out)) as store:
            ctx = Context(store, stage, self.weights_hash, lambda: self.lm, self._device_type(), self.progress,
                          self.model_spec, self.device, self.dtype)
            return stage.run(ctx, cfg)

    def decode(self, cfg: DecodeConfig = DecodeConfig()) -> dict:
        return self.run_stage("decode", cfg)

    def exemplars(self, cfg: ExemplarConfig = ExemplarConfig()) -> dict:
        return self.run_stage("exemplars", cfg)

    def cluster(self, cfg: ClusterConfig = ClusterConfig()) -> dict:
        return self.run_stage("cluster", cfg)

    def clamp(self, cfg: ClampConfig = ClampConfig()) -> dict:
        return self.run_stage("clamp", cfg)

    def labels(self, cfg: LabelsConfig = LabelsConfig()) -> dict:
        return self.run_stage("labels", cfg)

    def describe(self, cfg: DescribeConfig = DescribeConfig()) -> dict:
        return self.run_stage("describe", cfg)

    def render(self, cfg: RenderConfig | None = None, force: bool = False) -> dict:
        return render_site(self.out, cfg, self.progress, force)


def check_model_settings(cfg, limits: dict) -> None:
    """Run a stage config's ``check_model`` (settings that depend on the model), where it has one."""
    check = getattr(cfg, "check_model", None)
    if check is not None:
        check(**limits)


def render_site(out: str | Path, cfg: RenderConfig | None = None, progress: bool = True,
                force: bool = False) -> dict:
    from atlas.site.render import render

    out = Path(out)
    # A directory that does not exist holds no store: render says so, with nothing to lock.
    with output_lock(out) if out.is_dir() else contextlib.nullcontext():
        return render(store_path(out), out / SITE_NAME, cfg or RenderConfig(), progress=progress, force=force)


def build(out: str | Path, model: str | None = DEFAULT_MODEL, decode: DecodeConfig = DecodeConfig(),
          render: RenderConfig | None = None, exemplars: ExemplarConfig = ExemplarConfig(),
          device: str = "auto", dtype: str = "auto", force: bool = False, progress: bool = True,
          cluster: ClusterConfig = ClusterConfig(), clamp: ClampConfig = ClampConfig(),
          describe: DescribeConfig | None = None, configs: dict | None = None) -> dict:
    """Run every registered stage into ``out`` (``atlas.duckdb`` and ``site/``), resuming where a run stopped.

    ``configs`` maps the name of any other registered stage to its config.
    """
    from atlas.stages.exemplars import check_corpus

    configs = {"decode": decode, "exemplars": exemplars, "cluster": cluster, "clamp": clamp, "describe": describe,
               **(configs or {})}
    configs = {name: configs.get(name) or stage.config() for name, stage in STAGES.items()}
    for cfg in (*configs.values(), render or RenderConfig()):
        cfg.validate()              # bad settings and a bad corpus fail now, not after a stage or two
    check_corpus(configs["exemplars"])
    b = Build(out, model, device, dtype, force, progress)
    b.settings.extend(configs.values())
    with output_lock(b.out):        # held across the stages: a second build is refused, not interleaved
        results = {name: b.run_stage(name, cfg) for name, cfg in configs.items()}
        return {**results, "render": b.render(render, force)}


def describe_dry_run(out: str | Path, cfg: DescribeConfig) -> dict:
    """What ``atlas describe`` would send (requests, tokens), from the store alone: nothing is sent or loaded."""
    from atlas.stages.describe import dry_run

    with Store(store_path(out), read_only=True) as store:
        return dry_run(store.con, cfg)


def describe_check(out: str | Path, cfg: DescribeConfig, device: str = "auto") -> dict:
    """The held-out check of the stored descriptions: own versus shuffled detection scores (``shuffled_check``)."""
    from atlas.stages.describe import shuffled_check

    with output_lock(Path(out)), Store(store_path(out)) as store:
        return shuffled_check(store, cfg, device)
