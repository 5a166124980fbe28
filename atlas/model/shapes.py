"""Randomly initialised models of known shapes, so that large-model speed can be measured
without the weights (`atlas bench --shape llama-3.1-8b`).

Speed depends on the shapes, not on the values, so the weights are filled with seeded
Gaussian noise straight into the target device and dtype: no initialiser runs on the full
model, and an 8B-shaped model appears on a GPU in seconds.
"""

from __future__ import annotations

import torch

from atlas.model.arch import adapter_for
from atlas.config import SHAPES
from atlas.errors import AtlasError
from atlas.model.load import LoadedModel, pick_device, pick_dtype


def shape_config(name: str | tuple, n_layers: int | None = None):
    """The transformers config of a known shape; ``n_layers`` keeps only that many layers.

    ``name`` may also be a tuple laid out like a ``SHAPES`` entry, for a shape of one's own.
    """
    from transformers import AutoConfig
    try:
        kind, layers, d_model, d_mlp, heads, kv, vocab = name if isinstance(name, tuple) else SHAPES[name]
    except KeyError:
        raise AtlasError(f"unknown shape {name!r} (known: {', '.join(SHAPES)})") from None
    layers = min(layers, n_layers) if n_layers else layers
    if kind == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=layers, n_embd=d_model, n_inner=d_mlp, n_head=heads,
                                    vocab_size=vocab, n_positions=1024)
    return AutoConfig.for_model(kind, num_hidden_layers=layers, hidden_size=d_model, intermediate_size=d_mlp,
                                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                max_position_embeddings=4096, tie_word_embeddings=False)


def random_model(name: str | tuple, device: str = "auto", dtype: str = "auto", n_layers: int | None = None,
                 seed: int = 0) -> LoadedModel:
    """A model of shape ``name`` with seeded random weights, ready for `atlas bench`."""
    from transformers import AutoModelForCausalLM
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    config = shape_config(name, n_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model = model.to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:   # norm gains near 1, biases near 0, as in a trained model
                p.normal_(1.0 if "weight" in pname else 0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for b in model.buffers():   # rotary inverse frequencies etc. were created on the meta device
            if b.is_floating_point():
                b.zero_()
    _restore_buffers(model, config, dev)
    model.eval().requires_grad_(False)
    return LoadedModel(model, None, adapter_for(model), f"random {name} shape"
                       + (f" ({config.num_hidden_layers} layers)" if n_layers else ""), f"shape:{name}", [])


def save_random_model(name: str | tuple, path, tokenizer=None, n_layers: int | None = None,
                      device: str = "auto", dtype: str = "auto", seed: int = 0):
    """Save a random model of a shape as a local Hugging Face directory (config and safetensors,
    plus ``tokenizer`` when given), so that ``atlas build --model PATH`` runs every stage on it."""
    from pathlib import Path
    path = Path(path)
    lm = random_model(name, device, dtype, n_layers, seed)
    lm.model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _restore_buffers(model, config, device) -> None:
    """Recompute the non-persistent buffers (rotary frequencies) that meta construction left empty."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            with torch.device(device):
                fresh = type(module)(module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buf)
        elif type(module).__name__ == "GPT2Attention" and hasattr(module, "bias") and module.bias is not None \
                and module.bias.dtype == torch.bool:
            n = module.bias.shape[-1]
            module.bias.copy_(torch.tril(torch.ones(n, n, dtype=torch.bool, device=device)).view(1, 1, n, n))
