"""What the default corpus does to the exemplars: one corpus pass over the mixed default corpus
(a snapshot at N tokens and the state at 2N), and one over Python's docs alone (N tokens).

    .venv/bin/python scripts/measure_corpus.py 16384 out.json

Prints and writes: pass tokens/s with the load average beside it, the share of neurons whose
strongest exemplar changes when the corpus doubles, the share whose strongest exemplar comes
from Brown, duplicate windows, and the strongest exemplars of L29/N808 (the " dog" `out` neuron)
and of the neurons whose top exemplars most often peak on dog/cat/pet words.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import torch

from atlas.config import ExemplarConfig
from atlas.model.load import load_model
from atlas.stages.activations import PassState
from atlas.stages.exemplars import hooked_pass, read_rows, spare_slots

PETS = re.compile(r"\b(dogs?|cats?|pets?|pupp(y|ies)|kittens?|hounds?|animals?)\b", re.I)
DOG = (29, 808)


def corpus_pass(lm, n_tokens: int, snapshot_tokens: int | None = None):
    cfg = ExemplarConfig(max_tokens=n_tokens)
    rows = read_rows(cfg, lm.tokenizer)
    L, d = lm.adapter.n_layers(lm.model), lm.adapter.d_mlp(lm.model)
    state = PassState.empty(L, d, cfg.k, 1, "cpu", spare_slots(cfg))
    snap = {}
    snap_batches = snapshot_tokens // (cfg.batch_size * cfg.context) if snapshot_tokens else None
    times = []
    last = [time.perf_counter()]

    def on_batch(done, st):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        if done == snap_batches:
            snap["state"] = st.finished()

    load0 = os.getloadavg()
    hooked_pass(lm, rows, state, 0, cfg.batch_size, on_batch, progress=False)
    load1 = os.getloadavg()
    return rows, state.finished(), snap.get("state"), {
        "tokens": len(rows) * cfg.context, "seconds": round(sum(times), 1),
        "tokens_per_s": round(len(rows) * cfg.context / sum(times), 1),
        "median_batch_s": round(sorted(times)[len(times) // 2], 2), "loadavg_before": load0, "loadavg_after": load1}


def windows(rows, state: PassState, layer: int, neuron: int, T: int, tok) -> list[str]:
    out = []
    for p in state.top_pos[layer, :, neuron].tolist():
        if p < 0:
            continue
        r, t = divmod(p, T)
        ids = rows[r].token_ids
        lo, hi = max(0, t - state.before), t + state.after + 1
        out.append(tok.decode(ids[lo:t]) + "[[" + tok.decode(ids[t:t + 1]) + "]]" + tok.decode(ids[t + 1:hi]))
    return out


def duplicates(rows, state: PassState, T: int) -> int:
    """Neurons (max side) whose top exemplars hold one window's tokens twice."""
    pos = state.top_pos                                             # [L, k, d]
    L, k, d = pos.shape
    flat = []
    for p in pos.reshape(-1).tolist():
        r, t = divmod(p, T)
        flat.append(tuple(rows[r].token_ids[max(0, t - state.before):t + state.after + 1]) if p >= 0 else None)
    n = 0
    for layer in range(L):
        for neuron in range(d):
            w = [flat[(layer * k + i) * d + neuron] for i in range(k)]
            w = [x for x in w if x is not None]
            n += len(set(w)) < len(w)
    return n


def pet_neurons(rows, state: PassState, T: int, tok, top: int = 5):
    """Neurons whose top exemplars' peak tokens are most often dog/cat/pet words."""
    pets = {i for i in range(len(tok)) if PETS.fullmatch(tok.decode([i]).strip() or "-")}
    peak = torch.zeros_like(state.top_pos, dtype=torch.bool)
    valid = state.top_pos >= 0
    rows_t = torch.tensor([r.token_ids for r in rows])
    p = state.top_pos.clamp_min(0)
    ids = rows_t[p // T, p % T]
    peak = valid & torch.isin(ids, torch.tensor(sorted(pets)))
    count = peak.sum(1)                                             # [L, d]
    best = count.flatten().topk(top)
    d = count.shape[1]
    return [(int(i) // d, int(i) % d, int(c)) for c, i in zip(best.values, best.indices)]


def main(n: int, out: str) -> None:
    lm = load_model(device="cpu")
    tok = lm.tokenizer
    T = ExemplarConfig().context
    result = {}
    rows, whole, half, timing = corpus_pass(lm, 2 * n, n)
    result["mixed"] = timing
    L, k, d = whole.top_pos.shape
    same_top1 = (whole.top_pos[:, 0] == half.top_pos[:, 0]).float().mean().item()
    overlap = sum(len(set(a) & set(b)) for a, b in zip(whole.top_pos.permute(0, 2, 1).reshape(-1, k).tolist(),
                                                     half.top_pos.permute(0, 2, 1).reshape(-1, k).tolist())) / (L * d * k)
    brown_rows = torch.tensor([r.source.startswith("brown:") for r in rows])
    for name, st in ((f"mixed_{n}", half), (f"mixed_{2 * n}", whole)):
        top1_rows = st.top_pos[:, 0].clamp_min(0) // T
        result[name] = {
            "share_top1_from_brown": round(brown_rows[top1_rows].float().mean().item(), 4),
            "neurons_with_duplicate_windows": duplicates(rows, st, T),
            "dog_L29_N808": windows(rows, st, *DOG, T, tok),
            "pet_neurons": pet_neurons(rows, st, T, tok)}
    result["doubling"] = {"share_top1_unchanged": round(same_top1, 4), "top20_overlap": round(overlap, 4)}
    print(json.dumps(result, indent=1))
    os.environ["ATLAS_CORPUS_BROWN"] = "/nonexistent"
    prow, pstate, _, ptiming = corpus_pass(lm, n)
    result["python_only"] = timing_p = ptiming
    result[f"python_{n}"] = {"neurons_with_duplicate_windows": duplicates(prow, pstate, T),
                             "dog_L29_N808": windows(prow, pstate, *DOG, T, tok),
                             "pet_neurons": pet_neurons(prow, pstate, T, tok)}
    # Of the neurons, how many have another strongest exemplar on the mixed corpus than on Python's docs alone.
    def top1_ids(rs, st):
        p = st.top_pos[:, 0].clamp_min(0)
        return [rs[r].token_ids[t] for r, t in zip((p // T).flatten().tolist(), (p % T).flatten().tolist())]
    a, b = top1_ids(rows, half), top1_ids(prow, pstate)
    result["mixed_vs_python"] = {"share_top1_peak_token_differs": round(sum(x != y for x, y in zip(a, b)) / len(a), 4),
                                 "norm_ratio_median": round(float((half.tail_vals[:, 0] / pstate.tail_vals[:, 0]).median()), 4)}
    print(json.dumps({k: result[k] for k in ("python_only", f"python_{n}", "mixed_vs_python")}, indent=1))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
