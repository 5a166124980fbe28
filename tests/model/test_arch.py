"""Each adapter maps the standard parts to the right modules: checked against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from atlas.model.arch import adapter_for
from atlas.errors import AtlasError
from helpers import ARCHS, tiny_config, tiny_model


def _normalised(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The norm's input with the gain and bias left out: what the gain multiplies."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = norm.eps
    h = h.float()
    if isinstance(norm, nn.LayerNorm):
        return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def _capture(model, adapter, layer: int, ids: torch.Tensor) -> dict:
    seen = {}

    def keep(key, which):
        # Hooks must return None: a returned tensor would replace the module's input or output.
        def hook(module, args, output=None):
            seen.setdefault(key, (args[0] if which == "input" else output).detach().clone())
        return hook

    hooks = [
        adapter.module(model, layer, "norm").register_forward_hook(keep("norm_in", "input")),
        adapter.module(model, layer, "in").register_forward_hook(keep("in", "output")),
        adapter.out_module(model, layer).register_forward_pre_hook(keep("act", "input")),
        model.get_submodule(adapter.norm_final).register_forward_hook(keep("final_in", "input")),
    ]
    if adapter.mlp_gate:
        hooks.append(adapter.module(model, layer, "gate").register_forward_hook(keep("gate", "output")))
    with torch.no_grad():
        seen["logits"] = model(ids).logits
    for h in hooks:
        h.remove()
    return seen


def _bias(module: nn.Module) -> torch.Tensor | float:
    return module.bias.detach() if getattr(module, "bias", None) is not None else 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_matches_forward_pass(arch):
    model = tiny_model(arch)
    a = adapter_for(model)
    assert ("gate" in a.sides) == (arch not in ("gpt2", "gpt_neox"))
    ids = torch.randint(0, 64, (2, 7))
    layer = 1
    seen = _capture(model, a, layer, ids)
    norm = a.module(model, layer, "norm")
    n_hat = _normalised(norm, seen["norm_in"])                            # [b, t, d_model]
    # `in` (and `gate`) directions read the normalised residual: dot products reproduce the
    # projection's output up to constants from the norm's bias and the projection's bias.
    for side in a.sides[:-1]:
        W = a.W_in(model, layer) if side == "in" else a.W_gate(model, layer)
        const = W @ _bias(norm) if isinstance(_bias(norm), torch.Tensor) else 0.0
        const = const + _bias(a.module(model, layer, side))
        expected = n_hat @ a.direction(model, layer, side).T.float() + const
        torch.testing.assert_close(expected, seen[side].float(), rtol=1e-4, atol=1e-4)
    # The hooked activation is the MLP's nonlinearity applied to those projections.
    mlp = a.module(model, layer, "out")
    act_fn = next(m for name, m in model.get_submodule(a.layers)[layer].named_modules()
                  if name.endswith(("act_fn", "act")))
    if a.mlp_gate:
        torch.testing.assert_close(seen["act"], act_fn(seen["gate"]) * seen["in"], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(seen["act"], act_fn(seen["in"]), rtol=1e-5, atol=1e-5)
    # `out`: raising neuron n's activation by delta adds delta times its direction to the output.
    n, delta = 5, 2.5
    bumped = seen["act"].clone()
    bumped[..., n] += delta
    with torch.no_grad():
        diff = (mlp(bumped) - mlp(seen["act"]))[0, 0]
    torch.testing.assert_close(diff / delta, a.direction(model, layer, "out")[n], rtol=1e-4, atol=1e-5)
    # The final norm's gain and the unembedding reproduce the model's logits.
    final = model.get_submodule(a.norm_final)
    W_U = a.W_U(model)
    logits = (_normalised(final, seen["final_in"]) * a.final_gain(model)) @ W_U.T
    logits = logits + (W_U @ _bias(final) if isinstance(_bias(final), torch.Tensor) else 0.0)
    torch.testing.assert_close(logits, seen["logits"].float(), rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_is_named():
    from transformers import AutoModelForCausalLM


    model = AutoModelForCausalLM.from_config(tiny_config("opt"))
    with pytest.raises(AtlasError, match="unsupported architecture 'opt'"):
        adapter_for(model)


def test_model_without_known_mlp_is_refused():
    model = tiny_model("llama")
    model.model.layers[0].mlp = nn.Identity()
    with pytest.raises(AtlasError, match="no MLP that the llama adapter knows"):
        adapter_for(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_models_examples_read_after_a_shared_prefix_are_those_of_the_whole_prompt(arch, tiny_model_dir):
    """atlas.model_examples reads the prompts' shared prefix once and copies its cache to each
    batch; every architecture's answers equal those of the whole prompts, left-padded."""
    from atlas.model.load import load_model
    from atlas.model_examples import ask

    lm = load_model(str(tiny_model_dir(arch)), device="cpu")
    words = ["dog", "cat", "Paris dog cat", "w3 w4 w5 w6"]              # of different lengths: padded
    shared, _ = ask(lm, words, 10, progress=False)
    whole, _ = ask(lm, words, 10, progress=False, reuse_prefix=False)
    a, b = shared.to_pylist(), whole.to_pylist()
    assert [(r["word"], r["term"], r["rank"]) for r in a] == [(r["word"], r["term"], r["rank"]) for r in b]
    assert [r["prob"] for r in a] == pytest.approx([r["prob"] for r in b], abs=1e-5)
    assert all(0 <= r["prob"] <= 1 for r in a) and sum(r["prob"] for r in a if r["word"] == "dog") <= 1 + 1e-5
    # A tokenizer that makes something of the prompts gets answers (one test tokenizer makes nothing of them).
    assert len({r["word"] for r in a}) == sum(1 for w in words if lm.tokenizer(f"kinds of {w}").input_ids)
