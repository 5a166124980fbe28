"""Cluster stage: clusters tighter inside than across, a repeatable layout, exact neighbours, the site."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from atlas.stages.cluster import ClusterConfig, cluster_store, compute_geometry, unit_directions
from atlas.config import RenderConfig
from atlas.site.render import render
from atlas.site.neuron_json import load as load_neuron, table_rows
from atlas.bench.synthetic import make_synthetic_store, synthetic_directions

from helpers import parse, resolve


# These tests check the `out`-direction geometry, so k-means groups `out` directions here;
# the default grouping by term profiles is tested in tests/site/test_concepts.py.
OUT = ClusterConfig(cluster_on="out")


def _rows(path: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """A tiny llama decoded and clustered through the Python API; also its `out` directions."""
    from atlas.pipeline import Build

    model_dir = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("atlas")
    b = Build(out, model=str(model_dir), device="cpu", progress=False)
    b.decode()
    result = b.cluster(OUT)
    directions = torch.cat([b.lm.adapter.direction(b.lm.model, layer, "out")
                            for layer in range(b.lm.adapter.n_layers(b.lm.model))]).float()
    return {"out": out, "store": out / "atlas.duckdb", "result": result, "build": b, "model_dir": model_dir,
            "V": torch.nn.functional.normalize(directions, dim=1)}


def test_every_neuron_has_a_cluster_and_a_place(built):
    n, placed = _rows(built["store"], "SELECT count(*), count(cluster_id) + count(x) + count(y) FROM neurons")[0]
    assert n == 2 * 48 and placed == 3 * n
    sizes = _rows(built["store"], "SELECT cluster_id, size FROM clusters ORDER BY cluster_id")
    assert [c for c, _ in sizes] == list(range(len(sizes))) and sum(s for _, s in sizes) == n
    assert all(a >= b for (_, a), (_, b) in zip(sizes, sizes[1:]))             # numbered by size
    counted = _rows(built["store"], "SELECT cluster_id, count(*) FROM neurons GROUP BY ALL ORDER BY 1")
    assert counted == sizes
    assert _rows(built["store"], "SELECT count(*) FROM clusters WHERE x IS NULL OR y IS NULL")[0][0] == 0


def test_clusters_are_more_similar_inside_than_across(built):
    V = built["V"]
    cos = (V @ V.T).numpy().astype(np.float64)
    rows = _rows(built["store"], "SELECT cluster_id FROM neurons ORDER BY layer, neuron")
    cluster = np.array([r[0] for r in rows])
    same = cluster[:, None] == cluster[None, :]
    off_diagonal = ~np.eye(len(cluster), dtype=bool)
    within, across = cos[same & off_diagonal].mean(), cos[~same].mean()
    assert within > across + 0.1, (within, across)
    stats = built["result"]
    assert stats["within_cosine"] == pytest.approx(within, abs=1e-5)         # the O(n d) formula is exact
    assert stats["across_cosine"] == pytest.approx(across, abs=1e-5)
    for cid, cohesion in _rows(built["store"], "SELECT cluster_id, cohesion FROM clusters"):
        members = cluster == cid
        if members.sum() > 1:
            block = cos[np.ix_(members, members)]
            assert cohesion == pytest.approx((block.sum() - np.trace(block)) / (members.sum() * (members.sum() - 1)),
                                             abs=1e-4)


def test_planted_families_are_found():
    X, layer, neuron, _ = unit_directions(synthetic_directions(4, 64, 64, seed=3, families=8))
    g = compute_geometry(X, layer, neuron, ClusterConfig(n_clusters=8))
    assert g.stats["within_cosine"] > 0.4 and abs(g.stats["across_cosine"]) < 0.1
    # Every cluster is (almost) one family: its members' nearest neighbours share its cluster.
    same = (g.cluster[g.nb_index] == g.cluster[:, None]).mean()
    assert same > 0.95


def test_neighbours_are_the_exact_top_k_by_cosine(built):
    V = built["V"]
    cos = V @ V.T
    cos.fill_diagonal_(-math.inf)
    want = cos.topk(10, dim=1)
    got = _rows(built["store"], "SELECT layer, neuron, rank, nb_layer, nb_neuron, cosine FROM neighbours "
                                "ORDER BY layer, neuron, rank")
    assert len(got) == len(V) * 10
    d_mlp = 48
    for layer, n, rank, nb_layer, nb_neuron, c in got:
        i = layer * d_mlp + n
        assert nb_layer * d_mlp + nb_neuron == int(want.indices[i, rank])
        assert c == pytest.approx(float(want.values[i, rank]), abs=1e-5)


def test_layout_and_clusters_repeat_exactly(built, tmp_path):
    from atlas.pipeline import Build

    b = Build(tmp_path, model=str(built["model_dir"]), device="cpu", progress=False)
    b.decode()
    b.cluster(OUT)
    for sql in ("SELECT layer, neuron, cluster_id, x, y FROM neurons ORDER BY layer, neuron",
                "SELECT * FROM clusters ORDER BY cluster_id",
                "SELECT * FROM neighbours ORDER BY layer, neuron, rank"):
        assert _rows(tmp_path / "atlas.duckdb", sql) == _rows(built["store"], sql), sql


def test_rerun_skips_and_new_exemplars_only_relabel(built, tmp_path):
    import shutil

    from atlas.pipeline import Build
    from atlas.store import Store

    assert built["build"].cluster(OUT) == {"skipped": True}
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copyfile(built["store"], out / "atlas.duckdb")
    # Exemplars whose token is " Paris" for every member of cluster 0.
    with Store(out / "atlas.duckdb") as store:
        paris = store.con.execute("SELECT token_id FROM vocab WHERE token = ' Paris'").fetchone()[0]
        store.con.execute("INSERT INTO corpus_docs VALUES (0, 'test', 'x Paris', [1, ?])", [paris])
        store.con.execute("""INSERT INTO exemplars (layer, neuron, polarity, rank, doc_id, token_pos, activation)
                             SELECT layer, neuron, 'max', 0, 0, 1, 1.0 FROM neurons WHERE cluster_id = 0""")
        store.set_meta("stage.exemplars", {"status": "done", "fingerprint": "test"})
        before = store.con.execute("SELECT cluster_id, x, y FROM neurons ORDER BY ALL").fetchall()
    b = Build(out, model=str(built["model_dir"]), device="cpu", progress=False)
    result = b.cluster(OUT)
    assert result["relabelled"] is True
    assert b._lm is None                                                       # the model was never loaded
    with Store(out / "atlas.duckdb", read_only=True) as store:
        assert store.con.execute("SELECT cluster_id, x, y FROM neurons ORDER BY ALL").fetchall() == before
        label = store.con.execute("SELECT label FROM clusters WHERE cluster_id = 0").fetchone()[0]
    assert label.split(" · ")[0] == "Paris"


def test_inverted_file_search_reports_its_recall():
    X, layer, neuron, _ = unit_directions(synthetic_directions(4, 64, 64, seed=1, families=8))
    g = compute_geometry(X, layer, neuron, ClusterConfig(n_clusters=16, neighbour_probe=4))
    search = g.stats["neighbour_search"]
    assert search["search"] == "inverted file" and search["probe"] == 4
    assert search["recall_at_k"] > 0.8
    exact = compute_geometry(X, layer, neuron, ClusterConfig(n_clusters=16))
    hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(g.nb_index, exact.nb_index)])
    assert hits == pytest.approx(search["recall_at_k"], abs=0.1)             # the sample tells the truth


def test_cli_cluster_has_help_with_an_example():
    from click.testing import CliRunner

    from atlas.cli import main

    result = CliRunner().invoke(main, ["cluster", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--n-clusters" in result.output
    result = CliRunner().invoke(main, ["build", "--help"])
    assert "--neighbours" in result.output


# -- the site ---------------------------------------------------------------------------------
N_LAYERS, D_MLP = 3, 64


@pytest.fixture(scope="module")
def clustered_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clustered")
    store = make_synthetic_store(root / "atlas.duckdb", N_LAYERS, D_MLP, vocab_size=512, clusters=True)
    render(store, root / "site", RenderConfig(workers=1), progress=False)
    return root / "site"


def test_site_has_map_cluster_pages_and_neuron_sections(clustered_site):
    site, store = clustered_site, clustered_site.parent / "atlas.duckdb"
    k = _rows(store, "SELECT count(*) FROM clusters")[0][0]
    scatter = site / "assets/atlas-scatter.js"          # the map's own renderer; no chart library is copied
    assert scatter.read_bytes() == (Path(__file__).parents[2] / "site_templates/assets" / scatter.name).read_bytes()
    assert not (site / "assets/plotly.min.js").exists()
    assert len(list(site.glob("clusters/*/index.html"))) == k
    assert "map/" in parse((site / "index.html").read_text()).hrefs
    method = (site / "method/index.html").read_text()
    assert 'id="clusters"' in method and "-0.0000" not in method
    page = site / "neurons/1/5/index.html"
    hrefs = parse(page.read_text()).hrefs
    cid = _rows(store, "SELECT cluster_id FROM neurons WHERE layer = 1 AND neuron = 5")[0][0]
    assert f"../../../clusters/{cid}/" in hrefs
    nbs = _rows(store, "SELECT nb_layer, nb_neuron FROM neighbours WHERE layer = 1 AND neuron = 5 ORDER BY rank")
    # The page has the section; atlas-neuron.js draws the links from the JSON (test_neuron_browser).
    assert len(nbs) == 10 and 'id=neighbours' in page.read_text() and "#neighbours" in hrefs
    data = load_neuron(site / "neurons/1/5.json")
    assert [(r["nb_layer"], r["nb_neuron"]) for r in table_rows(data, "neighbours")] == nbs
    for p in [page, site / "map/index.html", site / "clusters/index.html", site / f"clusters/{cid}/index.html"]:
        for href in parse(p.read_text()).hrefs:
            target = resolve(p, href)
            assert target is None or target.is_file(), (p, href)
    members = parse((site / f"clusters/{cid}/index.html").read_text()).hrefs
    assert "../../neurons/1/5/" in members


def test_map_data_is_parallel_arrays_with_escaped_text(clustered_site):
    site = clustered_site
    for layer in range(N_LAYERS):
        raw = (site / f"map/points/{layer}.json").read_text()
        assert "<" not in raw and ">" not in raw                               # safe inside any HTML context
        data = json.loads(raw)
        assert {len(v) for v in data.values()} == {D_MLP}
        assert all(isinstance(x, float) for x in data["x"])
    labels = json.loads((site / "map/points/0.json").read_text())["label"]
    assert labels[0] == "<script>alert(1)</script>"                            # the text itself, for JS to escape
    page = (site / "map/index.html").read_text()
    assert "<script>alert" not in page and "\u202e" not in page


def test_a_store_without_clusters_renders_without_the_map(tmp_path):
    store = make_synthetic_store(tmp_path / "atlas.duckdb", 1, 4, vocab_size=256)
    render(store, tmp_path / "site", progress=False)
    assert not (tmp_path / "site/map").exists() and not (tmp_path / "site/clusters").exists()
    assert "clusters/" not in (tmp_path / "site/neurons/0/1/index.html").read_text()
    assert "map/" not in parse((tmp_path / "site/index.html").read_text()).hrefs


def test_cluster_store_refuses_a_store_without_decode(tmp_path):
    from atlas.errors import AtlasError
    from atlas.stages import STAGES
    from atlas.stages.contract import Context
    from atlas.store import Store

    with Store(tmp_path / "atlas.duckdb") as store:
        ctx = Context(store, STAGES["cluster"], "sha256:0", get_lm=None, progress=False)
        with pytest.raises(AtlasError, match="decode"):
            cluster_store(ctx, ClusterConfig(), lambda: synthetic_directions(1, 4, 8))


def test_a_tiny_negative_mean_cosine_is_printed_as_zero():
    """The default atlas's across-cluster mean cosine is about -3e-6: the method page said "-0.0000"."""
    from atlas.site.clusters import _shown

    assert f"{_shown(-3e-6):.4f}" == "0.0000" and f"{_shown(-0.00006):.4f}" == "-0.0001"
    assert _shown(0.123456) == 0.1235 and _shown(None) is None
