"""Per-neuron statistics of a corpus pass, kept as a state that merges associatively.

``PassState`` holds, for every neuron of every layer, the top and bottom activations with
where they happened and the activations of the tokens around them, a histogram on fixed
bins, a few sampled tokens per histogram bin, and running sums. ``update`` folds in one batch
for one layer or a group of consecutive layers; ``merge`` combines two states of disjoint
shards, so a corpus can be split over processes or GPUs and a pass resumed from a checkpoint
exactly. Memory is O(k x neurons), never O(tokens x neurons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

# The default exemplar window: the 12 tokens a page's strip shows, 7 before the peak and 4 after
# (ExemplarConfig.window_before/after; corpus_sections.STRIP_BEFORE/AFTER).
WINDOW_BEFORE, WINDOW_AFTER = 7, 4
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
        """Fold one batch in for layers ``layer ..``: ``acts`` is [layers, batch, context, d_mlp],
        or [batch, context, d_mlp] for one layer.

        ``first_token`` is the global index of the batch's first token, so that
        ``first_token + flat position`` names each token across the whole corpus.
        Exemplars are per model input (its strongest token), so a neuron's exemplars come
        from different inputs instead of neighbouring tokens of one. Every statistic is
        computed for all the given layers at once, so that a GPU launches its kernels and
        waits for the host once per group of layers instead of once per layer; the state
        is the same, bit for bit, as folding the layers one at a time.
        """
        acts = acts.float()
        if acts.dim() == 3:
            acts = acts.unsqueeze(0)
        G, B, T, d = acts.shape
        layers = slice(layer, layer + G)
        x = acts.reshape(G, B * T, d)                                          # [G, BT, d]
        spare = self.top_vals.shape[1] - self.k
        row_max = []
        for start in range(0, B, spare):                                       # a neuron gains <= spare per chunk
            row_max.append(self._fold_extremes(layers, acts[:, start:start + spare], first_token + start * T))
        self._update_tail(layers, acts, row_max[0] if len(row_max) == 1 else torch.cat(row_max, 1))
        self._update_samples(layers, x, first_token, T)
        # The histogram is taken over every HIST_STRIDE-th token: a density estimate does not
        # need every token, and binning all of them would cost more than the forward pass.
        sample = x[:, ::HIST_STRIDE].contiguous()                              # [G, BT / stride, d]
        cell = (torch.arange(G, device=x.device).view(G, 1, 1) * d
                + torch.arange(d, device=x.device)) * HIST_BINS                # [G, 1, d] first bin of each neuron
        self.hist[layers].view(-1).index_add_(
            0, (hist_index(sample) + cell).view(-1),
            torch.ones(1, dtype=torch.int64, device=x.device).expand(sample.numel()))
        # Sums in blocks of rows that stay in cache: squaring the whole batch at once costs
        # three times as much on a CPU. Layer by layer, with the very reductions one layer per
        # call makes: on an H200 the grouped state of a tiny model differed from the one-layer
        # state where the sums ran over [G, rows, d] (a reduction's order follows its shape).
        s, sq = torch.zeros(2, G, d, device=x.device)
        for g in range(G):
            for block in x[g].split(256):
                s[g] += block.sum(0)
                sq[g] += (block * block).sum(0)
        self.act_sum[layers] += s
        self.act_sumsq[layers] += sq

    def _fold_extremes(self, layers: slice, acts: torch.Tensor, first_token: int) -> torch.Tensor:
        """Append each input's strongest and weakest token to the neurons they may enter; returns
        the per-input maxima [G, B, d].

        A candidate below the k-th value of the last compaction cannot enter the k best, so
        positions and windows are computed only for (input, neuron) pairs at or above it (ties
        kept, so the result equals merging every input). Which neurons must be compacted first
        and which pairs are candidates, for both polarities, come back in one host sync.
        """
        G, B, T, d = acts.shape
        C = _chunk(T)
        folds = []
        for largest in (True, False):
            names = ("top_vals", "top_pos", "top_win", "top_floor") if largest else \
                    ("bot_vals", "bot_pos", "bot_win", "bot_floor")
            vals, pos, wins, floor = (getattr(self, n)[layers] for n in names)   # [G, slots, d], floor [G, d]
            chunks = acts.reshape(G, B, T // C, C, d)
            cext = chunks.amax(3) if largest else chunks.amin(3)               # [G, B, T/C, d] per chunk
            v = cext.amax(2) if largest else cext.amin(2)                      # [G, B, d] per input
            hit = v >= floor.unsqueeze(1) if largest else v <= floor.unsqueeze(1)
            used = (pos >= 0).sum(1)                                           # [G, d] filled slots are a prefix
            full = used + hit.sum(1) > vals.shape[1]                           # [G, d]
            folds.append((largest, vals, pos, wins, cext, v, hit, used, full))
            if largest:
                row_max = v
        # One nonzero over all four masks, then their four counts: the only point where the
        # host waits for the device (once the nonzero is done, the counts are a short copy).
        masks = [m.reshape(-1) for *_, hit, _, full in folds for m in (full, hit)]
        counts = torch.stack([m.sum() for m in masks])
        found = torch.cat(masks).nonzero().squeeze(1)
        offsets = [0]
        for m in masks[:-1]:
            offsets.append(offsets[-1] + m.numel())
        parts = [p - o for p, o in zip(found.split(counts.tolist()), offsets)]
        for i, (largest, vals, pos, wins, cext, v, hit, used, full) in enumerate(folds):
            full_at, hit_at = parts[2 * i], parts[2 * i + 1]
            if full_at.numel():
                for g in (full_at // d).unique().tolist():                    # rare: a loop per layer is fine
                    self._compact(layers.start + g, largest, full_at[full_at // d == g] % d)
                    used[g] = (pos[g] >= 0).sum(0)
            if hit_at.numel() == 0:
                continue
            hg, rest = hit_at // (B * d), hit_at % (B * d)                      # ordered by layer, input, neuron
            hb, hn = rest // d, rest % d
            # Only the chunk holding each hit's extreme is searched, and only its window is read.
            cm = cext[hg, hb, :, hn]                                           # [m, T/C]
            ci = cm.argmax(1) if largest else cm.argmin(1)
            hg_, hb_, hn_ = hg.unsqueeze(1), hb.unsqueeze(1), hn.unsqueeze(1)
            inner = acts[hg_, hb_, ci.unsqueeze(1) * C + torch.arange(C, device=acts.device), hn_]
            t = ci * C + (inner.argmax(1) if largest else inner.argmin(1))    # [m] position in the input
            idx = t.unsqueeze(1) + torch.arange(-self.before, self.after + 1, device=acts.device)
            win = acts[hg_, hb_, idx.clamp(0, T - 1), hn_]                     # [m, window]
            win.masked_fill_((idx < 0) | (idx >= T), math.nan)
            slot = used[hg, hn] + hit.cumsum(1)[hg, hb, hn] - 1
            vals[hg, slot, hn] = v[hg, hb, hn]
            pos[hg, slot, hn] = first_token + hb * T + t
            wins[hg, slot, hn] = win
        return row_max

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

    def _update_tail(self, layers: slice, acts: torch.Tensor, row_max: torch.Tensor) -> None:
        """Token-level top values for the quantile. A token in the corpus-wide top K is in its
        own input's top K, so each input's top K are the only candidates; with K = 1 (corpora
        under 1e5 tokens at q = 1e-5) they are the per-input maxima already at hand.
        ``acts`` is [G, B, T, d], ``row_max`` [G, B, d]."""
        K = self.tail_vals.shape[1]
        if K == 1:
            torch.maximum(self.tail_vals[layers, 0], row_max.amax(1), out=self.tail_vals[layers, 0])
            return
        cand = acts.topk(min(K, acts.shape[2]), dim=2).values.flatten(1, 2)             # [G, B*K, d]
        self.tail_vals[layers] = torch.cat([self.tail_vals[layers], cand], 1).topk(K, dim=1).values

    def _update_samples(self, layers: slice, x: torch.Tensor, first_token: int, T: int) -> None:
        """Offer this batch's candidate tokens to every neuron's per-bin samples. ``x`` is [G, B*T, d].

        Which tokens are candidates depends only on their positions, so the host works them
        out and the device never has to report a count back; each round's winners are
        gathered at fixed size, without a mask, for the same reason.
        """
        G, n, d = x.shape
        cand, cand_pos = _sample_candidates(first_token, n, T)
        if cand.numel() == 0:
            return
        dev = x.device
        cand_key = position_hash(cand_pos)                                        # ascending: cand is in hash order
        cand, cand_pos, cand_key = (_to_device(t, dev) for t in (cand, cand_pos, cand_key))
        n_c, cells = cand.numel(), G * d * HIST_BINS
        vals = x[:, cand]                                                         # [G, n_c, d]
        first_bin = (torch.arange(G, device=dev).view(G, 1, 1) * d + torch.arange(d, device=dev)) * HIST_BINS
        key = (hist_index(vals) + first_bin).view(-1)                             # (layer, neuron, bin) cell
        rank = torch.arange(n_c, device=dev).view(1, n_c, 1).expand(G, n_c, d).reshape(-1)
        cell = torch.arange(cells, device=dev) // HIST_BINS                      # layer * d + neuron
        at = (cell // d) * (n_c * d) + cell % d                                   # vals' flat index of rank 0
        new_pos = torch.empty((cells, SAMPLES), dtype=torch.int64, device=dev)
        new_key = torch.empty((cells, SAMPLES), dtype=torch.int64, device=dev)
        new_val = torch.empty((cells, SAMPLES), device=dev)
        flat_vals = vals.view(-1)
        for m in range(SAMPLES):
            best = torch.full((cells,), n_c, dtype=torch.int64, device=dev)
            best.scatter_reduce_(0, key, rank, "amin")                              # per cell
            won = best < n_c
            pick = best.clamp(max=n_c - 1)
            new_pos[:, m] = torch.where(won, cand_pos[pick], -1)
            new_key[:, m] = torch.where(won, cand_key[pick], _NO_HASH)
            new_val[:, m] = torch.where(won, flat_vals[at + pick * d], math.nan)
            rank = torch.where(best[key] == rank, n_c, rank)                        # out of later rounds
        # The new candidates' hashes were worked out on the host: only the kept ones are hashed here.
        old_pos = self.samp_pos[layers].view(-1, SAMPLES)
        pos, val = _keep_smallest_hash(torch.cat([old_pos, new_pos], 1),
                                       torch.cat([self.samp_val[layers].view(-1, SAMPLES), new_val], 1),
                                       torch.cat([_hash_key(old_pos), new_key], 1))
        self.samp_pos[layers] = pos.view(G, d, HIST_BINS, SAMPLES)
        self.samp_val[layers] = val.view(G, d, HIST_BINS, SAMPLES)

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


def _hash_key(pos: torch.Tensor) -> torch.Tensor:
    """The order of sampled tokens: their position hash; empty slots (-1) last."""
    return torch.where(pos < 0, _NO_HASH, position_hash(pos))


def _keep_smallest_hash(pos: torch.Tensor, val: torch.Tensor, key: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the candidates on the last axis, the SAMPLES with the smallest position hash (empty
    last); ``key`` is their ``_hash_key`` when the caller has it.

    Distinct positions never tie (the hash is a bijection); empty candidates tie, and are
    equal (position -1, value NaN), so any order of them gives the same result. For two
    samples the smallest and the next are found with two argmins instead of a sort of every
    cell's candidates, which on a GPU was the largest kernel of the pass.
    """
    key = _hash_key(pos) if key is None else key
    if SAMPLES == 2:
        first = key.argmin(-1, keepdim=True)
        second = key.scatter(-1, first, _NO_HASH).argmin(-1, keepdim=True)
        # When every other candidate is empty that argmin may return the first again; any
        # other index is then an empty one.
        second = torch.where(second == first, (first + 1) % key.shape[-1], second)
        i = torch.cat([first, second], -1)
    else:
        i = key.argsort(dim=-1)[..., :SAMPLES]
    return pos.gather(-1, i), val.gather(-1, i)


def _sample_candidates(first_token: int, n: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's candidate rows for band samples, smallest hash first, and their global
    token indices, on the CPU. Tokens whose position hash is 0 mod SAMPLE_EVERY, never an
    input's first."""
    g = first_token + torch.arange(n)
    h = position_hash(g)
    cand = ((g % T != 0) & (h % SAMPLE_EVERY == 0)).nonzero().squeeze(1)
    cand = cand[h[cand].argsort()]
    return cand, g[cand]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device``; to a GPU from pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
