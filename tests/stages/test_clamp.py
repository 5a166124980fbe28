"""Clamping and steering on tiny models: exact values, isolated batch rows, determinism, the stage.

`atlas steer` runs in this process (``atlas_here``): a real process would spend ~5 s importing
torch before each one-line message. One bad steer input and `atlas clamp`'s bad budget keep a
real ``python -m atlas`` process, so that what a process prints after loading a model is checked.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch

from atlas.config import ClampConfig
from atlas.intervene import clamped, load_prompts, next_logprobs
from atlas.stages.clamp import measure
from atlas.stages.cluster import ClusterConfig
from atlas.stages.decode import DecodeConfig
from atlas.errors import AtlasError
from atlas.stages.exemplars import ExemplarConfig
from atlas.model.load import load_model
from atlas.pipeline import Build, render_site
from atlas.site.neuron_json import load as load_neuron, table_rows
from atlas.steer import Intervention, steer
from helpers import (CFG, HOSTILE_TOKENS, assert_one_line_error, assert_tokens_escaped, atlas, atlas_here,
                     corpus_file)

PROMPTS = [[5, 9, 13], [20, 21], [7, 30, 31, 32]]


def _capture(lm):
    """Pre-hooks that record each layer's activation as the down projection receives it."""
    seen = {}
    hooks = [lm.adapter.out_module(lm.model, layer).register_forward_pre_hook(
        lambda m, a, layer=layer: seen.__setitem__(layer, a[0].detach().clone()))
        for layer in range(lm.adapter.n_layers(lm.model))]
    return seen, hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_clamped_activation_equals_the_set_value_and_nothing_else_moves(tiny_model_dir, arch):
    lm = load_model(str(tiny_model_dir(arch)), device="cpu")
    ids = torch.tensor([PROMPTS[0]] * 4)                                       # [4, T]
    seen, hooks = _capture(lm)
    with torch.no_grad():
        lm.model(input_ids=ids)
    plain = dict(seen)
    # Pre-hooks run in registration order: capture again with the clamp registered first.
    for h in hooks:
        h.remove()
    with clamped(lm, rows=[0, 1, 2], layers=[0, 1, 1], neurons=[3, 5, 7], values=[2.5, -1.0, 40.0]):
        seen, hooks = _capture(lm)
        with torch.no_grad():
            lm.model(input_ids=ids)
        for h in hooks:
            h.remove()
    assert torch.all(seen[0][0, :, 3] == 2.5)
    assert torch.all(seen[1][1, :, 5] == -1.0) and torch.all(seen[1][2, :, 7] == 40.0)
    # Layer 0: only row 0, neuron 3 changed. Row 3 was never clamped: identical at every layer.
    changed = (seen[0] != plain[0]).nonzero().tolist()
    assert {(r, n) for r, _, n in changed} == {(0, 3)}
    assert torch.equal(seen[1][3], plain[1][3])
    # Layer 1 of rows 1 and 2: only their own clamped neuron differs (layer 0 of them was untouched).
    for row, neuron in ((1, 5), (2, 7)):
        keep = torch.ones(seen[1].shape[2], dtype=torch.bool)
        keep[neuron] = False
        assert torch.equal(seen[1][row][:, keep], plain[1][row][:, keep])
    # The hooks are gone afterwards.
    seen, hooks = _capture(lm)
    with torch.no_grad():
        lm.model(input_ids=ids)
    assert torch.equal(seen[1], plain[1])


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir("llama")), device="cpu")


def _neurons():
    layers = np.array([0, 0, 1, 1, 1, 0])
    neurons = np.array([1, 2, 3, 4, 40, 47])
    values = np.array([3.0, -2.0, 5.0, 1.5, 8.0, 4.0], dtype=np.float32)
    own = np.array([[10, 11, -1], [12, 13, 14], [15, -1, -1], [16, 17, 18], [19, 20, 21], [22, 23, 24]])
    return layers, neurons, values, own


def test_batch_rows_do_not_leak_and_results_are_deterministic(lm):
    layers, neurons, values, own = _neurons()
    together = measure(lm, PROMPTS, layers, neurons, values, own, top_k=5, batch=6)
    again = measure(lm, PROMPTS, layers, neurons, values, own, top_k=5, batch=6)
    for name in vars(together):
        np.testing.assert_array_equal(getattr(together, name), getattr(again, name))
    for i in range(len(layers)):
        alone = measure(lm, PROMPTS, layers[i:i + 1], neurons[i:i + 1], values[i:i + 1], own[i:i + 1], top_k=5)
        np.testing.assert_allclose(alone.rise, together.rise[i:i + 1], atol=1e-5)
        np.testing.assert_allclose(alone.own, together.own[i:i + 1], atol=1e-5)
        np.testing.assert_allclose(alone.faithfulness, together.faithfulness[i:i + 1], atol=1e-3)
    # Different neurons in one batch really gave different effects.
    assert not np.allclose(together.rise[0], together.rise[2])


