"""Attribution: how much a neuron's activation at a position moves the probability of the next token.

For target token y at position t, attribution = activation x d p(y at t) / d activation,
with the activation taken at position t. One backward pass serves a whole batch: each row
contributes one position, and rows never see each other, so the gradient of the summed
probabilities is each row's own gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch


def attribute_batch(model, adapter, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Attribution of every neuron of every layer, at position ``pos[b]`` of each row ``b``.

    ``ids`` is [B, T]; the target of row b is ``ids[b, pos[b] + 1]``. Returns [L, B, d_mlp].
    """
    n_layers = adapter.n_layers(model)
    acts: list[torch.Tensor | None] = [None] * n_layers

    def keep(layer):
        def hook(module, args):
            args[0].retain_grad()
            acts[layer] = args[0]
        return hook

    def differentiable(module, args, output):
        # The weights are frozen; making the embeddings a leaf that needs a gradient puts
        # every activation downstream of it on the autograd graph.
        return output.detach().requires_grad_(True)

    hooks = [adapter.out_module(model, layer).register_forward_pre_hook(keep(layer)) for layer in range(n_layers)]
    hooks.append(model.get_input_embeddings().register_forward_hook(differentiable))
    rows = torch.arange(ids.shape[0], device=ids.device)
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits[rows, pos]          # [B, vocab]
            # At least float32 for the softmax (bf16 models), never less than the model's own precision.
            p = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)[rows, ids[rows, pos + 1]]
            p.sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([a[rows, pos] * a.grad[rows, pos] for a in acts]).detach()


@dataclass
class AttributionState:
    """Per neuron: sum of |attribution|, and the strongest positive and negative events."""

    abs_sum: torch.Tensor     # [L, d] float64
    n: int
    top_vals: torch.Tensor    # [L, k, d] largest attributions (supports)
    top_tok: torch.Tensor     # [L, k, d] target token ids
    top_idx: torch.Tensor     # [L, k, d] global token index of the position
    bot_vals: torch.Tensor    # most negative (suppresses)
    bot_tok: torch.Tensor
    bot_idx: torch.Tensor

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int, k: int) -> "AttributionState":
        def full(v, dtype):
            return torch.full((n_layers, k, d_mlp), v, dtype=dtype)
        return cls(torch.zeros(n_layers, d_mlp, dtype=torch.float64), 0,
                   full(-math.inf, torch.float32), full(-1, torch.int64), full(-1, torch.int64),
                   full(math.inf, torch.float32), full(-1, torch.int64), full(-1, torch.int64))

    def update(self, scores: torch.Tensor, targets: torch.Tensor, token_index: torch.Tensor) -> None:
        """Fold in ``scores`` [L, B, d] for targets [B] at global token indices [B]."""
        L, B, d = scores.shape
        self.abs_sum += scores.abs().sum(1, dtype=torch.float64)
        self.n += B
        tok = targets.view(1, B, 1).expand(L, B, d)
        idx = token_index.view(1, B, 1).expand(L, B, d)
        k = self.top_vals.shape[1]
        for largest, names in ((True, ("top_vals", "top_tok", "top_idx")), (False, ("bot_vals", "bot_tok", "bot_idx"))):
            vals, toks, idxs = (getattr(self, n) for n in names)
            v, i = torch.cat([vals, scores], 1).topk(k, dim=1, largest=largest, sorted=True)
            setattr(self, names[0], v)
            setattr(self, names[1], torch.cat([toks, tok], 1).gather(1, i))
            setattr(self, names[2], torch.cat([idxs, idx], 1).gather(1, i))

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def table(self, context: int) -> pa.Table:
        """Rows for the ``attributions`` table: positive events ('supports'), negative ('suppresses')."""
        parts = []
        for polarity, vals, toks, idxs, keep in (("supports", self.top_vals, self.top_tok, self.top_idx, np.greater),
                                                 ("suppresses", self.bot_vals, self.bot_tok, self.bot_idx, np.less)):
            v = vals.numpy()
            layer, rank, neuron = np.nonzero(keep(v, 0) & (idxs.numpy() >= 0))
            idx = idxs.numpy()[layer, rank, neuron]
            parts.append(pa.table({
                "layer": pa.array(layer.astype(np.int16)), "neuron": pa.array(neuron.astype(np.int32)),
                "rank": pa.array(rank.astype(np.int16)),
                "token_id": pa.array(toks.numpy()[layer, rank, neuron].astype(np.int32)),
                "attribution": pa.array(v[layer, rank, neuron].astype(np.float32)),
                "polarity": pa.array(np.full(len(idx), polarity, object), pa.string()),
                "doc_id": pa.array((idx // context).astype(np.int32)),
                "token_pos": pa.array((idx % context).astype(np.int32)),
            }))
        return pa.concat_tables(parts)
