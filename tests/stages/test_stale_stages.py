"""A stage rerun upstream never silently undoes the stages after it (the decode-rerun defect).

Rerunning ``atlas decode`` with new settings on a finished atlas used to delete every
``neurons`` row (and with them the normalisers, clusters and faithfulness) while the records
of exemplars, cluster and clamp still said done, so the next build skipped them. Now each
stage records the fingerprints of the stages it read: the later stages are reported stale,
render refuses the store, and ``atlas build`` reruns them back to a complete atlas.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import duckdb
import pytest

from atlas.config import ClampConfig, DecodeConfig, ExemplarConfig, LabelsConfig, RenderConfig
from atlas.errors import AtlasError
from atlas.pipeline import Build, build
from atlas.stages import STAGES
from atlas.stages.contract import stale_stages

WORDS = ["dog", "cat", "Paris", "w7", "w8", "w9", "w10", "w11", "w12", "w13"]
EXEMPLARS = ExemplarConfig(context=16, batch_size=4, k=5, attribution_rows=8, checkpoint_every=2)
CLAMP = ClampConfig(clamp_budget=16)
RENDER = RenderConfig(workers=1, exports=False)
LATER = ("exemplars", "cluster", "labels", "clamp")


def _corpus(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(1200)))
    return path


def _build(out, model, corpus, top_k: int) -> dict:
    return build(out, model, DecodeConfig(top_k=top_k, bottom_k=2), RENDER,
                 ExemplarConfig(**{**EXEMPLARS.__dict__, "corpus": str(corpus)}), device="cpu",
                 progress=False, clamp=CLAMP)


def _rows(store) -> dict[str, list]:
    """Every public table but atlas_meta, in a canonical order."""
    with duckdb.connect(str(store), read_only=True) as con:
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()
                  if t not in ("atlas_meta", "stage_progress")]
        return {t: repr(con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()) for t in tables}


def _stale(store) -> dict[str, str]:
    with duckdb.connect(str(store), read_only=True) as con:
        return stale_stages(con, STAGES)


def test_a_decode_rerun_makes_the_later_stages_stale_and_build_restores_them(tmp_path, tiny_model_dir):
    model, corpus = str(tiny_model_dir("llama")), _corpus(tmp_path)
    out = tmp_path / "out"
    first = _build(out, model, corpus, top_k=3)
    assert not any(first[s].get("skipped") for s in STAGES), first
    store = out / "atlas.duckdb"
    assert _stale(store) == {}
    assert _site(out) == {"state": "current"}

    # Decode alone, with another top-k: it replaces every neuron row.
    Build(out, model, device="cpu", progress=False).decode(DecodeConfig(top_k=4, bottom_k=2))
    stale = _stale(store)
    assert set(stale) == set(LATER), stale
    assert "decode changed since it ran" in stale["exemplars"]

    # `atlas info` says so, in words and in JSON.
    info = subprocess.run([sys.executable, "-m", "atlas", "info", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0, info.stderr
    for name in LATER:
        assert any(line.strip().startswith(f"stage {name}:") and "stale" in line for line in info.stdout.splitlines())
    info_json = subprocess.run([sys.executable, "-m", "atlas", "info", str(out), "--json"], capture_output=True,
                               text=True, timeout=120)
    assert set(json.loads(info_json.stdout)["stale"]) == set(LATER)
    # ... and that the site was rendered from the stages before.
    assert json.loads(info_json.stdout)["site"] == {"state": "behind", "changed": ["decode"]}
    assert "site: behind the store (decode changed since it was rendered)" in info.stdout
    assert f"`atlas render {out}` or `atlas build` renders it again" in info.stdout     # a command that runs

    # Render refuses a store whose stages disagree, naming them.
    with pytest.raises(AtlasError, match="stale"):
        Build(out, model, device="cpu", progress=False).render(RENDER, force=True)

    # A build with the new settings reruns every later stage and ends where a clean build does.
    again = _build(out, model, corpus, top_k=4)
    assert again["decode"].get("skipped") and not any(again[s].get("skipped") for s in LATER), again
    assert _stale(store) == {}
    clean = tmp_path / "clean"
    _build(clean, model, corpus, top_k=4)
    assert _rows(store) == _rows(clean / "atlas.duckdb")
    with duckdb.connect(str(store), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM neurons WHERE normaliser IS NULL OR cluster_id IS NULL").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM neurons WHERE clamp_value IS NOT NULL").fetchone()[0] == 16
    assert _site(out) == {"state": "current"}

    # A lone labels rerun stales no stage (render is not one), but the site is now behind the
    # store until it is rendered again: `atlas info` says so rather than "done" alone.
    b = Build(out, model, device="cpu", progress=False)
    b.labels(LabelsConfig(label_exemplars=False))
    assert _stale(store) == {} and _site(out) == {"state": "behind", "changed": ["labels"]}
    assert not b.render(RENDER).get("skipped")
    assert _site(out) == {"state": "current"}


def _site(out) -> dict:
    info = subprocess.run([sys.executable, "-m", "atlas", "info", str(out), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    return json.loads(info.stdout)["site"]


def test_every_stage_declares_registered_inputs_and_only_earlier_ones():
    names = list(STAGES)
    for i, (name, stage) in enumerate(STAGES.items()):
        assert stage.name == name
        assert set(stage.reads) <= set(names[:i]), (name, stage.reads)
