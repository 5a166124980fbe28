"""Per-neuron statistics of a corpus pass, kept as a state that merges associatively.

``PassState`` holds, for every neuron of every layer, the top and bottom activations with
where they happened and the activations of the tokens around them, a histogram on fixed
bins, and running sums. ``update`` folds in one batch; ``merge`` combines two states of
disjoint shards, so a corpus can be split over processes or GPUs and a pass resumed from a
checkpoint exactly. Memory is O(k x neurons), never O(tokens x neurons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

WINDOW_BEFORE, WINDOW_AFTER = 12, 3
WINDOW = WINDOW_BEFORE + 1 + WINDOW_AFTER
HIST_BINS, HIST_SCALE, HIST_RANGE = 64, 0.05, 200.0   # asinh-spaced bins over [-200, 200]
HIST_STRIDE = 16
_A = math.asinh(HIST_RANGE / HIST_SCALE)


def hist_edges() -> torch.Tensor:
    """The fixed bin edges (dense near 0, sparse in the tails), shared by every neuron and shard."""
    return torch.sinh(torch.linspace(-_A, _A, HIST_BINS + 1, dtype=torch.float64)) * HIST_SCALE


def hist_index(x: torch.Tensor) -> torch.Tensor:
    """Bin of each value on hist_edges(); values beyond the outer edges land in the outer bins."""
    i = (torch.asinh(x * (1 / HIST_SCALE)).add_(_A)).mul_(HIST_BINS / (2 * _A)).floor_()
    return i.clamp_(0, HIST_BINS - 1).long()


@dataclass
class PassState:
    """Everything a pass keeps; every tensor is [layers, ...] and lives on the pass's device."""

    top_vals: torch.Tensor      # [L, k, d_mlp] largest per-input maxima, descending
    top_pos: torch.Tensor       # [L, k, d_mlp] global token index = doc_id * context + position
    top_win: torch.Tensor       # [L, k, d_mlp, WINDOW] activations around each of them
    bot_vals: torch.Tensor      # [L, k, d_mlp] smallest per-input minima, ascending
    bot_pos: torch.Tensor
    bot_win: torch.Tensor
    tail_vals: torch.Tensor     # [L, K, d_mlp] largest token-level activations, for the quantile
    hist: torch.Tensor          # [L, d_mlp, HIST_BINS] counts on hist_edges()
    act_sum: torch.Tensor       # [L, d_mlp] float64
    act_sumsq: torch.Tensor
    n_tokens: torch.Tensor      # [] tokens seen per neuron

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int, k: int, k_tail: int, device="cpu") -> "PassState":
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        return cls(
            top_vals=torch.full((n_layers, k, d_mlp), -math.inf, **f32),
            top_pos=torch.full((n_layers, k, d_mlp), -1, **i64),
            top_win=torch.full((n_layers, k, d_mlp, WINDOW), math.nan, **f32),
            bot_vals=torch.full((n_layers, k, d_mlp), math.inf, **f32),
            bot_pos=torch.full((n_layers, k, d_mlp), -1, **i64),
            bot_win=torch.full((n_layers, k, d_mlp, WINDOW), math.nan, **f32),
            tail_vals=torch.full((n_layers, k_tail, d_mlp), -math.inf, **f32),
            hist=torch.zeros((n_layers, d_mlp, HIST_BINS), **i64),
            act_sum=torch.zeros((n_layers, d_mlp), dtype=torch.float64, device=device),
            act_sumsq=torch.zeros((n_layers, d_mlp), dtype=torch.float64, device=device),
            n_tokens=torch.zeros((), **i64),
        )

    def to(self, device) -> "PassState":
        return PassState(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    @classmethod
    def from_state_dict(cls, d: dict) -> "PassState":
        return cls(**d)

    # -- folding in a batch ---------------------------------------------------------
    @torch.no_grad()
    def update(self, layer: int, acts: torch.Tensor, first_token: int) -> None:
        """Fold one layer's activations of one batch in. ``acts`` is [batch, context, d_mlp].

        ``first_token`` is the global index of the batch's first token, so that
        ``first_token + flat position`` names each token across the whole corpus.
        Exemplars are per model input (its strongest token), so a neuron's exemplars come
        from different inputs instead of neighbouring tokens of one.
        """
        B, T, d = acts.shape
        acts = acts.float()
        x = acts.reshape(B * T, d)                                             # [BT, d]
        row_start = torch.arange(B, device=x.device).unsqueeze(1) * T          # [B, 1]
        for largest, names in ((True, ("top_vals", "top_pos", "top_win")),
                               (False, ("bot_vals", "bot_pos", "bot_win"))):
            v, t = acts.max(dim=1) if largest else acts.min(dim=1)            # [B, d] per input
            vals, pos, wins = (getattr(self, n)[layer] for n in names)
            merged = _merge_batch(vals, pos, wins, v, t + row_start + first_token, _row_windows(acts, t), largest)
            for name, tensor in zip(names, merged):
                getattr(self, name)[layer] = tensor
            if largest:
                self._update_tail(layer, acts, v)
        # The histogram is taken over every HIST_STRIDE-th token: a density estimate does not
        # need every token, and binning all of them would cost more than the forward pass.
        sample = x[::HIST_STRIDE].contiguous()
        self.hist[layer].view(-1).index_add_(
            0, (hist_index(sample) + torch.arange(d, device=x.device) * HIST_BINS).view(-1),
            torch.ones(1, dtype=torch.int64, device=x.device).expand(sample.numel()))
        self.act_sum[layer] += x.sum(0)
        self.act_sumsq[layer] += torch.linalg.vecdot(x.T, x.T)

    def _update_tail(self, layer: int, acts: torch.Tensor, row_max: torch.Tensor) -> None:
        """Token-level top values for the quantile. A token in the corpus-wide top K is in its
        own input's top K, so each input's top K are the only candidates; with K = 1 (corpora
        under 1e5 tokens at q = 1e-5) they are the per-input maxima already at hand."""
        K = self.tail_vals.shape[1]
        if K == 1:
            torch.maximum(self.tail_vals[layer, 0], row_max.amax(0), out=self.tail_vals[layer, 0])
            return
        cand = acts.topk(min(K, acts.shape[1]), dim=1).values.flatten(0, 1)              # [B*K, d]
        self.tail_vals[layer] = torch.cat([self.tail_vals[layer], cand]).topk(K, dim=0).values

    def count_tokens(self, n: int) -> None:
        self.n_tokens += n

    # -- merging shards -------------------------------------------------------------
    def merge(self, other: "PassState") -> "PassState":
        """The state of both shards' tokens together; ``self`` and ``other`` are unchanged."""
        out = PassState(**{f.name: getattr(self, f.name).clone() for f in fields(self)})
        for layer in range(self.top_vals.shape[0]):
            for largest, (vals, pos, wins) in ((True, ("top_vals", "top_pos", "top_win")),
                                              (False, ("bot_vals", "bot_pos", "bot_win"))):
                merged = _merge_batch(getattr(self, vals)[layer], getattr(self, pos)[layer],
                                      getattr(self, wins)[layer], getattr(other, vals)[layer],
                                      getattr(other, pos)[layer], getattr(other, wins)[layer], largest)
                for name, t in zip((vals, pos, wins), merged):
                    getattr(out, name)[layer] = t
        K = self.tail_vals.shape[1]
        out.tail_vals = torch.cat([self.tail_vals, other.tail_vals], 1).topk(K, dim=1).values
        for name in ("hist", "act_sum", "act_sumsq", "n_tokens"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    # -- results --------------------------------------------------------------------
    def normaliser(self, q: float) -> torch.Tensor:
        """The upper ``q`` quantile per neuron [L, d_mlp], exact while q * tokens < K.

        The upper q quantile of n values is the value of descending rank floor(q * n).
        """
        n = int(self.n_tokens)
        rank = min(int(math.floor(q * n)), self.tail_vals.shape[1] - 1)
        return self.tail_vals[:, rank, :]


def _row_windows(acts: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Activations around position ``t[b, n]`` of row b for neuron n: [B, d, WINDOW], NaN off the row."""
    B, T, d = acts.shape
    offsets = torch.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1, device=acts.device).view(1, WINDOW, 1)
    idx = t.unsqueeze(1) + offsets                                                    # [B, W, d]
    inside = (idx >= 0) & (idx < T)
    w = acts.gather(1, idx.clamp(0, T - 1)).masked_fill_(~inside, math.nan)
    return w.permute(0, 2, 1)


def _merge_batch(vals, pos, wins, new_vals, new_pos, new_wins, largest: bool):
    """Keep the k best of the kept entries ([k, d], windows [k, d, W]) and the new candidates."""
    k = vals.shape[0]
    all_vals, all_pos = torch.cat([vals, new_vals]), torch.cat([pos, new_pos])
    # Equal activations (repeated text gives them) are ordered by position, so that the
    # result does not depend on how the corpus was split into batches or shards.
    # Empty slots (position -1) sort last among equals, whatever their placeholder value.
    by_pos = torch.where(all_pos < 0, torch.iinfo(torch.int64).max, all_pos).argsort(dim=0, stable=True)
    by_val = all_vals.gather(0, by_pos).argsort(dim=0, descending=largest, stable=True)
    i = by_pos.gather(0, by_val)[:k]                                                  # [k, d]
    v, p = all_vals.gather(0, i), all_pos.gather(0, i)
    w = torch.cat([wins, new_wins]).gather(0, i.unsqueeze(-1).expand(*i.shape, wins.shape[-1]))
    return v, p, w
