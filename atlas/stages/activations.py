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
    y = x * (1 / HIST_SCALE)
    # asinh(y) = sign(y) log(|y| + sqrt(y^2 + 1)), written out because torch's asinh is not
    # vectorised on the CPU and cost more than the rest of a batch's statistics.
    a = torch.log(y.abs() + (y * y).add_(1).sqrt_()).copysign_(y)
    i = a.add_(_A).mul_(HIST_BINS / (2 * _A)).floor_()
    return i.clamp_(0, HIST_BINS - 1).long()


@dataclass
class PassState:
    """Everything a pass keeps; every tensor is [layers, ...] and lives on the pass's device.

    The exemplar lists hold ``k + spare`` slots: the first entries are the k best so far
    (sorted at the last compaction), and new candidates are appended behind them unsorted
    until a neuron's slots run out. Only then are that neuron's slots sorted back down to k,
    so a batch costs a few elementwise passes instead of a sort of every neuron.
    ``finished()`` sorts everything and returns exactly k per neuron.
    """

    top_vals: torch.Tensor      # [L, k + spare, d_mlp] per-input maxima; empty slots -inf, position -1
    top_pos: torch.Tensor       # [L, k + spare, d_mlp] global token index = doc_id * context + position
    top_win: torch.Tensor       # [L, k + spare, d_mlp, WINDOW] activations around each of them
    top_floor: torch.Tensor     # [L, d_mlp] k-th best value at the last compaction (-inf before k)
    bot_vals: torch.Tensor      # per-input minima; empty slots +inf
    bot_pos: torch.Tensor
    bot_win: torch.Tensor
    bot_floor: torch.Tensor
    tail_vals: torch.Tensor     # [L, K, d_mlp] largest token-level activations, for the quantile
    hist: torch.Tensor          # [L, d_mlp, HIST_BINS] counts on hist_edges()
    act_sum: torch.Tensor       # [L, d_mlp] float64
    act_sumsq: torch.Tensor
    n_tokens: torch.Tensor      # [] tokens seen per neuron
    k: int = 20

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int, k: int, k_tail: int, device="cpu", spare: int = 16) -> "PassState":
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        slots = k + max(1, spare)
        return cls(
            top_vals=torch.full((n_layers, slots, d_mlp), -math.inf, **f32),
            top_pos=torch.full((n_layers, slots, d_mlp), -1, **i64),
            top_win=torch.full((n_layers, slots, d_mlp, WINDOW), math.nan, **f32),
            top_floor=torch.full((n_layers, d_mlp), -math.inf, **f32),
            bot_vals=torch.full((n_layers, slots, d_mlp), math.inf, **f32),
            bot_pos=torch.full((n_layers, slots, d_mlp), -1, **i64),
            bot_win=torch.full((n_layers, slots, d_mlp, WINDOW), math.nan, **f32),
            bot_floor=torch.full((n_layers, d_mlp), math.inf, **f32),
            tail_vals=torch.full((n_layers, k_tail, d_mlp), -math.inf, **f32),
            hist=torch.zeros((n_layers, d_mlp, HIST_BINS), **i64),
            act_sum=torch.zeros((n_layers, d_mlp), dtype=torch.float64, device=device),
            act_sumsq=torch.zeros((n_layers, d_mlp), dtype=torch.float64, device=device),
            n_tokens=torch.zeros((), **i64),
            k=k,
        )

    def _tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "k"}

    def to(self, device) -> "PassState":
        return PassState(**{n: t.to(device) for n, t in self._tensors().items()}, k=self.k)

    def state_dict(self) -> dict:
        return {**{n: t.cpu() for n, t in self._tensors().items()}, "k": torch.tensor(self.k)}

    @classmethod
    def from_state_dict(cls, d: dict) -> "PassState":
        return cls(**{n: t for n, t in d.items() if n != "k"}, k=int(d["k"]))

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
        spare = self.top_vals.shape[1] - self.k
        row_max = []
        for start in range(0, B, spare):                                       # a neuron gains <= spare per chunk
            part = acts[start:start + spare]
            row_max.append(self._fold_extremes(layer, part, first_token + start * T, largest=True))
            self._fold_extremes(layer, part, first_token + start * T, largest=False)
        self._update_tail(layer, acts, row_max[0] if len(row_max) == 1 else torch.cat(row_max))
        # The histogram is taken over every HIST_STRIDE-th token: a density estimate does not
        # need every token, and binning all of them would cost more than the forward pass.
        sample = x[::HIST_STRIDE].contiguous()
        self.hist[layer].view(-1).index_add_(
            0, (hist_index(sample) + torch.arange(d, device=x.device) * HIST_BINS).view(-1),
            torch.ones(1, dtype=torch.int64, device=x.device).expand(sample.numel()))
        # Sums in blocks of rows that stay in cache: squaring the whole batch at once costs
        # three times as much on a CPU.
        s, sq = torch.zeros(2, d, device=x.device)
        for block in x.split(256):
            s += block.sum(0)
            sq += (block * block).sum(0)
        self.act_sum[layer] += s
        self.act_sumsq[layer] += sq

    def _fold_extremes(self, layer: int, acts: torch.Tensor, first_token: int, largest: bool) -> torch.Tensor:
        """Append each input's strongest token to the neurons it may enter; returns the per-input extremes.

        A candidate below the k-th value of the last compaction cannot enter the k best, so
        positions and windows are computed only for (input, neuron) pairs at or above it (ties
        kept, so the result equals merging every input).
        """
        B, T, d = acts.shape
        names = ("top_vals", "top_pos", "top_win", "top_floor") if largest else \
                ("bot_vals", "bot_pos", "bot_win", "bot_floor")
        vals, pos, wins, floor = (getattr(self, n)[layer] for n in names)
        C = _chunk(T)
        cext = (acts.reshape(B, T // C, C, d).amax(2) if largest else
                acts.reshape(B, T // C, C, d).amin(2))                           # [B, T/C, d] per chunk
        v = cext.amax(1) if largest else cext.amin(1)                         # [B, d] per input
        hit = v >= floor if largest else v <= floor
        gained = hit.sum(0)                                                   # [d]
        used = (pos >= 0).sum(0)                                              # filled slots are a prefix
        full = (used + gained > vals.shape[0]).nonzero().squeeze(1)
        if full.numel():
            self._compact(layer, largest, full)
            used[full] = (pos[:, full] >= 0).sum(0)
        hb, hn = hit.nonzero(as_tuple=True)                                   # ordered by input, then neuron
        if hb.numel() == 0:
            return v
        # Only the chunk holding each hit's extreme is searched, and only its window is read.
        cm = cext[hb, :, hn]                                                  # [m, T/C]
        ci = cm.argmax(1) if largest else cm.argmin(1)
        inner = acts[hb.unsqueeze(1), ci.unsqueeze(1) * C + torch.arange(C, device=acts.device), hn.unsqueeze(1)]
        t = ci * C + (inner.argmax(1) if largest else inner.argmin(1))        # [m] position in the input
        idx = t.unsqueeze(1) + torch.arange(-WINDOW_BEFORE, WINDOW_AFTER + 1, device=acts.device)
        win = acts[hb.unsqueeze(1), idx.clamp(0, T - 1), hn.unsqueeze(1)]      # [m, WINDOW]
        win.masked_fill_((idx < 0) | (idx >= T), math.nan)
        slot = used[hn] + hit.cumsum(0)[hb, hn] - 1
        vals[slot, hn] = v[hb, hn]
        pos[slot, hn] = first_token + hb * T + t
        wins[slot, hn] = win
        return v

    def _compact(self, layer: int, largest: bool, cols: torch.Tensor | None = None) -> None:
        """Sort the slots of neurons ``cols`` (all when None) and keep the k best; the rest empty."""
        names = ("top_vals", "top_pos", "top_win", "top_floor") if largest else \
                ("bot_vals", "bot_pos", "bot_win", "bot_floor")
        vals, pos, wins, floor = (getattr(self, n)[layer] for n in names)
        cols = torch.arange(vals.shape[1], device=vals.device) if cols is None else cols
        v, p, w = _sort_slots(vals[:, cols], pos[:, cols], wins[:, cols], largest)
        k = self.k
        v[k:], p[k:], w[k:] = (-math.inf if largest else math.inf), -1, math.nan
        vals[:, cols], pos[:, cols], wins[:, cols] = v, p, w
        floor[cols] = v[k - 1]

    def finished(self) -> "PassState":
        """A copy with every neuron's slots sorted and exactly k kept: what results and merges read."""
        out = PassState(**{n: t.clone() for n, t in self._tensors().items()}, k=self.k)
        for layer in range(out.top_vals.shape[0]):
            out._compact(layer, True)
            out._compact(layer, False)
        for name in ("top_vals", "top_pos", "top_win", "bot_vals", "bot_pos", "bot_win"):
            setattr(out, name, getattr(out, name)[:, :self.k].contiguous())
        return out

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
        """The finished state of both shards' tokens together; ``self`` and ``other`` are unchanged."""
        a, b = self.finished(), other.finished()
        out = PassState(**{n: t.clone() for n, t in a._tensors().items()}, k=self.k)
        for name in ("top", "bot"):
            vals, pos, wins = (torch.cat([getattr(a, f"{name}_{f}"), getattr(b, f"{name}_{f}")], 1)
                               for f in ("vals", "pos", "win"))
            for layer in range(vals.shape[0]):
                v, p, w = _sort_slots(vals[layer], pos[layer], wins[layer], name == "top")
                getattr(out, f"{name}_vals")[layer], getattr(out, f"{name}_pos")[layer] = v[:self.k], p[:self.k]
                getattr(out, f"{name}_win")[layer] = w[:self.k]
                getattr(out, f"{name}_floor")[layer] = v[self.k - 1]
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


def _chunk(T: int) -> int:
    """Tokens per chunk when looking for an input's extreme: a divisor of T near 16, else T."""
    return next((c for c in (16, 8, 32, 12, 10, 20, 24, 64) if T % c == 0 and c < T), T)


def _sort_slots(vals, pos, wins, largest: bool):
    """Order slots ([n, d], windows [n, d, W]) best first; equal values by position, empty slots last.

    Equal activations (repeated text gives them) are ordered by position, so that the result
    does not depend on how the corpus was split into batches or shards.
    """
    by_pos = torch.where(pos < 0, torch.iinfo(torch.int64).max, pos).argsort(dim=0, stable=True)
    by_val = vals.gather(0, by_pos).argsort(dim=0, descending=largest, stable=True)
    i = by_pos.gather(0, by_val)
    return vals.gather(0, i), pos.gather(0, i), wins.gather(0, i.unsqueeze(-1).expand(*i.shape, wins.shape[-1]))
