"""Interventions: set neurons' activations and read the next-token distribution.

The clamp stage, ``atlas steer`` and the concept check all clamp neurons the same way: a
neuron's activation (the input of the MLP's down projection) is overwritten at every
position of a prompt, per batch row, so one forward pass can push a different neuron in
each row. ``start_at`` lets a batch whose clamps all sit at or above some layer start from
the cached residual stream there, since the layers below give the same result for every
row. The probe prompts the clamp stage measures on are read here too.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from atlas.errors import AtlasError
from atlas.model.load import LoadedModel
from atlas.resources import PROBE_PROMPTS


def load_prompts(spec: str = "default") -> list[str]:
    path = PROBE_PROMPTS if spec == "default" else Path(spec).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AtlasError(f"cannot read probe prompts {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise AtlasError(f"probe prompt file {path} has no prompts")
    return prompts


@contextmanager
def clamped(lm: LoadedModel, rows: Sequence[int], layers: Sequence[int], neurons: Sequence[int],
            values: Sequence[float]) -> Iterator[None]:
    """While active, activation ``neurons[i]`` of layer ``layers[i]`` in batch row ``rows[i]`` is
    ``values[i]`` at every position; other rows and neurons are untouched.

    Several entries may share a row (several neurons steered together) or a layer.
    """
    model, adapter = lm.model, lm.adapter
    n_layers, d_mlp = adapter.n_layers(model), adapter.d_mlp(model)
    for layer, neuron in zip(layers, neurons):
        check_address(int(layer), int(neuron), n_layers, d_mlp)
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    layers_t = torch.as_tensor(list(layers), dtype=torch.long)
    neurons_t = torch.as_tensor(list(neurons), dtype=torch.long)
    values_t = torch.as_tensor(list(values), dtype=torch.float32)

    def hook_for(sel: torch.Tensor):
        r, n, v = rows_t[sel], neurons_t[sel], values_t[sel]
        cache: dict = {}

        def hook(module, args):
            x = args[0]                                                        # [batch, pos, d_mlp]
            if cache.get("device") != x.device or cache.get("dtype") != x.dtype:
                cache.update(device=x.device, dtype=x.dtype, r=r.to(x.device), n=n.to(x.device),
                             v=v.to(x.device, x.dtype).unsqueeze(1))
            x = x.clone()
            x[cache["r"], :, cache["n"]] = cache["v"]
            return (x, *args[1:])
        return hook

    handles = [adapter.out_module(model, layer).register_forward_pre_hook(hook_for(layers_t == layer))
               for layer in sorted(set(int(layer) for layer in layers_t.tolist()))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_address(layer: int, neuron: int, n_layers: int, d_mlp: int) -> None:
    if not (0 <= layer < n_layers and 0 <= neuron < d_mlp):
        raise AtlasError(f"neuron {layer}/{neuron} is out of range: the model has layers 0-{n_layers - 1} "
                         f"of neurons 0-{d_mlp - 1}")


def prompt_ids(lm: LoadedModel, prompts: Sequence[str]) -> list[list[int]]:
    ids = [lm.tokenizer(p).input_ids for p in prompts]
    empty = [p for p, i in zip(prompts, ids) if not i]
    if empty:
        raise AtlasError(f"probe prompt {empty[0]!r} has no tokens")
    return ids


@torch.inference_mode()
def next_logprobs(lm: LoadedModel, ids: Sequence[int], rows: int = 1) -> torch.Tensor:
    """Log-probabilities of the next token after ``ids``, for ``rows`` copies of it: [rows, vocab]."""
    x = torch.tensor([list(ids)], device=lm.device).expand(rows, -1)
    logits = lm.model(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder block below every clamped layer: its output is its input."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        h = _hidden_arg(args, kwargs)
        return (h,) if self.as_tuple else h


@torch.inference_mode()
def block_inputs(lm: LoadedModel, ids: Sequence[int]) -> tuple[list[torch.Tensor], bool]:
    """The residual stream entering every decoder block for one prompt ([1, T, d_model] each),
    and whether blocks return tuples (older transformers) rather than tensors."""
    blocks = lm.adapter.blocks(lm.model)
    seen: dict[int, torch.Tensor] = {}
    kind = {}

    def pre(i):
        def hook(module, args, kwargs):
            seen[i] = _hidden_arg(args, kwargs).detach().clone()
        return hook

    def post(module, args, output):
        kind["tuple"] = isinstance(output, tuple)

    hooks = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hooks.append(blocks[0].register_forward_hook(post))
    try:
        lm.model(input_ids=torch.tensor([list(ids)], device=lm.device), use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(blocks))], kind["tuple"]


@contextmanager
def start_at(lm: LoadedModel, layer: int, inputs: tuple[list[torch.Tensor], bool] | None) -> Iterator[None]:
    """Run the model from block ``layer`` on, fed the residual that blocks 0..layer-1 would have
    produced (``inputs`` from ``block_inputs``): a clamp at ``layer`` or later cannot change them.

    The blocks below are swapped for pass-throughs rather than cut out of the list, so every
    block keeps its index (models that look up a per-layer attention type by index).
    """
    if layer == 0 or inputs is None:
        yield
        return
    hidden, as_tuple = inputs[0][layer], inputs[1]                             # [1, T, d_model]
    blocks = lm.adapter.blocks(lm.model)
    saved = [blocks[i] for i in range(layer)]

    def feed(module, args, kwargs):
        h = _hidden_arg(args, kwargs)
        new = hidden.to(h.dtype).expand(h.shape[0], -1, -1)
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    for i in range(layer):
        blocks[i] = _PassThrough(as_tuple)
    handle = blocks[layer].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, block in enumerate(saved):
            blocks[i] = block
