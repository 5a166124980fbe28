#!/usr/bin/env python3
"""Where one layer's `PassState.update` spends its time, part by part, on a CPU or a GPU.

    python scripts/pass_profile.py OUTDIR [--device cuda] [--d-mlp 14336] [--batches 32] [--group 1 8]

The first GPU check (README, "Checking atlas on a GPU") measured the hooked corpus pass at
0.239 of a plain forward pass on an H200. This times the statistics alone, on random
activations of one layer of the given width (batches of 16 x 128 tokens, the build's), so
that the fix can aim at the part that costs: each part is timed with the device synchronised
around it, and torch's profiler lists the operators by device time. Needs only torch: the
module is loaded from its file, without the atlas package and its dependencies.

``--group`` times updates that fold several layers per call, as the hooked pass does on a
GPU, and reports milliseconds per layer; each grouped run also checks that its state is bit
for bit that of folding the same batches one layer at a time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PARTS = ("_fold_extremes", "_compact", "_update_tail", "_update_samples")


def load_activations():
    spec = importlib.util.spec_from_file_location("activations", REPO / "atlas" / "stages" / "activations.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["activations"] = mod           # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}
    return t.view(ints[t.dtype]) if t.dtype in ints else t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--d-mlp", type=int, default=14336)
    ap.add_argument("--batches", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--group", type=int, nargs="+", default=[1],
                    help="layers folded per update call, as hooked_pass does on a GPU (8 at the 8B shape); "
                         "several sizes are timed one after the other, e.g. --group 1 8")
    ap.add_argument("--check-batches", type=int, default=6,
                    help="batches folded both in groups and one layer at a time, to compare the states bit for bit")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    act = load_activations()
    B, T, d, dev = a.batch_size, a.context, a.d_mlp, a.device
    gen = torch.Generator(device=dev).manual_seed(0)
    # SwiGLU-like activations: mostly small, heavy tails, in the model's bf16.
    batches = [(torch.randn(B, T, d, device=dev, generator=gen) ** 3 * 0.1).to(torch.bfloat16)
               for _ in range(4)]
    results = {}
    for G in a.group:
        results[G], table = profile_group(act, batches, G, a)
    result = {
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
        "torch": torch.__version__, "d_mlp": d, "batch": f"{B} x {T}", "batches": a.batches,
        "groups": results,
        "note": "ms per layer = one update call's ms / layers in the call; _compact runs inside "
                "_fold_extremes (both polarities) and is counted in both; the profiler table is the last group's",
    }
    (a.out / "pass-profile.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "pass-profile.txt").write_text(table)
    print(json.dumps(result, indent=2))
    print(table)


def profile_group(act, batches, G: int, a) -> tuple[dict, str]:
    """Time updates of G layers at once on the given batches; returns figures per layer and the profiler table."""
    B, T, d, dev = a.batch_size, a.context, a.d_mlp, a.device
    # A group's activations as hooked_pass hands them over: float32 [G, B, T, d], each layer a
    # different batch so that layers do not share their extremes.
    stacks = [torch.stack([batches[(i + j) % 4] for j in range(G)]).float() for i in range(4)] if G > 1 else batches

    def fresh(layers=G):
        return act.PassState.empty(layers, d, 20, 1, dev, spare=min(B, 32))

    # Whole updates, the way the pass calls them (no sync inside).
    state = fresh()
    for i in range(3):
        state.update(0, stacks[i % 4], i * B * T)
    sync(dev)
    t = time.perf_counter()
    for i in range(a.batches):
        state.update(0, stacks[i % 4], (i + 3) * B * T)
    sync(dev)
    whole = (time.perf_counter() - t) / a.batches / G

    # Part by part: wrap each method with synchronised timers.
    spent = {p: 0.0 for p in PARTS}
    spent["hist+sums (rest)"] = 0.0
    originals = {p: getattr(act.PassState, p) for p in PARTS}

    def timed(name, fn):
        def wrapper(self, *args, **kw):
            sync(dev)
            s = time.perf_counter()
            r = fn(self, *args, **kw)
            sync(dev)
            spent[name] += time.perf_counter() - s
            return r
        return wrapper

    for p in PARTS:
        setattr(act.PassState, p, timed(p, originals[p]))
    state = fresh()
    total = 0.0
    for i in range(a.batches):
        sync(dev)
        s = time.perf_counter()
        state.update(0, stacks[i % 4], i * B * T)
        sync(dev)
        total += time.perf_counter() - s
    inner = spent["_fold_extremes"] + spent["_update_tail"] + spent["_update_samples"]
    spent["hist+sums (rest)"] = total - inner
    for p in PARTS:
        setattr(act.PassState, p, originals[p])

    # The same batches folded one layer at a time must leave the same state, bit for bit.
    same = None
    if G > 1 and a.check_batches:
        grouped, single = fresh(), fresh()
        for i in range(a.check_batches):
            grouped.update(0, stacks[i % 4], i * B * T)
            for j in range(G):
                single.update(j, stacks[i % 4][j], i * B * T)
        grouped, single = grouped.finished(), single.finished()
        same = all(torch.equal(bits(t), bits(getattr(grouped, n))) for n, t in single._tensors().items())

    # The operators, by device time (CPU time on a CPU).
    state = fresh()
    acts_ = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with torch.profiler.profile(activities=acts_) as prof:
        for i in range(8):
            state.update(0, stacks[i % 4], i * B * T)
        sync(dev)
    key = "cuda_time_total" if dev.startswith("cuda") else "cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=25)
    except Exception:                      # newer torch names it device_time_total
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
    return {
        "layers_per_call": G,
        "ms_per_layer_unsynced": round(whole * 1e3, 3),
        "ms_per_layer_synced_parts": round(total / a.batches / G * 1e3, 3),
        "parts_ms_per_layer": {k: round(v / a.batches / G * 1e3, 3) for k, v in spent.items()},
        "layers_8b_ms_per_batch": round(whole * 1e3 * 32, 1),
        "same_as_one_layer_at_a_time": same,
    }, table


if __name__ == "__main__":
    main()
