"""Per-neuron statistics of a corpus pass, kept as a state that merges associatively.

``PassState`` holds, for every neuron of every layer, the top and bottom activations with
where they happened and the activations of the tokens around them, a histogram on fixed
bins, a few sampled tokens per histogram bin, and running sums. ``update`` folds in one batch; ``merge`` combines two states of
disjoint shards, so a corpus can be split over processes or GPUs and a pass resumed from a
checkpoint exactly. Memory is O(k x neurons), never O(tokens x neurons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

# The default exemplar window: 24 tokens centred on the peak (ExemplarConfig.window_before/after).
WINDOW_BEFORE, WINDOW_AFTER = 12, 11
WINDOW = WINDOW_BEFORE + 1 + WINDOW_AFTER
# Band samples: tokens taken as candidates are those whose position hash is 0 mod SAMPLE_EVERY
# (never an input's first token, the BOS, whose activations are unlike any text's); per neuron
# and histogram bin the SAMPLES candidates with the smallest hash are kept: a uniform sample of
# the bin that does not depend on batching, sharding or merge order.
SAMPLE_EVERY, SAMPLES = 16, 2
_M1, _M2 = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_NO_HASH = torch.iinfo(torch.int64).max
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


def position_hash(pos: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 positions: a bijection, so distinct tokens never tie."""
    x = pos.long() + _GOLDEN
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _M1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


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
    samp_pos: torch.Tensor      # [L, d_mlp, HIST_BINS, SAMPLES] sampled tokens per bin, smallest hash first; -1 empty
    samp_val: torch.Tensor      # [L, d_mlp, HIST_BINS, SAMPLES] their activations
    k: int = 20
    before: int = WINDOW_BEFORE  # window tokens before and after each exemplar's peak
    after: int = WINDOW_AFTER

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int, k: int, k_tail: int, device="cpu", spare: int = 16,
              before: int = WINDOW_BEFORE, after: int = WINDOW_AFTER) -> "PassState":
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        slots = k + max(1, spare)
        window = before + 1 + after
        return cls(
            top_vals=torch.full((n_layers, slots, d_mlp), -math.inf, **f32),
            top_pos=torch.full((n_layers, slots, d_mlp), -1, **i64),
            top_win=torch.full((n_layers, slots, d_mlp, window), math.nan, **f32),
            top_floor=torch.full((n_layers, d_mlp), -math.inf, **f32),
            bot_vals=torch.full((n_layers, slots, d_mlp), math.inf, **f32),
            bot_pos=torch.full((n_layers, slots, d_mlp), -1, **i64),
            bot_win=torch.full((n_layers, slots, d_mlp, window), math.nan, **f32),
            bot_floor=torch.full((n_layers, d_mlp), math.inf, **f32),
            tail_vals=torch.full((n_layers, k_tail, d_mlp), -math.inf, **f32),
            hist=torch.zeros((n_layers, d_mlp, HIST_BINS), **i64),
            act_sum=torch.zeros((n_layers, d_mlp), dtype=torch.float64, device=device),
            act_sumsq=torch.zeros((n_layers, d_mlp), dtype=torch.float64, device=device),
            n_tokens=torch.zeros((), **i64),
            samp_pos=torch.full((n_layers, d_mlp, HIST_BINS, SAMPLES), -1, **i64),
            samp_val=torch.full((n_layers, d_mlp, HIST_BINS, SAMPLES), math.nan, **f32),
            k=k, before=before, after=after,
        )

    def _tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SCALARS}

    def _scalars(self) -> dict:
        return {n: getattr(self, n) for n in _SCALARS}

    def to(self, device) -> "PassState":
        return PassState(**{n: t.to(device) for n, t in self._tensors().items()}, **self._scalars())

    def state_dict(self) -> dict:
        return {**{n: t.cpu() for n, t in self._tensors().items()},
                **{n: torch.tensor(v) for n, v in self._scalars().items()}}

    @classmethod
    def from_state_dict(cls, d: dict) -> "PassState":
        return cls(**{n: t for n, t in d.items() if n not in _SCALARS}, **{n: int(d[n]) for n in _SCALARS})

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
        self._update_samples(layer, x, first_token, T)
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
        idx = t.unsqueeze(1) + torch.arange(-self.before, self.after + 1, device=acts.device)
        win = acts[hb.unsqueeze(1), idx.clamp(0, T - 1), hn.unsqueeze(1)]      # [m, window]
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
        out = PassState(**{n: t.clone() for n, t in self._tensors().items()}, **self._scalars())
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

    def _update_samples(self, layer: int, x: torch.Tensor, first_token: int, T: int) -> None:
        """Offer this batch's candidate tokens to every neuron's per-bin samples. ``x`` is [B*T, d]."""
        g = first_token + torch.arange(x.shape[0], device=x.device)                # global token index
        h = position_hash(g)
        cand = ((g % T != 0) & (h % SAMPLE_EVERY == 0)).nonzero().squeeze(1)
        if cand.numel() == 0:
            return
        cand = cand[h[cand].argsort()]                                            # smallest hash first
        n_c, d = cand.numel(), x.shape[1]
        vals = x[cand]                                                             # [n_c, d]
        key = (hist_index(vals.clone()) + torch.arange(d, device=x.device) * HIST_BINS).view(-1)
        rank = torch.arange(n_c, device=x.device).unsqueeze(1).expand(n_c, d).reshape(-1)
        new_pos = torch.full((d * HIST_BINS, SAMPLES), -1, dtype=torch.int64, device=x.device)
        new_val = torch.full((d * HIST_BINS, SAMPLES), math.nan, device=x.device)
        flat_vals = vals.reshape(-1)
        for m in range(SAMPLES):
            best = torch.full((d * HIST_BINS,), n_c, dtype=torch.int64, device=x.device)
            best.scatter_reduce_(0, key, rank, "amin")                              # per (neuron, bin)
            won = (best[key] == rank) & (rank < n_c)                               # [n_c * d]
            if not won.any():
                break
            new_pos[key[won], m] = g[cand[rank[won]]]
            new_val[key[won], m] = flat_vals[won]
            rank = torch.where(won, n_c, rank)                                      # out of later rounds
        pos, val = _keep_smallest_hash(torch.cat([self.samp_pos[layer].view(-1, SAMPLES), new_pos], 1),
                                       torch.cat([self.samp_val[layer].view(-1, SAMPLES), new_val], 1))
        self.samp_pos[layer] = pos.view(d, HIST_BINS, SAMPLES)
        self.samp_val[layer] = val.view(d, HIST_BINS, SAMPLES)

    def count_tokens(self, n: int) -> None:
        self.n_tokens += n

    # -- merging shards -------------------------------------------------------------
    def merge(self, other: "PassState") -> "PassState":
        """The finished state of both shards' tokens together; ``self`` and ``other`` are unchanged."""
        a, b = self.finished(), other.finished()
        out = PassState(**{n: t.clone() for n, t in a._tensors().items()}, **self._scalars())
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
        for layer in range(out.samp_pos.shape[0]):
            out.samp_pos[layer], out.samp_val[layer] = _keep_smallest_hash(
                torch.cat([self.samp_pos[layer], other.samp_pos[layer]], -1),
                torch.cat([self.samp_val[layer], other.samp_val[layer]], -1))
        return out

    # -- results --------------------------------------------------------------------
    def normaliser(self, q: float) -> torch.Tensor:
        """The upper ``q`` quantile per neuron [L, d_mlp], exact while q * tokens < K.

        The upper q quantile of n values is the value of descending rank floor(q * n).
        """
        n = int(self.n_tokens)
        rank = min(int(math.floor(q * n)), self.tail_vals.shape[1] - 1)
        return self.tail_vals[:, rank, :]


_SCALARS = ("k", "before", "after")


def _keep_smallest_hash(pos: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the candidates on the last axis, the SAMPLES with the smallest position hash (empty last)."""
    key = torch.where(pos < 0, _NO_HASH, position_hash(pos))
    i = key.argsort(dim=-1)[..., :SAMPLES]
    return pos.gather(-1, i), val.gather(-1, i)


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
