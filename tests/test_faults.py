"""Crash, version and disk faults injected into real `atlas build` processes on a tiny model.

Kill points: a clean build runs with ``ATLAS_FAULT_TRACE`` and lists every fault point of
every stage (``atlas/faults.py``); points are drawn from that list with a seed, and builds
are SIGKILLed there (``ATLAS_FAULT=<stage>:<n>``) and rerun until they finish. Each chain of
builds kills every stage once, in stage order, so later kills hit a build that is resuming
the stages before. The finished store (every table, every row) and site (every file's
bytes) must equal the clean build's. A new stage takes part by calling ``faults.point``;
the test fails if a stage that ``atlas build`` reports has no points.

``ATLAS_FAULT_SEED`` (default 0) and ``ATLAS_FAULT_KILLS`` (kills per stage, default 2)
choose the points; the run prints how many were tried.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pytest

from atlas.schema import SCHEMA_VERSION
from atlas.store import without_timings
from helpers import BUILD, EPOCH, FAULT_COUNTS, assert_one_line_error, atlas, corpus_file, store_rows

SEED = int(os.environ.get("ATLAS_FAULT_SEED", "0"))
KILLS_PER_STAGE = int(os.environ.get("ATLAS_FAULT_KILLS", "2"))
pytestmark = pytest.mark.faults


# The exported store file is the store itself (compared by content in store_rows); its
# metadata export carries the one build date and the stage timings.
STORE_EXPORTS = {"exports/atlas.duckdb", "exports/atlas_meta.parquet"}


def site_tree(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(site.rglob("*")) if p.is_file()
            and p.relative_to(site).as_posix() not in STORE_EXPORTS}


def assert_same_store(a: Path, b: Path) -> None:
    ra, rb = store_rows(a), store_rows(b)
    assert sorted(ra) == sorted(rb)
    differ = [t for t in ra if ra[t] != rb[t]]
    assert not differ, f"tables that differ: {differ}"


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """The session's tiny llama and a small word corpus."""
    return tiny_model_dir("llama"), corpus_file(tmp_path_factory.mktemp("fault-inputs"), 1000)


@pytest.fixture(scope="module")
def clean(inputs, tmp_path_factory):
    """An uninterrupted build, with the list of fault points it passed."""
    model, corpus = inputs
    root = tmp_path_factory.mktemp("clean")
    trace = root / "trace.txt"
    proc = atlas("build", "--out", root / "out", "--model", model, "--corpus", corpus, *BUILD,
                     env={"ATLAS_FAULT_TRACE": str(trace), "SOURCE_DATE_EPOCH": EPOCH})
    assert proc.returncode == 0, proc.stderr
    points: dict[str, list[str]] = {}              # stage -> the names of its points, in order
    for line in trace.read_text().splitlines():
        stage, _, where = line.split(" ", 2)
        points.setdefault(stage, []).append(where)
    # A stage that had nothing to do says so in a note (describe without an explainer; its own
    # kill test, in tests/stages/test_describe.py, runs it against a server).
    ran = [stage for stage, report in json.loads(proc.stdout).items() if "note" not in report]
    return {"out": root / "out", "stages": ran, "points": points,
            "site": site_tree(root / "out" / "site")}


def _kill_chains(clean) -> list[list[tuple[str, int]]]:
    """KILLS_PER_STAGE chains; chain j kills each stage once, at its j-th drawn point.

    Where a stage has points inside an open transaction ("not committed"), one of them is
    always drawn: a kill there is the one that a store must survive by itself.
    """
    rng = random.Random(SEED)
    drawn = {}
    for stage, names in clean["points"].items():      # stage order: first reached first
        inside = [n for n, where in enumerate(names, 1) if "not committed" in where]
        pick = [rng.choice(inside)] if inside else []
        rest = [n for n in range(1, len(names) + 1) if n not in pick]
        drawn[stage] = pick + rng.sample(rest, min(KILLS_PER_STAGE - len(pick), len(rest)))
        rng.shuffle(drawn[stage])
    return [[(s, drawn[s][j]) for s in drawn if j < len(drawn[s])] for j in range(KILLS_PER_STAGE)]


def test_every_stage_has_fault_points(clean):
    missing = [s for s in clean["stages"] if len(clean["points"].get(s, [])) < 2]
    assert not missing, f"stages with fewer than two fault points (call atlas.faults.point in them): {missing}"


