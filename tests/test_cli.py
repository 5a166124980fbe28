"""Bad input gets one line naming the problem and exit code 2, never a traceback.

Most cases run the CLI in this process (``atlas_here``): their point is the message, and a
``python -m atlas`` process would spend ~5 s importing torch for it. A real process keeps one
case of each kind, where what a process prints matters: a missing model, an unwritable output,
a file that is not a store, and ``--debug``'s traceback.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import assert_one_line_error, atlas, atlas_here, tiny_config


def test_missing_model_path(tmp_path):
    assert_one_line_error(atlas("decode", "--out", tmp_path / "o", "--model", tmp_path / "nope"),
                          "model path not found", "nope")


def test_missing_gguf_and_truncated_gguf(tmp_path):
    assert_one_line_error(atlas_here("decode", "--out", tmp_path / "o", "--model", tmp_path / "x.gguf"),
                          "model file not found")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    assert_one_line_error(atlas_here("decode", "--out", tmp_path / "o", "--model", bad), "could not load model")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    assert_one_line_error(atlas_here("decode", "--out", tmp_path / "o", "--model", tmp_path / "m"),
                          "not a Hugging Face model directory")


def test_unsupported_architecture(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config("opt")).save_pretrained(tmp_path / "opt")
    assert_one_line_error(atlas_here("decode", "--out", tmp_path / "o", "--model", tmp_path / "opt"),
                          "unsupported architecture 'opt'")


def test_output_that_is_a_file(tmp_path, tiny_model_dir):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(atlas_here("build", "--out", tmp_path / "file", "--model", tiny_model_dir("llama")),
                          "is a file, not a directory")


def test_unwritable_output(tmp_path, tiny_model_dir):
    import os
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file is unwritable for everyone.
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "sub"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "sub"
    assert_one_line_error(atlas("build", "--out", target, "--model", tiny_model_dir("llama")),
                          "cannot write to output directory")


def test_info_and_render_without_a_store(tmp_path):
    assert_one_line_error(atlas_here("info", tmp_path), "no atlas store")
    assert_one_line_error(atlas_here("render", tmp_path), "no atlas store")


def test_not_a_duckdb_file(tmp_path):
    (tmp_path / "atlas.duckdb").write_text("hello")
    assert_one_line_error(atlas("info", tmp_path), "atlas.duckdb")


def test_debug_shows_the_traceback(tmp_path):
    proc = atlas("--debug", "decode", "--out", tmp_path / "o", "--model", tmp_path / "nope")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


@pytest.mark.parametrize("command", ["build", "decode", "render", "serve", "info", "bench", "search", "publish"])
def test_every_command_has_help_with_an_example(command):
    proc = atlas_here(command, "--help")
    assert proc.returncode == 0 and "Example" in proc.stdout


def test_the_command_line_and_the_renderer_start_without_torch():
    """torch takes a second or more to import: `atlas search`, `serve`, help and render's page
    workers (fresh processes) must not pay it."""
    code = ("import sys, atlas.cli, atlas.site.render, atlas.site.neuron_pages, atlas.site.clamp_sections, atlas.site.search, atlas.site.search_query, atlas.site.serve, atlas.publish.git; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_build_then_info_on_a_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "atlas"
    proc = atlas_here("decode", "--out", out, "--model", tiny_model_dir("gpt_neox"), "--quiet", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    info = atlas_here("info", out)
    assert info.returncode == 0
    assert "2 layers x 48 neurons" in info.stdout and "neurons: 96 rows" in info.stdout
    assert "stage decode: done" in info.stdout


def test_an_in_process_run_leaves_the_process_as_it_was(tmp_path, tiny_model_dir):
    """A decode here sets transformers' verbosity and flushes denormals; atlas_here puts them back,
    so that the tests after it see the process they would see alone."""
    import logging
    import os
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    def state():
        loggers = {name: (lg.level, tuple(lg.handlers), lg.propagate) for name, lg in
                   logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
        return (loggers, tuple(logging.getLogger().handlers), hf_logging.get_verbosity(),
                hf_logging.is_progress_bar_enabled(), torch.tensor([1e-39]).mul(1.0).item(),
                torch.get_num_threads(), environ(), os.getcwd(), sys.argv[:], warnings.filters[:])

    def environ():
        # torch names its compile cache the first time a thread of it asks, whoever ran before.
        return {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}

    before = state()
    proc = atlas_here("decode", "--out", tmp_path / "o", "--model", tiny_model_dir("llama"), "--quiet",
                      env={"ATLAS_TEST_VAR": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    after = state()
    assert {name: after[0][name] for name in before[0]} == before[0]      # loggers made by the run may stay
    assert after[1:] == before[1:]
