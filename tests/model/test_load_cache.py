"""The converted copy of a GGUF model (atlas.model.load.gguf_cache_dir) is the same model as the file."""

from __future__ import annotations

import pytest
import torch

from atlas.model.files import embedded_model_path
from atlas.model.load import CACHE_ENV, SOURCE_FILE, gguf_cache_dir, load_model, pick_device, pick_dtype

pytestmark = pytest.mark.slow


def _same(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.describe() == b.describe() and a.weights_hash() == b.weights_hash()
    text = "The Brown Corpus, 1961: a dog, three cats and \u00e9t\u00e9 \u2014 def f(x): return x ** 2\n"
    assert a.tokenizer(text).input_ids == b.tokenizer(text).input_ids
    assert a.tokenizer.convert_ids_to_tokens(list(range(len(a.tokenizer)))) == \
        b.tokenizer.convert_ids_to_tokens(list(range(len(b.tokenizer))))


def test_a_damaged_copy_is_made_again_and_the_copy_is_the_gguf_model(default_lm, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    copy = gguf_cache_dir(embedded_model_path(), pick_dtype("auto", pick_device("cpu")))
    copy.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE):
        (copy / name).write_text("damaged")
    from_file = load_model(device="cpu")         # the copy fails, is removed, the file is read, a new copy kept
    assert (copy / "config.json").read_text() != "damaged" and (copy / "model.safetensors").stat().st_size > 10**8
    from_copy = load_model(device="cpu")
    _same(from_file, from_copy)
    _same(from_file, default_lm)                 # the session's model, from its own copy or the file
    assert [p.name for p in tmp_path.iterdir()] == [copy.name]     # no half-written folder left