def test_killed_builds_resume_to_the_same_store_and_site(clean, inputs, tmp_path):
    model, corpus = inputs
    chains = _kill_chains(clean)

    def run_chain(j: int) -> list[str]:
        out, problems = tmp_path / f"chain{j}", []
        for stage, n in chains[j]:
            proc = atlas("build", "--out", out, "--model", model, "--corpus", corpus, *BUILD,
                             env={"ATLAS_FAULT": f"{stage}:{n}", "SOURCE_DATE_EPOCH": EPOCH})
            if proc.returncode != -signal.SIGKILL:
                problems.append(f"{stage}:{n} was not killed (exit {proc.returncode}): {proc.stderr[-500:]}")
                continue
            FAULT_COUNTS["kill points"].add((stage, n))
            # Never a half site: after any kill there is no site, or a whole one.
            if (out / "site").exists() and site_tree(out / "site") != clean["site"]:
                problems.append(f"after a kill at {stage}:{n}, {out / 'site'} is neither absent nor whole")
        proc = atlas("build", "--out", out, "--model", model, "--corpus", corpus, *BUILD,
                         env={"SOURCE_DATE_EPOCH": EPOCH})
        if proc.returncode != 0:
            problems.append(f"the build after the kills failed: {proc.stderr[-500:]}")
        return problems

    with ThreadPoolExecutor(2) as pool:            # chains are independent: one per core
        problems = [p for ps in pool.map(run_chain, range(len(chains))) for p in ps]
    assert not problems, problems
    for j in range(len(chains)):
        out = tmp_path / f"chain{j}"
        assert_same_store(out / "atlas.duckdb", clean["out"] / "atlas.duckdb")
        assert site_tree(out / "site") == clean["site"], f"chain {chains[j]}"
        assert sorted(p.name for p in out.iterdir()) == [".atlas.lock", "atlas.duckdb", "exports", "site"], \
            f"temporary files left behind after {chains[j]}"


def test_a_kill_between_the_two_renames_keeps_the_published_site(clean, tmp_path):
    """A re-render killed after moving the old site aside: the next run puts it back, whole."""
    out = tmp_path / "out"
    shutil.copytree(clean["out"], out)
    proc = atlas("render", out, "--layer-preview", 2, "--quiet",
                     env={"ATLAS_FAULT": "render:old site moved aside", "SOURCE_DATE_EPOCH": EPOCH})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    FAULT_COUNTS["kill points"].add(("render", "old site moved aside"))
    assert not (out / "site").exists() and site_tree(out / ".site.old") == clean["site"]
    proc = atlas("render", out, "--quiet")      # the published settings: the old site is current
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["skipped"] is True
    assert site_tree(out / "site") == clean["site"]
    assert sorted(p.name for p in out.iterdir()) == [".atlas.lock", "atlas.duckdb", "exports", "site"]


def _text_without(path: Path, old: str, new: str) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if path.name == "atlas-site.json":         # its input fingerprint covers the date too
        value = json.loads(data)
        value.pop("inputs")
        data = json.dumps(value, sort_keys=True).encode()
    return data.replace(old.encode(), new.encode())


def test_same_inputs_give_the_same_site_byte_for_byte(clean, inputs, tmp_path):
    """A second build, in another process at another time: only the build date may differ.

    The later time is in the same year, because neuron pages cite the atlas with its year."""
    model, corpus = inputs
    proc = atlas("build", "--out", tmp_path / "again", "--model", model, "--corpus", corpus, *BUILD,
                     env={"SOURCE_DATE_EPOCH": str(int(EPOCH) + 3600)})
    assert proc.returncode == 0, proc.stderr
    a, b = clean["out"], tmp_path / "again"
    ra, rb = store_rows(a / "atlas.duckdb"), store_rows(b / "atlas.duckdb")
    assert {t for t in ra if ra[t] != rb[t]} == {"atlas_meta"}
    with duckdb.connect(str(a / "atlas.duckdb"), read_only=True) as ca, \
            duckdb.connect(str(b / "atlas.duckdb"), read_only=True) as cb:
        meta_a = dict(ca.execute("SELECT key, value FROM atlas_meta").fetchall())
        meta_b = dict(cb.execute("SELECT key, value FROM atlas_meta").fetchall())
    date_a, date_b = json.loads(meta_a.pop("created_at")), json.loads(meta_b.pop("created_at"))
    assert date_a != date_b
    assert {k: without_timings(json.loads(v)) for k, v in meta_a.items()} == \
           {k: without_timings(json.loads(v)) for k, v in meta_b.items()}
    tree_a, tree_b = site_tree(a / "site"), site_tree(b / "site")
    assert sorted(tree_a) == sorted(tree_b)
    differ = [rel for rel in tree_a if tree_a[rel] != tree_b[rel]]
    for rel in differ:
        assert date_b in (b / "site" / rel).read_text(encoding="utf-8", errors="replace") or rel.endswith(".gz"), rel
        assert _text_without(a / "site" / rel, date_a, "DATE") == _text_without(b / "site" / rel, date_b, "DATE"), rel
    assert set(differ) <= {"index.html", "atlas-site.json", "sitemap.xml", "sitemap.xml.gz"}, differ


