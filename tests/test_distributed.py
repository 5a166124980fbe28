"""The corpus pass and the clamp check on Ray: the same rows as one process for 1 and 2 workers,
a worker SIGKILLed mid-pass, a worker with other weights, and the import rule for Ray.

Every test joins the session's local cluster (``ray_cluster``, 2 CPUs) and the workers it
starts are kept for the session, so the model loads once per worker.
"""

from __future__ import annotations

import shutil

import duckdb
import pytest
import torch

from atlas.config import ClampConfig, ClusterConfig, ExemplarConfig
from atlas.errors import AtlasError
from atlas.pipeline import Build
from atlas.stages.decode import DecodeConfig
from helpers import CFG, FAULT_COUNTS, atlas, assert_one_line_error, corpus_file, store_rows, tiny_model

CLAMP = dict(clamp_budget=40, clamp_batch=4)          # 40 neurons: 3 shards of 4 batches of 4


def _rows(out) -> dict[str, str]:
    """Every table ORDER BY ALL; atlas_meta without the stage records' config (which holds --ray)."""
    rows = store_rows(out / "atlas.duckdb")
    assert "exemplars" in rows and "clamp_effects" in rows
    with duckdb.connect(str(out / "atlas.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM exemplars").fetchone()[0] > 0
        assert con.execute("SELECT count(*) FROM clamp_effects").fetchone()[0] > 0
    rows.pop("atlas_meta")
    return rows


@pytest.fixture(scope="module")
def clustered(tiny_model_dir, tmp_path_factory):
    """A tiny store with decode done, and its corpus: what the pass and the check start from."""
    root = tmp_path_factory.mktemp("ray")
    b = Build(root / "base", str(tiny_model_dir("llama")), progress=False)
    b.decode(DecodeConfig(top_k=3, bottom_k=2))
    return root, corpus_file(root, n_words=4000)


def _build(root, name, model, corpus, **ray) -> Build:
    """Exemplars, cluster and clamp into a copy of the base store; without ``ray`` in this process,
    with one torch thread like each worker (on a CPU, float results depend on the thread count)."""
    shutil.copytree(root / "base", root / name)
    b = Build(root / name, model, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b.exemplars(ExemplarConfig(corpus=str(corpus), quantile=0.01, **CFG, **ray))
        b.cluster(ClusterConfig())
        b.clamp(ClampConfig(**CLAMP, **ray))
    finally:
        torch.set_num_threads(threads)
    return b


def test_one_and_two_workers_give_the_one_process_store(ray_cluster, clustered, tiny_model_dir):
    root, corpus = clustered
    model = str(tiny_model_dir("llama"))
    one = _build(root, "one", model, corpus)
    expected = _rows(one.out)
    for n in (2, 1):                                       # the 1-worker run reuses a worker
        b = _build(root, f"ray{n}", model, corpus, ray="auto", ray_workers=n)
        got = _rows(b.out)
        assert got.keys() == expected.keys()
        for table in expected:
            assert got[table] == expected[table], f"{n} worker(s): table {table} differs"
    # The pass ran in shards (every 2 batches here): more than one per worker.
    with duckdb.connect(str(one.out / "atlas.duckdb"), read_only=True) as con:
        docs = con.execute("SELECT count(*) FROM corpus_docs").fetchone()[0]
    assert docs > 4 * CFG["batch_size"] * CFG["checkpoint_every"]


def test_a_worker_killed_mid_pass_is_retried_and_counted_once(ray_cluster, clustered, tiny_model_dir,
                                                               monkeypatch, tmp_path):
    root, corpus = clustered
    model = str(tiny_model_dir("llama"))
    if not (root / "one").exists():
        _build(root, "one", model, corpus)
    once = tmp_path / "killed"
    # The first worker to reach its second batch of a shard SIGKILLs itself; Ray restarts it
    # and reruns that shard on it (the driver forwards ATLAS_FAULT* to its workers).
    monkeypatch.setenv("ATLAS_FAULT", "exemplars:shard batch 2")
    monkeypatch.setenv("ATLAS_FAULT_ONCE", str(once))
    b = _build(root, "killed", model, corpus, ray="auto", ray_workers=2)
    assert once.exists()                                  # a worker did die
    FAULT_COUNTS["kill points"].add("exemplars:shard batch 2 (a Ray worker)")
    assert _rows(b.out) == _rows(root / "one")


def test_bench_prints_tokens_per_second_and_scaling_for_each_worker_count(ray_cluster, tiny_model_dir):
    """`atlas bench corpus --ray 1,2` on the tiny model (before the next test, which ends these workers)."""
    from atlas.bench.scaling import bench_corpus_ray

    r = bench_corpus_ray([1, 2], str(tiny_model_dir("llama")), batches=8, batch_size=4, context=16)
    assert [run["workers"] for run in r["runs"]] == [1, 2] and r["tokens"] == 8 * 4 * 16
    assert r["runs"][0]["efficiency"] == pytest.approx(1.0)
    assert all(run["tokens_per_s"] > 0 and run["seconds"] > 0 for run in r["runs"])
    assert r["shards"] == 8 and r["state_mb"] > 0 and len(r["load_average"]["before"]) == 3


def test_a_worker_with_other_weights_fails_the_run_in_one_line(ray_cluster, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    b = Build(tmp_path / "out", str(model), progress=False)
    b.decode(DecodeConfig(top_k=3, bottom_k=2))
    torch.manual_seed(1)
    tiny_model("llama").save_pretrained(model)            # other random weights under the same name
    with pytest.raises(AtlasError, match=r"cannot take part: it loaded weights sha256:.*not the driver's"):
        b.exemplars(ExemplarConfig(corpus=str(corpus_file(tmp_path)), **CFG, ray="auto", ray_workers=1))


def test_bad_ray_settings_fail_in_one_line(tmp_path):
    assert_one_line_error(atlas("exemplars", "--out", tmp_path, "--ray", "not an address"), "--ray")
    assert_one_line_error(atlas("clamp", "--out", tmp_path, "--ray-workers", "-1"), "--ray-workers")


@pytest.mark.slow
def test_the_default_model_on_two_workers_gives_the_one_process_rows(ray_cluster, default_atlas, tmp_path):
    """The embedded default model on a small corpus slice: one process (one thread), then 2 workers.

    Decode comes from the session's default atlas (copied); the driver's model is loaded once
    and serves both runs: between them the pass's record is removed, as if it never finished.
    """
    shutil.copy(default_atlas / "atlas.duckdb", tmp_path / "atlas.duckdb")
    b = Build(tmp_path, progress=False)
    cfg = dict(max_tokens=1024, batch_size=2, checkpoint_every=1, attribution_rows=4)   # 8 inputs: 4 shards
    # Attribution runs in the driver in both runs, and its sums depend on the driver's thread
    # count (2 threads against 1 moved 361,246 attributions by ~1e-6 here): one thread both times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b.exemplars(ExemplarConfig(**cfg))
        shutil.copy(tmp_path / "atlas.duckdb", tmp_path / "one.duckdb")
        with duckdb.connect(str(tmp_path / "atlas.duckdb")) as con:
            con.execute("DELETE FROM atlas_meta WHERE key = 'stage.exemplars'")
        b.exemplars(ExemplarConfig(**cfg, ray="auto", ray_workers=2))
    finally:
        torch.set_num_threads(threads)
    with duckdb.connect(str(tmp_path / "atlas.duckdb"), read_only=True) as con:
        con.execute(f"ATTACH '{tmp_path / 'one.duckdb'}' AS one (READ_ONLY)")
        assert con.execute("SELECT count(*) FROM corpus_docs").fetchone()[0] == 8
        for table in ("corpus_docs", "exemplars", "attributions", "histograms", "neurons"):
            # Set difference both ways (DuckDB's EXCEPT ALL counts duplicates; NaN equals NaN).
            differ = con.execute(f"SELECT count(*) FROM ((SELECT * FROM {table} EXCEPT ALL SELECT * FROM one.{table})"
                                 f" UNION ALL (SELECT * FROM one.{table} EXCEPT ALL SELECT * FROM {table}))").fetchone()[0]
            assert differ == 0, f"table {table}: {differ} rows differ"