def test_measure_agrees_with_a_brute_force_clamp(lm):
    layers, neurons, values, own = _neurons()
    eff = measure(lm, PROMPTS, layers, neurons, values, own, top_k=4, batch=4)
    i = 4                                                                      # layer 1, neuron 40, value 8
    delta = torch.zeros(lm.model.config.vocab_size)
    for ids in PROMPTS:
        def hook(module, args):
            x = args[0].clone()
            x[..., int(neurons[i])] = float(values[i])
            return (x,)
        base = next_logprobs(lm, ids)[0]
        h = lm.adapter.out_module(lm.model, int(layers[i])).register_forward_pre_hook(hook)
        try:
            delta += next_logprobs(lm, ids)[0] - base
        finally:
            h.remove()
    delta /= len(PROMPTS)
    top = delta.topk(4)
    np.testing.assert_array_equal(eff.rise_ids[i], top.indices.numpy())
    np.testing.assert_allclose(eff.rise[i], top.values.numpy(), atol=1e-5)
    np.testing.assert_allclose(eff.fall[i], (-delta).topk(4).values.neg().numpy(), atol=1e-5)
    mine = delta[own[i]]
    np.testing.assert_allclose(eff.own[i], mine.numpy(), atol=1e-5)
    pct = [((delta < d).sum() + 0.5 * ((delta == d).sum() - 1)).item() / (len(delta) - 1) for d in mine]
    assert eff.faithfulness[i] == pytest.approx(np.mean(pct), abs=1e-6)
    assert eff.lift[i] == pytest.approx(mine.mean().item(), abs=1e-5)


def test_steer_baseline_is_the_unsteered_model(lm):
    prompt = "dog cat dog"
    with torch.no_grad():
        ids = torch.tensor([lm.tokenizer(prompt).input_ids])
        plain = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False, pad_token_id=0)
    expected = lm.tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    out = steer(lm, prompt, [Intervention(1, 40, 50.0), Intervention(0, 2, -30.0)], tokens=6)
    assert out["baseline"] == expected
    assert out["steered"] != out["baseline"]
    with pytest.raises(AtlasError, match="out of range"):
        steer(lm, prompt, [Intervention(2, 0, 1.0)], tokens=3)


def test_default_probe_prompts_are_shipped_and_neutral():
    prompts = load_prompts()
    assert len(prompts) >= 6 and all(p and not p.startswith("#") for p in prompts)


# -- the stage, end to end on a tiny atlas --------------------------------------------------
@pytest.fixture
def tiny_atlas(tiny_model_dir, tmp_path):
    b = Build(tmp_path / "out", str(tiny_model_dir("llama")), device="cpu", progress=False)
    b.decode(DecodeConfig(top_k=5, bottom_k=2))
    b.exemplars(ExemplarConfig(corpus=str(corpus_file(tmp_path)), **CFG))
    b.cluster(ClusterConfig(n_clusters=4))
    return b