def test_a_second_build_into_the_same_directory_is_refused(inputs, tmp_path):
    model, corpus = inputs
    out = tmp_path / "out"
    first = atlas("decode", "--out", out, "--model", model, "--top-k", 3, "--quiet",
                      env={"ATLAS_FAULT": "decode:1:stop"}, wait=False)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)         # held still inside its decode stage
        assert os.WIFSTOPPED(status), status
        second = atlas("build", "--out", out, "--model", model, "--corpus", corpus, *BUILD)
        assert_one_line_error(second, f"another atlas build is running in {out} (pid {first.pid})")
        assert_one_line_error(atlas("render", out), f"(pid {first.pid})")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    with duckdb.connect(str(out / "atlas.duckdb"), read_only=True) as con:   # the first build was not disturbed
        assert con.execute("SELECT count(*) FROM decoded_tokens").fetchone()[0] == 2 * 48 * 3 * (3 + 10)


def _old_store(path: Path, meta: dict) -> dict[str, str]:
    """A store as an older (or newer) atlas might have left it; returns its rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE atlas_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("CREATE TABLE neurons (layer SMALLINT, neuron INTEGER, label VARCHAR)")
        con.execute("INSERT INTO neurons VALUES (0, 0, 'kept as it was')")
        for k, v in meta.items():
            con.execute("INSERT INTO atlas_meta VALUES (?, ?)", [k, json.dumps(v)])
    return store_rows(path)


@pytest.mark.parametrize("meta, needle", [
    ({"schema_version": 0, "model": {"id": "m"}}, "has store schema v0; this atlas"),
    ({"schema_version": 99, "model": {"id": "m"}}, f"newer than the v{SCHEMA_VERSION}"),
    ({"model": {"id": "m"}}, "has no schema_version"),
])
def test_a_store_of_another_version_is_refused_untouched(inputs, tmp_path, meta, needle):
    model, corpus = inputs
    store = tmp_path / "out" / "atlas.duckdb"
    before = _old_store(store, meta)
    assert_one_line_error(atlas("build", "--out", tmp_path / "out", "--model", model, "--corpus", corpus,
                                    *BUILD), needle, str(store))
    assert_one_line_error(atlas("info", tmp_path / "out"), needle)
    assert store_rows(store) == before


def test_a_registered_migration_upgrades_an_old_store(tmp_path, monkeypatch):
    from atlas import store as store_mod
    from atlas.errors import AtlasError

    path = tmp_path / "atlas.duckdb"
    current = store_mod.SCHEMA_VERSION
    _old_store(path, {"schema_version": current, "model": {"id": "m"}})
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", current + 1)       # a future version, one step ahead
    monkeypatch.setitem(store_mod.MIGRATIONS, current,
                        lambda con: con.execute("UPDATE neurons SET label = 'migrated' WHERE label IS NOT NULL"))
    with pytest.raises(AtlasError, match="run `atlas build` on it once"):
        store_mod.Store(path, read_only=True)
    with store_mod.Store(path) as store:
        assert store.meta("schema_version") == current + 1
        assert store.con.execute("SELECT label FROM neurons").fetchall() == [("migrated",)]


def test_a_v1_store_gets_the_columns_v1_stages_added_on_the_side(tmp_path):
    """Store v1 had clusters.cohesion and the clamp columns only if those stages had run; v2 always has them."""
    from atlas.schema import SCHEMA_VERSION
    from atlas.store import Store

    path = tmp_path / "atlas.duckdb"
    _old_store(path, {"schema_version": 1, "model": {"id": "m"}})
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE clusters (cluster_id INTEGER PRIMARY KEY, size INTEGER, label VARCHAR, x FLOAT, y FLOAT)")
    with Store(path) as store:
        assert store.meta("schema_version") == SCHEMA_VERSION == 9
        cols = {t: {r[0] for r in store.con.execute(f"DESCRIBE {t}").fetchall()} for t in ("neurons", "clusters")}
        assert {"clamp_value", "clamp_lift", "faithfulness"} <= cols["neurons"] and "cohesion" in cols["clusters"]
        assert store.con.execute("SELECT label, faithfulness FROM neurons").fetchall() == [("kept as it was", None)]
        assert store.count("clamp_effects") == 0


def test_a_v2_store_keeps_its_16_token_windows_as_lists(tmp_path):
    """v3 windows are lists of the pass's length; a v2 store's FLOAT[16] rows come through unchanged."""
    from atlas.store import Store

    path = tmp_path / "atlas.duckdb"
    _old_store(path, {"schema_version": 2, "model": {"id": "m"}})
    window = [float(i) for i in range(16)]
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE exemplars (layer SMALLINT, neuron INTEGER, polarity VARCHAR, rank SMALLINT, "
                    "doc_id INTEGER, token_pos INTEGER, activation FLOAT, norm_activation FLOAT, "
                    "window_start INTEGER, window_activations FLOAT[16])")
        con.execute("INSERT INTO exemplars VALUES (0, 0, 'max', 0, 3, 20, 1.5, 1.0, 8, ?)", [window])
    with Store(path) as store:
        assert store.meta("schema_version") == 9
        assert store.con.execute("SELECT window_activations FROM exemplars").fetchall() == [(window,)]
        assert dict(store.con.execute("DESCRIBE exemplars").fetchall()[i][:2] for i in range(10))["window_activations"] == "FLOAT[]"
        assert store.count("exemplar_samples") == 0


def test_a_full_disk_fails_in_one_line_and_a_rerun_finishes(clean, inputs, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past 64 KiB: here the store's first big commit fails."""
    model, corpus = inputs
    out = tmp_path / "out"
    proc = atlas("build", "--out", out, "--model", model, "--corpus", corpus, *BUILD,
                     env={"SOURCE_DATE_EPOCH": EPOCH}, fsize=64 << 10)
    assert_one_line_error(proc, "out of disk space writing the store", "File too large", "rerun to resume")
    assert not (out / "site").exists()
    proc = atlas("build", "--out", out, "--model", model, "--corpus", corpus, *BUILD,
                     env={"SOURCE_DATE_EPOCH": EPOCH})
    assert proc.returncode == 0, proc.stderr
    assert_same_store(out / "atlas.duckdb", clean["out"] / "atlas.duckdb")
    assert site_tree(out / "site") == clean["site"]


