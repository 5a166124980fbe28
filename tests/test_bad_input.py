"""The bad-input catalogue: each input gets one `error:` line naming the problem, exit code 2, no traceback.

The first case of each kind (model, corpus, settings, store, address) runs in a real
``python -m atlas`` process, two at a time, so that what a real process prints is checked; the
others run the same entry point in this process (``atlas_here``), where they cost a fraction of a
second instead of the ~1-5 s a process spends importing torch. tests/test_cli.py and
test_exemplars.py hold more cases; all of them are counted at the end of the run.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pytest

from atlas.stages.corpus import MAX_LINE_BYTES, cut_rows
from atlas.stages.decode import DecodeConfig
from atlas.stages.exemplars import ExemplarConfig
from atlas.pipeline import Build
from helpers import BUILD, assert_one_line_error, atlas, atlas_here, corpus_file, store_rows, tiny_tokenizer

pytestmark = pytest.mark.faults


def _gguf(path: Path) -> Path:
    """A small but well-formed GGUF file (header, metadata, two tensors), written with the gguf package."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    w.add_tensor("output.weight", np.ones((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def catalogue(tiny_model_dir, tmp_path_factory):
    """(arguments, words the error line must contain) for every bad input, by kind, with the files they need."""
    root = tmp_path_factory.mktemp("bad")
    model, corpus = tiny_model_dir("llama"), corpus_file(root, 1000)
    out = root / "out"

    def model_copy(name: str) -> Path:
        return Path(shutil.copytree(model, root / name))

    dangling = model_copy("dangling")
    (dangling / "model.safetensors").unlink()
    (dangling / "model.safetensors").symlink_to(root / "gone.safetensors")
    bad_config = model_copy("bad-config")
    (bad_config / "config.json").write_text("{ this is not json")
    cut = model_copy("cut-weights")
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    whole = _gguf(root / "whole.gguf").read_bytes()
    (root / "cut.gguf").write_bytes(whole[:len(whole) * 2 // 3])
    (root / "plain-file").write_text("not a model")

    (root / "blank.txt").write_text(" \n\t\n ")
    (root / "no-text").mkdir()
    (root / "no-text" / "image.png").write_bytes(b"\x89PNG")
    (root / "utf16.txt").write_bytes("dog cat Paris".encode("utf-16"))
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 10)
    (root / "one-line.txt").write_bytes(b"dog " * (MAX_LINE_BYTES // 4 + 1))
    (root / "one-line.jsonl").write_text('{"text": "dog"}\n' + json.dumps({"text": "dog " * (MAX_LINE_BYTES // 4)}))

    (root / "store-is-dir" / "atlas.duckdb").mkdir(parents=True)
    with duckdb.connect(str(root / "foreign.duckdb")) as con:
        con.execute("CREATE TABLE accounts (id INTEGER, owner VARCHAR)")
        con.execute("INSERT INTO accounts VALUES (1, 'someone else')")

    Build(out, str(model), progress=False).decode(DecodeConfig(top_k=3, bottom_k=2))   # 2 layers x 48 neurons
    build = ["build", "--out", root / "new", "--model", model, *BUILD]
    cases = {
        # each into an output of its own: the real processes run two at a time
        "model": [
            (["decode", "--out", root / "o1", "--model", dangling], ["cannot read model file", "gone.safetensors"]),
            (["decode", "--out", root / "o2", "--model", bad_config], ["could not load model", "bad-config"]),
            (["decode", "--out", root / "o3", "--model", cut], ["could not load model", "cut-weights"]),
            (["decode", "--out", root / "o4", "--model", root / "cut.gguf"], ["cut.gguf is truncated", "tensors need"]),
            (["decode", "--out", root / "o5", "--model", root / "plain-file"],
             ["neither a model directory nor a .gguf file"])],
        # refused before any model loads
        "corpus": [
            (build + ["--corpus", root / "blank.txt"], ["blank.txt is empty"]),
            (build + ["--corpus", root / "no-text"], ["holds no text files"]),
            (build + ["--corpus", root / "utf16.txt"], ["utf16.txt is UTF-16", "iconv"]),
            (build + ["--corpus", root / "binary.txt"], ["binary.txt is binary"]),
            (build + ["--corpus", root / "latin1.txt"], ["latin1.txt is not UTF-8", "offset 3"]),
            (build + ["--corpus", root / "one-line.txt"], ["has a line of 4,194,308 bytes (line 1"]),
            (build + ["--corpus", root / "one-line.jsonl"], ["one-line.jsonl has a line of", "(line 2"])],
        "settings": [
            (build + ["--corpus", corpus, "--max-tokens", 0], ["--max-tokens 0", "'all' for the whole corpus"]),
            (build + ["--corpus", corpus, "--max-tokens", -3], ["--max-tokens -3"]),
            (build + ["--corpus", corpus, "--max-tokens", "lots"], ["'lots' is neither a number nor 'all'"]),
            (build + ["--corpus", corpus, "--top-k", 0], ["--top-k and --bottom-k must be at least 1"]),
            (["build", "--out", root / "new", "--colour", "red"], ["No such option", "--colour"]),
            (["decode", "--model", model], ["Missing option '--out'"])],
        "store": [
            (["decode", "--out", root / "store-is-dir", "--model", model], ["cannot open store", "store-is-dir"]),
            (["info", root / "foreign.duckdb"], ["is not an atlas store (no atlas_meta table)"]),
            (["decode", "--out", root / "foreign.duckdb", "--model", model], ["is a file, not a directory"])],
        "neuron address": [
            (["info", out, "--neuron", "2/0"], ["neuron L2/N0 is out of range: the atlas has layers 0 to 1"]),
            (["info", out, "--neuron", "L1/N48"], ["neuron L1/N48 is out of range: layer 1 has neurons 0 to 47"]),
            (["info", out, "--neuron", "0/-1"], ["neuron L0/N-1 is out of range"]),
            (["info", out, "--neuron", "seven"], ["cannot read neuron address 'seven'"])],
    }
    return {"root": root, "out": out, "cases": cases, "foreign": store_rows(root / "foreign.duckdb")}


def test_every_bad_input_gets_one_line_and_exit_code_2(catalogue):
    real = [kind[0] for kind in catalogue["cases"].values()]
    here = [case for kind in catalogue["cases"].values() for case in kind[1:]]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda case: atlas(*case[0]), real))
    cases = real + here
    procs += [atlas_here(*args) for args, _ in here]
    failures = []
    for (args, needles), proc in zip(cases, procs):
        try:
            assert_one_line_error(proc, *needles)
        except AssertionError as e:
            failures.append(f"{' '.join(map(str, args[:4]))}: {e}")
    assert not failures, "\n".join(failures)
    root = catalogue["root"]
    assert not (root / "new").exists()                     # corpus and settings fail before any output
    assert store_rows(root / "foreign.duckdb") == catalogue["foreign"]     # another program's file: untouched


def test_a_good_address_and_all_tokens(catalogue):
    proc = atlas_here("info", catalogue["out"], "--neuron", "neurons/1/47", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["page"] == "neurons/1/47/"
    # `--max-tokens all` reads the whole corpus; a cap stops at whole inputs below it.
    from atlas.cli import IntOrAll

    assert IntOrAll().convert("all", None, None) is None and IntOrAll().convert("64", None, None) == 64
    ExemplarConfig(max_tokens=None).validate()
    docs = [("a", "dog cat " * 100)]
    assert sum(len(r.token_ids) for r in cut_rows(docs, tiny_tokenizer(), 16, None)) == 13 * 16
    assert sum(len(r.token_ids) for r in cut_rows(docs, tiny_tokenizer(), 16, 64)) == 64
