"""Steering: generate with and without neurons clamped, side by side.

The two continuations are greedy and come from one batch of two rows: row 0 runs the model
as it is, row 1 with every requested neuron set to its value at every position (the prompt
and each generated token), the same intervention as the clamp stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from atlas.config import check_device
from atlas.intervene import check_address, clamped
from atlas.errors import AtlasError
from atlas.model.load import LoadedModel

_ADDRESS = re.compile(r"^\s*L?(\d+)\s*[/:]\s*N?(\d+)\s*$", re.IGNORECASE)
_VALUE = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*(x?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Intervention:
    layer: int
    neuron: int
    value: float        # the activation it is set to


def parse_address(text: str) -> tuple[int, int]:
    """'13/777' or 'L13/N777' -> (13, 777)."""
    m = _ADDRESS.match(text)
    if not m:
        raise AtlasError(f"neuron {text!r} is not an address like 13/777 (layer/neuron)")
    return int(m.group(1)), int(m.group(2))


def parse_value(text: str) -> tuple[float, bool]:
    """'8' -> (8.0, False): an activation; '4x' -> (4.0, True): a multiple of the neuron's normaliser."""
    m = _VALUE.match(str(text))
    if not m:
        raise AtlasError(f"value {text!r} is not a number, or a multiple of the normaliser like 4x")
    return float(m.group(1)), bool(m.group(2))


def steer(lm: LoadedModel, prompt: str, interventions: list[Intervention], tokens: int = 40) -> dict:
    """Greedy continuations of ``prompt`` without and with the interventions.

    Returns ``{"prompt", "baseline", "steered", "interventions"}`` with the generated text only.
    """
    if tokens < 1:
        raise AtlasError("--tokens must be at least 1")
    if not prompt.strip():
        raise AtlasError("the prompt is empty")
    n_layers, d_mlp = lm.adapter.n_layers(lm.model), lm.adapter.d_mlp(lm.model)
    for iv in interventions:
        check_address(iv.layer, iv.neuron, n_layers, d_mlp)
    tok = lm.tokenizer
    ids = torch.tensor([tok(prompt).input_ids], device=lm.device).expand(2, -1)   # [2, T]
    positions = lm.limits()["positions"]
    if positions is not None and ids.shape[1] + tokens > positions:
        raise AtlasError(f"--tokens {tokens} after a prompt of {ids.shape[1]} tokens is more than the "
                         f"{positions:,} positions this model has; give at most {max(0, positions - ids.shape[1])}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    with clamped(lm, [1] * len(interventions), [iv.layer for iv in interventions],
                 [iv.neuron for iv in interventions], [iv.value for iv in interventions]):
        with torch.inference_mode():
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                    do_sample=False, temperature=None, top_p=None, top_k=None,
                                    pad_token_id=pad)
    new = out[:, ids.shape[1]:]
    baseline, steered = tok.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return {"prompt": prompt, "baseline": baseline, "steered": steered,
            "interventions": [vars(iv) for iv in interventions]}


def resolve_values(addresses: list[tuple[int, int]], values: list[tuple[float, bool]],
                   normaliser=None) -> list[Intervention]:
    """Pair addresses with values (one value for all, or one each); ``4x`` values need ``normaliser(l, n)``."""
    if not addresses:
        raise AtlasError("name at least one --neuron L/N")
    if len(values) == 1:
        values = values * len(addresses)
    if len(values) != len(addresses):
        raise AtlasError(f"{len(addresses)} --neuron but {len(values)} --value: give one value, or one per neuron")
    out = []
    for (layer, neuron), (v, relative) in zip(addresses, values):
        if relative:
            if normaliser is None:
                raise AtlasError(f"value {v:g}x is relative to the normaliser: pass --atlas DIR to read it")
            scale = normaliser(layer, neuron)
            if scale is None or not scale > 0:
                raise AtlasError(f"neuron {layer}/{neuron} has no positive normaliser in the atlas; "
                                 "give an absolute --value")
            v = v * scale
        out.append(Intervention(layer, neuron, float(v)))
    return out


def steer_cli(prompt: str, neurons, values, tokens: int, atlas_dir, model: str | None, device: str,
              dtype: str) -> dict:
    """What `atlas steer` runs: parse the flags, read normalisers from an atlas if given, steer."""
    from atlas.model.files import DEFAULT_MODEL
    from atlas.model.load import load_model

    addresses = [parse_address(n) for n in neurons]
    parsed = [parse_value(v) for v in values]
    normaliser = None
    if atlas_dir is not None:
        from atlas.pipeline import store_path
        from atlas.store import Store

        with Store(store_path(atlas_dir), read_only=True) as store:
            model = model or (store.meta("model") or {}).get("source")
            scales = {}
            for layer, neuron in addresses:
                row = store.con.execute("SELECT normaliser FROM neurons WHERE layer = ? AND neuron = ?",
                                        [layer, neuron]).fetchone()
                scales[(layer, neuron)] = row[0] if row else None
        normaliser = lambda layer, neuron: scales.get((layer, neuron))     # noqa: E731
    interventions = resolve_values(addresses, parsed, normaliser)
    if tokens < 1:
        raise AtlasError("--tokens must be at least 1")
    check_device(device)
    lm = load_model(model or DEFAULT_MODEL, device, dtype)
    return steer(lm, prompt, interventions, tokens)
