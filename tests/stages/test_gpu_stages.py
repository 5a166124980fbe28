"""Every stage on the GPU in bfloat16 against the same stage on the CPU in float32, on a tiny model.

The model is the tiny random Llama of conftest.py with a wider unembedding, so that its
logits spread over several units and greedy choices are not decided by rounding. Each
comparison states its tolerance; bf16 keeps 8 significant bits (a relative step of 2^-8,
about 0.4%), so one rounded product is off by up to 0.4% and a chain of them by a few
percent. The tolerances are: decode logits within 2% of the largest logit, the corpus pass's
per-neuron extremes and means within 3% of the activation scale, attribution within 10% in
norm (a backward pass through bf16 activations), clamp deltas within 5% of their scale.

Without CUDA these tests are skipped, except that ``ATLAS_GPU_TESTS_DEVICE=cpu`` runs the
"GPU" side in bfloat16 on the CPU: that is how `scripts/gpu-check --rehearse` keeps them
from rotting on machines without a GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import float_bits, tiny_model, tiny_tokenizer

ON = os.environ.get("ATLAS_GPU_TESTS_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON is None, reason="needs a CUDA GPU (or ATLAS_GPU_TESTS_DEVICE=cpu to rehearse)")]

VOCAB = 64


def _lm(device: str, dtype: torch.dtype):
    from atlas.model.arch import adapter_for
    from atlas.model.load import LoadedModel
    torch.manual_seed(0)
    model = tiny_model("llama", VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)        # logits of several units: greedy picks are clear
        for layer in model.model.layers:       # activations of order one, not 1e-3
            for lin in (layer.mlp.up_proj, layer.mlp.gate_proj):
                lin.weight.mul_(10.0)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(model, tiny_tokenizer(VOCAB), adapter_for(model), "tiny-llama", "test", [])


@pytest.fixture(scope="module")
def pair():
    """(device model in bf16, CPU model in float32), the same weights."""
    return _lm(ON, torch.bfloat16), _lm("cpu", torch.float32)


def _rel(got, want) -> float:
    got, want = torch.as_tensor(got).double().cpu(), torch.as_tensor(want).double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def test_decode_on_the_device_matches_the_cpu(pair):
    from atlas.stages.decode_kernel import Unembedding, decode_directions
    dev, cpu = pair
    a = dev.adapter
    for side in a.sides:
        V_dev, V_cpu = a.direction(dev.model, 1, side), a.direction(cpu.model, 1, side)      # [d_mlp, d_model]
        U_dev = Unembedding.build(a.W_U(dev.model), a.final_gain(dev.model), ON, torch.bfloat16)
        U_cpu = Unembedding.build(a.W_U(cpu.model), a.final_gain(cpu.model), "cpu", torch.float32)
        got = decode_directions(V_dev, U_dev, 5, 3, 16)
        want = decode_directions(V_cpu, U_cpu, 5, 3, 16)
        # Exact float32 logits of every token, to judge the device's choices by.
        W = a.W_U(cpu.model) * a.final_gain(cpu.model)
        full = V_cpu @ W.T                                                                   # [d_mlp, vocab]
        scale = full.abs().max()
        tol = 0.02 * scale
        # Each chosen token is a true top-5 token up to bf16 rounding, its logit right to 2%.
        chosen = full.gather(1, got.top_ids)
        assert (chosen >= want.top_logits[:, -1:] - tol).all(), side
        assert (got.top_logits - chosen).abs().max() <= tol, side
        assert (got.top_ids[:, 0] == want.top_ids[:, 0]).float().mean() >= 0.9, side
        assert (full.gather(1, got.bottom_ids) <= want.bottom_logits[:, -1:] + tol).all(), side
        # Probabilities within 2% absolute, mean and std of the logits within 2% of the scale.
        assert (got.top_probs - full.softmax(1).gather(1, got.top_ids)).abs().max() <= 0.02, side
        assert (got.stats[:, :2] - want.stats[:, :2]).abs().max() <= tol, side


def _rows(n: int, context: int):
    from atlas.stages.corpus import Row
    g = torch.Generator().manual_seed(1)
    return [Row(i, "test", torch.randint(3, VOCAB, (context,), generator=g).tolist()) for i in range(n)]


def test_corpus_pass_on_the_device_matches_the_cpu(pair):
    from atlas.stages.activations import PassState
    from atlas.stages.exemplars import hooked_pass
    dev, cpu = pair
    L, d = dev.adapter.n_layers(dev.model), dev.adapter.d_mlp(dev.model)
    rows = _rows(24, 16)
    got = hooked_pass(dev, rows, PassState.empty(L, d, 4, 3, ON), 0, 8, progress=False).finished().to("cpu")
    want = hooked_pass(cpu, rows, PassState.empty(L, d, 4, 3), 0, 8, progress=False).finished()
    assert int(got.n_tokens) == int(want.n_tokens) == 24 * 16
    assert torch.equal(got.hist.sum(-1), want.hist.sum(-1))          # every sampled token binned once
    scale = want.top_vals[:, 0].abs().max()
    assert scale > 0.1                                                # the activations are not all near zero
    # Extremes, tail and means: each per neuron within 3% of the activation scale.
    for name in ("top_vals", "bot_vals", "tail_vals"):
        assert (getattr(got, name) - getattr(want, name)).abs().max() <= 0.03 * scale, name
    n = int(want.n_tokens)
    assert ((got.act_sum - want.act_sum) / n).abs().max() <= 0.03 * scale
    # The strongest input of each neuron is the CPU's in at least 90% of neurons (the rest are near-ties).
    assert (got.top_pos[:, 0] // 16 == want.top_pos[:, 0] // 16).float().mean() >= 0.9


def test_corpus_pass_in_groups_of_layers_is_bit_for_bit_one_at_a_time_on_the_device(pair):
    """On the device the pass folds several layers per call; the state must be exactly that of
    one layer per call (the reductions of a group must not change any sum's rounding)."""
    from atlas.stages.activations import PassState
    from atlas.stages.exemplars import hooked_pass
    dev, _ = pair
    L, d = dev.adapter.n_layers(dev.model), dev.adapter.d_mlp(dev.model)
    rows = _rows(40, 16)
    one, grouped = (hooked_pass(dev, rows, PassState.empty(L, d, 4, 3, ON, spare=2), 0, 8, progress=False,
                                group=g).to("cpu") for g in (1, L))
    for name, t in one._tensors().items():
        assert torch.equal(float_bits(getattr(grouped, name)), float_bits(t)), name
    assert (one.top_floor > -float("inf")).any()                     # compactions ran


def test_attribution_on_the_device_matches_the_cpu(pair):
    from atlas.stages.attribution import attribute_batch
    dev, cpu = pair
    ids = torch.tensor([r.token_ids for r in _rows(6, 12)])
    pos = torch.tensor([1, 3, 5, 7, 9, 10])
    got = attribute_batch(dev.model, dev.adapter, ids.to(ON), pos.to(ON)).float().cpu()    # [L, B, d]
    want = attribute_batch(cpu.model, cpu.adapter, ids, pos)
    assert want.abs().max() > 0
    assert _rel(got, want) <= 0.10
    # The neuron that most supports each target is the CPU's for most rows.
    def strongest(a):                                                               # [B]
        return a.abs().permute(1, 0, 2).flatten(1).argmax(-1)
    agree = (strongest(got) == strongest(want)).float().mean()
    assert agree >= 0.75


def test_clamp_on_the_device_matches_the_cpu(pair):
    from atlas.stages.clamp import measure
    dev, cpu = pair
    prompts = [[5, 9, 13], [20, 21], [7, 30, 31, 32]]
    layers = np.array([0, 0, 1, 1, 1, 0])
    neurons = np.array([1, 2, 3, 4, 40, 47])
    values = np.array([3.0, -2.0, 5.0, 1.5, 8.0, 4.0], dtype=np.float32)
    own = np.array([[10, 11, -1], [12, 13, 14], [15, -1, -1], [16, 17, 18], [19, 20, 21], [22, 23, 24]])
    got = measure(dev, prompts, layers, neurons, values, own, top_k=5, batch=4)
    want = measure(cpu, prompts, layers, neurons, values, own, top_k=5, batch=4)
    scale = np.abs(want.rise).max()
    assert scale > 0.1
    # Own-token deltas and the largest rises and falls within 5% of the scale.
    assert np.nanmax(np.abs(got.own - want.own)) <= 0.05 * scale
    assert np.abs(got.rise - want.rise).max() <= 0.05 * scale
    assert np.abs(got.fall - want.fall).max() <= 0.05 * scale
    # Faithfulness is a percentile: within 0.05 of the CPU's for every neuron.
    assert np.nanmax(np.abs(got.faithfulness - want.faithfulness)) <= 0.05
    assert (got.rise_ids[:, 0] == want.rise_ids[:, 0]).mean() >= 0.8


def test_steer_on_the_device_matches_the_cpu(pair):
    from atlas.stages.clamp import clamped
    from atlas.steer import Intervention, steer
    dev, cpu = pair
    prompt = "dog cat dog"
    ivs = [Intervention(1, 40, 30.0), Intervention(0, 2, -20.0)]
    out = steer(dev, prompt, ivs, tokens=6)
    # The baseline row is the device's own unsteered greedy continuation.
    ids = torch.tensor([dev.tokenizer(prompt).input_ids], device=ON)
    with torch.inference_mode():
        plain = dev.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0)
    assert out["baseline"] == dev.tokenizer.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)
    assert out["steered"] != out["baseline"]
    # The steered next-token logits agree with the CPU's within 3% of their scale, and the
    # steered first token is the CPU's choice or within that tolerance of it.
    def steered_logits(lm):
        x = torch.tensor([lm.tokenizer(prompt).input_ids], device=lm.device).expand(2, -1)
        with clamped(lm, [1, 1], [iv.layer for iv in ivs], [iv.neuron for iv in ivs], [iv.value for iv in ivs]):
            with torch.inference_mode():
                return lm.model(input_ids=x, use_cache=False).logits[:, -1].float().cpu()     # [2, vocab]
    got, want = steered_logits(dev), steered_logits(cpu)
    tol = 0.03 * want.abs().max()
    assert (got - want).abs().max() <= tol
    assert not torch.allclose(want[0], want[1])                       # the clamp moved row 1 only
    first = int(got[1].argmax())
    assert want[1, first] >= want[1].max() - tol
