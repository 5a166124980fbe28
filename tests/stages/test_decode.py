"""The decode stage against a brute-force computation of the definition, on tiny saved models."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch
from scipy import stats as sps

from atlas.stages import decode as decode_mod
from atlas.stages.decode import DecodeConfig
from atlas.stages.decode_kernel import Unembedding, decode_directions
from atlas.errors import AtlasError
from atlas.pipeline import Build
from atlas.store import Store


def _brute_force(lm, layer: int, side: str) -> np.ndarray:
    """logits = W_U (g_final * v), written out from the model's own modules."""
    m = lm.model
    if m.config.model_type == "gpt2":
        blk, g_f, W_U = m.transformer.h[layer], m.transformer.ln_f.weight, m.lm_head.weight
        v = {"in": blk.mlp.c_fc.weight.T * blk.ln_2.weight, "out": blk.mlp.c_proj.weight}[side]
    else:
        blk, g_f, W_U = m.model.layers[layer], m.model.norm.weight, m.lm_head.weight
        g = blk.post_attention_layernorm.weight
        v = {"in": blk.mlp.up_proj.weight * g, "gate": blk.mlp.gate_proj.weight * g,
             "out": blk.mlp.down_proj.weight.T}[side]
    return ((v.detach() * g_f.detach()).double() @ W_U.detach().double().T).numpy()   # [d_mlp, vocab]


def _rows(store_path, where: str = "") -> list:
    with duckdb.connect(str(store_path), read_only=True) as con:
        return con.execute(f"SELECT * FROM decoded_tokens {where} ORDER BY ALL").fetchall()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_matches_definition(tiny_model_dir, tmp_path, arch):
    b = Build(tmp_path / "out", str(tiny_model_dir(arch)), progress=False)
    cfg = DecodeConfig(top_k=5, bottom_k=3)
    result = b.decode(cfg)
    assert result["neurons"] == 2 * 48
    with Store(b.out / "atlas.duckdb", read_only=True) as store:
        con = store.con
        assert store.count("neurons") == 96
        for layer in range(2):
            for side in b.lm.adapter.sides:
                logits = _brute_force(b.lm, layer, side)
                got = con.execute("""SELECT neuron, polarity, rank, token_id, logit, prob FROM decoded_tokens
                                     WHERE layer = ? AND side = ? ORDER BY ALL""", [layer, side]).fetchall()
                assert len(got) == 48 * 8
                lse = np.log(np.exp(logits).sum(1))
                for neuron, polarity, rank, token_id, logit, prob in got:
                    order = np.argsort(-logits[neuron] if polarity == "top" else logits[neuron], kind="stable")
                    assert logits[neuron, token_id] == pytest.approx(logits[neuron, order[rank]], abs=1e-5)
                    assert logit == pytest.approx(logits[neuron, token_id], abs=1e-4)
                    assert prob == pytest.approx(np.exp(logits[neuron, token_id] - lse[neuron]), rel=1e-3)
                cols = ", ".join(f"{side}_{s}" for s in ("logit_mean", "logit_std", "logit_skew", "logit_kurtosis"))
                stats = np.array(con.execute(f"SELECT {cols} FROM neurons WHERE layer = ? ORDER BY neuron",
                                             [layer]).fetchall())
                np.testing.assert_allclose(stats[:, 0], logits.mean(1), atol=1e-5)
                np.testing.assert_allclose(stats[:, 1], logits.std(1), rtol=1e-4)
                np.testing.assert_allclose(stats[:, 2], sps.skew(logits, axis=1), atol=1e-3)
                np.testing.assert_allclose(stats[:, 3], sps.kurtosis(logits, axis=1), atol=1e-3)
        labels = con.execute("SELECT count(*) FROM neurons WHERE label IS NULL OR label = ''").fetchone()[0]
        assert labels == 0


def test_chunking_does_not_change_results():
    V, W = torch.randn(37, 16), torch.randn(101, 16)
    U = Unembedding.build(W, torch.rand(16) + 0.5, "cpu", torch.float32)
    one, all_ = decode_directions(V, U, 7, 4, 1), decode_directions(V, U, 7, 4, 1000)
    for name in ("top_ids", "bottom_ids"):
        assert torch.equal(getattr(one, name), getattr(all_, name))
    for name in ("top_logits", "top_probs", "bottom_logits", "stats"):
        torch.testing.assert_close(getattr(one, name), getattr(all_, name))


def test_interrupted_decode_resumes_to_the_same_store(tiny_model_dir, tmp_path, monkeypatch):
    model = str(tiny_model_dir("llama"))
    cfg = DecodeConfig(top_k=4, bottom_k=2)
    Build(tmp_path / "clean", model, progress=False).decode(cfg)

    real_write = decode_mod._write_layer

    def crash_on_layer_1(con, layer, decoded):
        if layer == 1:
            real_write(con, layer, decoded)  # the rows are written, then the process "dies"
            raise KeyboardInterrupt
        real_write(con, layer, decoded)

    monkeypatch.setattr(decode_mod, "_write_layer", crash_on_layer_1)
    with pytest.raises(KeyboardInterrupt):
        Build(tmp_path / "crashed", model, progress=False).decode(cfg)
    with Store(tmp_path / "crashed" / "atlas.duckdb", read_only=True) as store:
        assert store.meta("stage.decode")["status"] == "running"
        assert store.con.execute("SELECT DISTINCT layer FROM neurons").fetchall() == [(0,)]
    monkeypatch.setattr(decode_mod, "_write_layer", real_write)
    result = Build(tmp_path / "crashed", model, progress=False).decode(cfg)
    assert result["layers"] == 1  # only the unfinished layer is redone
    assert _rows(tmp_path / "crashed" / "atlas.duckdb") == _rows(tmp_path / "clean" / "atlas.duckdb")
    assert Build(tmp_path / "crashed", model, progress=False).decode(cfg) == {"skipped": True}


def test_new_config_redecodes(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    Build(tmp_path, model, progress=False).decode(DecodeConfig(top_k=3, bottom_k=1))
    Build(tmp_path, model, progress=False).decode(DecodeConfig(top_k=2, bottom_k=1, sides="out"))
    rows = _rows(tmp_path / "atlas.duckdb")
    assert {r[2] for r in rows} == {"out"} and len(rows) == 2 * 48 * 3


def test_store_of_another_model_is_refused(tiny_model_dir, tmp_path):
    Build(tmp_path, str(tiny_model_dir("llama")), progress=False).decode(DecodeConfig(top_k=2, bottom_k=1))
    with pytest.raises(AtlasError, match="holds an atlas of"):
        Build(tmp_path, str(tiny_model_dir("gpt2")), progress=False)


def test_store_from_another_schema_version_is_refused(tmp_path):
    path = tmp_path / "atlas.duckdb"
    with Store(path) as store:
        store.set_meta("schema_version", 0)
    with pytest.raises(AtlasError, match="schema v0"):
        Store(path)


def test_bad_decode_config_is_refused(tiny_model_dir, tmp_path):
    b = Build(tmp_path, str(tiny_model_dir("llama")), progress=False)
    with pytest.raises(AtlasError, match="--sides"):
        b.decode(DecodeConfig(sides="up"))
    with pytest.raises(AtlasError, match="at least 1"):
        b.decode(DecodeConfig(top_k=0))