def test_a_full_disk_during_render_keeps_the_published_site(clean, inputs, tmp_path):
    model, corpus = inputs
    out = tmp_path / "out"
    shutil.copytree(clean["out"], out)
    rows = store_rows(out / "atlas.duckdb")
    # Another render setting makes the site stale; the exports' copy of the store (7 MB), the first file
    # over 1 MiB that a render writes, cannot be written.
    proc = atlas("build", "--out", out, "--model", model, "--corpus", corpus, *BUILD, "--layer-preview", 2,
                     env={"SOURCE_DATE_EPOCH": EPOCH}, fsize=1 << 20)
    assert_one_line_error(proc, "out of disk space")
    assert site_tree(out / "site") == clean["site"]
    assert store_rows(out / "atlas.duckdb") == rows
    assert sorted(p.name for p in out.iterdir()) == [".atlas.lock", "atlas.duckdb", "exports", "site"]


def _migrated(tmp_path, version: int, setup: list[str], query: str) -> list[tuple]:
    """A store left at schema ``version`` with the tables ``setup`` makes, opened (so migrated to
    the current schema); returns ``query``'s rows."""
    from atlas.store import Store

    path = tmp_path / "atlas.duckdb"
    _old_store(path, {"schema_version": version, "model": {"id": "m"}})
    with duckdb.connect(str(path)) as con:
        for sql in setup:
            con.execute(sql)
    with Store(path) as store:
        assert store.meta("schema_version") == SCHEMA_VERSION
        return store.con.execute(query).fetchall()