def test_clamp_stage_writes_effects_and_faithfulness_and_skips_reruns(tiny_atlas):
    cfg = ClampConfig(clamp_budget=10, clamp_top_k=4, clamp_own=3, clamp_batch=4)
    result = tiny_atlas.clamp(cfg)
    assert result["neurons"] == 10 and result["of"] == 96
    with duckdb.connect(str(tiny_atlas.out / "atlas.duckdb"), read_only=True) as con:
        picked = con.execute("SELECT layer, neuron, clamp_value, normaliser, faithfulness FROM neurons "
                             "WHERE clamp_value IS NOT NULL ORDER BY ALL").fetchall()
        assert len(picked) == 10
        assert all(v == pytest.approx(4.0 * n) and 0 <= f <= 1 for _, _, v, n, f in picked)
        # The budget takes the strongest neuron of every layer and of every cluster first.
        strongest = con.execute("""SELECT DISTINCT arg_max((layer, neuron), normaliser * out_norm) FROM neurons
                                   GROUP BY layer UNION SELECT arg_max((layer, neuron), normaliser * out_norm)
                                   FROM neurons GROUP BY cluster_id""").fetchall()
        assert {tuple(s[0]) for s in strongest} <= {(layer, n) for layer, n, *_ in picked}
        counts = dict(con.execute("SELECT direction, count(*) FROM clamp_effects GROUP BY ALL").fetchall())
        assert counts == {"rises": 40, "falls": 40, "own": 30}
        own = con.execute("""SELECT count(*) FROM clamp_effects c JOIN decoded_tokens d
                             ON c.layer = d.layer AND c.neuron = d.neuron AND d.side = 'out'
                             AND d.polarity = 'top' AND d.rank = c.rank AND d.token_id = c.token_id
                             WHERE c.direction = 'own'""").fetchone()[0]
        assert own == 30
        assert con.execute("SELECT count(*) FROM clamp_effects WHERE token IS NULL").fetchone()[0] == 0
    assert tiny_atlas.clamp(cfg) == {"skipped": True}
    assert tiny_atlas.clamp(ClampConfig(clamp_budget=10, clamp_top_k=4, clamp_own=3, clamp_batch=7)) == {"skipped": True}
    assert tiny_atlas.clamp(ClampConfig(clamp_budget=5, clamp_top_k=4, clamp_own=3))["neurons"] == 5
    with duckdb.connect(str(tiny_atlas.out / "atlas.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM neurons WHERE clamp_value IS NOT NULL").fetchone()[0] == 5
        assert con.execute("SELECT count(DISTINCT (layer, neuron)) FROM clamp_effects").fetchone()[0] == 5


def test_a_neuron_without_decoded_out_tokens_is_measured_without_a_figure(tiny_atlas):
    """No own tokens to check: the stage stores NULL (not NaN), and pages, JSON and search take it."""
    with duckdb.connect(str(tiny_atlas.out / "atlas.duckdb")) as con:
        con.execute("DELETE FROM decoded_tokens WHERE layer = 0 AND side = 'out'")
    tiny_atlas.clamp(ClampConfig(clamp_budget=10, clamp_top_k=4, clamp_own=3))
    with duckdb.connect(str(tiny_atlas.out / "atlas.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT layer, neuron, clamp_lift, faithfulness FROM neurons "
                           "WHERE clamp_value IS NOT NULL ORDER BY ALL").fetchall()
    blank = [(layer, n) for layer, n, lift, f in rows if layer == 0]
    assert blank and all(lift is None and f is None for layer, _, lift, f in rows if layer == 0)
    assert all(0 <= f <= 1 for layer, _, _, f in rows if layer != 0)
    render_site(tiny_atlas.out, progress=False)
    layer, n = blank[0]
    site = tiny_atlas.out / "site"
    page = (site / "neurons" / str(layer) / str(n) / "index.html").read_text(encoding="utf-8")
    assert "faithfulness <strong>–</strong>: no decoded <code>out</code> tokens to check" in page
    data = json.loads((site / "neurons" / str(layer) / f"{n}.json").read_text(encoding="utf-8"))
    row = data["neurons"]
    assert row["faithfulness"] is None and row["clamp_lift"] is None and row["clamp_value"] is not None


def test_clamp_needs_normalisers(tiny_model_dir, tmp_path):
    b = Build(tmp_path / "out", str(tiny_model_dir("llama")), device="cpu", progress=False)
    b.decode(DecodeConfig(top_k=5, bottom_k=2))
    with pytest.raises(AtlasError, match="exemplars"):
        b.clamp(ClampConfig())


def test_pages_show_the_clamp_check(tiny_atlas):
    tiny_atlas.clamp(ClampConfig(clamp_budget=6, clamp_top_k=4, clamp_own=3))
    render_site(tiny_atlas.out, progress=False)
    site = tiny_atlas.out / "site"
    with duckdb.connect(str(tiny_atlas.out / "atlas.duckdb"), read_only=True) as con:
        (layer, neuron, faith), = con.execute("SELECT layer, neuron, faithfulness FROM neurons "
                                             "WHERE clamp_value IS NOT NULL ORDER BY ALL LIMIT 1").fetchall()
        unmeasured = con.execute("SELECT layer, neuron FROM neurons WHERE clamp_value IS NULL LIMIT 1").fetchone()
    html = (site / "neurons" / str(layer) / str(neuron) / "index.html").read_text()
    assert '<section id=clamp>' in html and f"faithfulness <strong>{faith:.2f}</strong>" in html
    assert "<script>alert" not in html
    # The tiny vocabulary's hostile tokens (data/hostile.json) reach the decoded tables and the
    # clamp effects: every page holds them escaped, and shows them as the same text.
    shown = assert_tokens_escaped(site, HOSTILE_TOKENS)
    assert len(shown) >= 4 and all(shown.values()), shown
    data = load_neuron(site / "neurons" / str(layer) / f"{neuron}.json")
    assert {r["direction"] for r in table_rows(data, "clamp_effects")} == {"rises", "falls", "own"}
    assert data["neurons"]["faithfulness"] == pytest.approx(faith, rel=1e-3)   # JSON keeps 3 significant digits
    other = (site / "neurons" / str(unmeasured[0]) / str(unmeasured[1]) / "index.html").read_text()
    assert 'id=clamp' not in other and 'Δ pushed' not in other
    home = (site / "index.html").read_text()
    assert "Causal check: 6 of 96 neurons pushed to 4 × their normaliser" in home
    assert "Clamp check" in (site / "method" / "index.html").read_text()


# -- the command line -----------------------------------------------------------------------
def test_steer_command(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    proc = atlas_here("steer", "--model", model, "--device", "cpu", "--neuron", "1/40", "--value", "50",
                      "--neuron", "L0/N2", "--value", "-30", "--tokens", "5", "--json", "dog cat")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["interventions"] == [{"layer": 1, "neuron": 40, "value": 50.0}, {"layer": 0, "neuron": 2, "value": -30.0}]
    assert out["steered"] != out["baseline"]


@pytest.mark.parametrize("args, message", [
    (["--neuron", "7/0", "--value", "3"], "neuron 7/0 is out of range"),
    (["--neuron", "0/48", "--value", "3"], "neuron 0/48 is out of range"),
    (["--neuron", "zero", "--value", "3"], "is not an address"),
    (["--neuron", "0/1", "--value", "lots"], "is not a number"),
    (["--neuron", "0/1", "--value", "4x"], "pass --atlas DIR"),
    (["--neuron", "0/1", "--neuron", "0/2", "--value", "1", "--value", "2", "--value", "3"], "give one value"),
    (["--neuron", "0/1", "--value", "1", "--tokens", "0"], "--tokens must be at least 1"),
])
def test_steer_bad_input_is_one_line(tiny_model_dir, args, message):
    proc = atlas_here("steer", "--model", str(tiny_model_dir("llama")), "--device", "cpu", *args, "dog")
    assert_one_line_error(proc, message)


def test_steer_bad_input_in_a_real_process(tiny_model_dir):
    proc = atlas("steer", "--model", str(tiny_model_dir("llama")), "--device", "cpu", "--neuron", "0/48",
                 "--value", "3", "dog")
    assert_one_line_error(proc, "neuron 0/48 is out of range")


def test_steer_reads_normalisers_from_an_atlas(tiny_atlas):
    proc = atlas_here("steer", "--atlas", str(tiny_atlas.out), "--device", "cpu", "--neuron", "1/3", "--value", "4x",
                      "--tokens", "3", "--json", "dog")
    assert proc.returncode == 0, proc.stderr
    with duckdb.connect(str(tiny_atlas.out / "atlas.duckdb"), read_only=True) as con:
        norm = con.execute("SELECT normaliser FROM neurons WHERE layer = 1 AND neuron = 3").fetchone()[0]
    assert json.loads(proc.stdout)["interventions"][0]["value"] == pytest.approx(4 * norm, rel=1e-6)


def test_clamp_command_bad_budget(tiny_atlas):
    proc = atlas("clamp", "--out", str(tiny_atlas.out), "--model", tiny_atlas.model_spec, "--clamp-budget", "-3")
    assert_one_line_error(proc, "--clamp-budget")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma3_text", "qwen2"])
def test_starting_at_the_lowest_clamped_layer_changes_nothing(tiny_model_dir, arch):
    lm = load_model(str(tiny_model_dir(arch)), device="cpu")
    layers, neurons = np.array([1, 1, 1]), np.array([0, 9, 30])
    values = np.array([4.0, -3.0, 9.0], dtype=np.float32)
    own = np.array([[10, 11], [12, 13], [14, 15]])
    fast = measure(lm, PROMPTS, layers, neurons, values, own, top_k=6, skip_early=True)
    full = measure(lm, PROMPTS, layers, neurons, values, own, top_k=6, skip_early=False)
    np.testing.assert_allclose(fast.rise, full.rise, atol=1e-5)
    np.testing.assert_allclose(fast.fall, full.fall, atol=1e-5)
    np.testing.assert_allclose(fast.own, full.own, atol=1e-5)
    # The model is whole again afterwards.
    assert not any(type(b).__name__ == "_PassThrough" for b in lm.adapter.blocks(lm.model))


def test_concept_check_prompts_are_held_out_and_variants_are_single_tokens(lm):
    from atlas.concepts import HELD_OUT, variants

    assert not set(HELD_OUT) & set(load_prompts()) and len(HELD_OUT) == 10
    # The tiny tokenizer splits on spaces and knows "dog"; "Dog" is its unknown token, not a variant.
    assert lm.tokenizer.convert_ids_to_tokens(variants(lm.tokenizer, "dog")) == ["dog"]
    assert variants(lm.tokenizer, "Paris") == []
