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
from helpers import CFG, atlas, assert_one_line_error, corpus_file, store_rows, tiny_model

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
    assert _rows(b.out) == _rows(root / "one")


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