def test_a_v3_store_keeps_its_list_scores_and_gains_p_yes(tmp_path):
    """v4 adds description_scores.p_yes (the logprob score's per-context yes); v3 rows keep theirs, with NULL."""
    assert _migrated(tmp_path, 3, [
        "CREATE TABLE description_scores (layer SMALLINT, neuron INTEGER, rank SMALLINT, kind VARCHAR, "
        "doc_id INTEGER, token_pos INTEGER, fits BOOLEAN)",
        "INSERT INTO description_scores VALUES (0, 0, 0, 'held_out', 3, 20, true)"],
        "SELECT kind, fits, p_yes FROM description_scores") == [("held_out", True, None)]


def test_a_v5_stores_clusters_keep_their_labels_and_gain_named_by(tmp_path):
    """v6 records how each cluster was named (clusters.named_by); v5 rows keep theirs, with NULL
    until the labels stage, whose fingerprint changed with it, runs again."""
    assert _migrated(tmp_path, 5, [
        "CREATE TABLE clusters (cluster_id INTEGER PRIMARY KEY, size INTEGER, label VARCHAR, "
        "x FLOAT, y FLOAT, cohesion FLOAT)",
        "INSERT INTO clusters VALUES (0, 3, 'months (2 of 3): month, year', 0.5, -0.5, 0.25)"],
        "SELECT label, size, named_by FROM clusters") == [("months (2 of 3): month, year", 3, None)]


def test_a_v5_stores_scored_contexts_gain_a_null_similarity(tmp_path):
    """v6 also keeps each scored context's cosine with the description (the embedding score's); v5 rows keep theirs."""
    assert _migrated(tmp_path, 5, [
        "CREATE TABLE description_scores (layer SMALLINT, neuron INTEGER, rank SMALLINT, kind VARCHAR, "
        "doc_id INTEGER, token_pos INTEGER, fits BOOLEAN, p_yes FLOAT)",
        "INSERT INTO description_scores VALUES (0, 0, 0, 'random', 3, 20, false, 0.25)"],
        "SELECT kind, fits, p_yes, similarity FROM description_scores") == [("random", False, 0.25, None)]


def test_a_v6_store_gains_an_empty_table_of_the_models_examples(tmp_path):
    """v7 keeps the model's examples of each concept word; a v6 store has none until the labels
    stage, whose fingerprint changed with it, runs again (its labels are kept till then)."""
    assert _migrated(tmp_path, 6, [
        "CREATE TABLE neuron_labels (layer SMALLINT, neuron INTEGER, label VARCHAR, concept VARCHAR, "
        "evidence VARCHAR[], tokens VARCHAR[], method VARCHAR, score FLOAT)",
        "INSERT INTO neuron_labels VALUES (0, 1, 'metal: iron, copper', 'metal', ['iron', 'copper'], ['iron'], "
        "'word vectors', 0.5)"],
        "SELECT label, (SELECT count(*) FROM concept_examples) FROM neuron_labels") == [("metal: iron, copper", 0)]


def test_a_v7_store_gains_an_empty_table_of_the_models_readings_of_other_languages(tmp_path):
    """v8 keeps the model's reading of words of other languages; a v7 store has none until the
    labels stage, whose fingerprint changed with it, runs again (its examples are kept till then)."""
    assert _migrated(tmp_path, 7, [
        "CREATE TABLE concept_examples (word VARCHAR, term VARCHAR, prob FLOAT, rank SMALLINT)",
        "INSERT INTO concept_examples VALUES ('metal', 'iron', 0.25, 0)"],
        "SELECT word, term, (SELECT count(*) FROM concept_translations) FROM concept_examples") == [("metal", "iron", 0)]


def test_a_v8_stores_concept_postings_are_those_of_the_tokens_neurons_write(tmp_path):
    """v9 keeps concept matches of the tokens a neuron fires on beside those of the tokens it writes
    (concept_postings.side); a v8 store's rows were all of the second kind."""
    assert _migrated(tmp_path, 8, [
        "CREATE TABLE concept_postings (word VARCHAR, layer SMALLINT, neuron INTEGER, n_ev SMALLINT, "
        "sim_sum FLOAT, z DOUBLE, rank SMALLINT, evidence VARCHAR)",
        "INSERT INTO concept_postings VALUES ('animal', 29, 611, 3, 0.75, 9.5, 0, 'bird, mammal, monkey')"],
        "SELECT word, evidence, side FROM concept_postings") == [("animal", "bird, mammal, monkey", "out")]
