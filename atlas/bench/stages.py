"""`atlas bench`: each stage timed against its own lower bound, measured in the same run."""

from __future__ import annotations

import functools
import platform
import time

import torch

from atlas.stages.decode import default_chunk, stats_rows
from atlas.stages.decode_kernel import Unembedding, bare_matmul_topk, decode_directions
from atlas.stages.activations import PassState
from atlas.model.load import LoadedModel, load_model


def _load(model: str, shape: str | None, device: str, dtype: str, layers: int | None) -> tuple[LoadedModel, int]:
    """The model to time and its real layer count: a checkpoint, or random weights of a known
    shape (keeping only ``layers`` layers, so a big shape fits a small machine)."""
    if shape:
        from atlas.config import SHAPES
        from atlas.model.shapes import random_model
        lm = random_model(shape, device, dtype, layers or None)
        return lm, SHAPES[shape][1]
    lm = load_model(model, device, dtype)
    return lm, lm.adapter.n_layers(lm.model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process, and of the GPU when one is used (MiB)."""
    import resource
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def bench_decode(model: str = "default", device: str = "auto", dtype: str = "auto", layers: int = 6,
                 repeats: int = 3, top_k: int = 20, bottom_k: int = 10, shape: str | None = None,
                 neurons: int | None = None) -> dict:
    """Decode of every side of ``layers`` layers vs the bare matmul + top-k on the same shapes
    (with ``neurons``, of each side's first ``neurons`` only: a quick run; the estimate scales up).

    The two are interleaved and each keeps its fastest repeat, so drift in machine load
    affects both alike.
    """
    lm, total_layers = _load(model, shape, device, dtype, layers)
    m, a = lm.model, lm.adapter
    n_layers = a.n_layers(m)
    picked = list(range(n_layers)) if layers <= 0 else \
        sorted({round(i * (n_layers - 1) / max(1, layers - 1)) for i in range(min(layers, n_layers))})
    if lm.device.type == "cpu":
        torch.set_flush_denormal(True)
    U = Unembedding.build(a.W_U(m), a.final_gain(m), lm.device, next(m.parameters()).dtype)
    chunk = default_chunk(lm.device, U.vocab, 0)
    decode = functools.partial(decode_directions, stats_rows=stats_rows(lm.device, U.vocab))   # as the stage runs it
    V = [a.direction(m, layer, side)[:neurons] for layer in picked for side in a.sides]  # each [d_mlp, d_model]

    def run(fn) -> float:
        _sync(lm.device)
        start = time.perf_counter()
        for v in V:
            fn(v, U, top_k, bottom_k, chunk)
        _sync(lm.device)
        return time.perf_counter() - start

    run(bare_matmul_topk)  # warm-up: first-touch allocations, kernel selection
    bare, full = [], []
    for _ in range(max(1, repeats)):
        bare.append(run(bare_matmul_topk))
        full.append(run(decode))
    n_dirs = sum(v.shape[0] for v in V)
    per_dir = min(full) / n_dirs
    all_dirs = total_layers * len(a.sides) * a.d_mlp(m)
    return {
        "stage": "decode", "model": lm.model_id, "device": _device_name(lm.device),
        "dtype": str(U.W_c_T.dtype).removeprefix("torch."), "layers_timed": len(picked),
        "sides": list(a.sides), "directions_timed": n_dirs, "vocab": U.vocab, "chunk_rows": chunk,
        "decode_s": min(full), "bare_matmul_topk_s": min(bare), "ratio": min(full) / min(bare),
        "directions_per_s": 1 / per_dir, "full_model_estimate_s": per_dir * all_dirs,
        "repeats": len(full), **peak_memory(lm.device),
    }


def bench_corpus(model: str = "default", device: str = "auto", dtype: str = "auto", batches: int = 32,
                 batch_size: int = 16, context: int = 128, repeats: int = 1, shape: str | None = None,
                 layers: int | None = None) -> dict:
    """The hooked corpus pass vs the same forward passes without statistics, interleaved batch by batch."""
    from atlas.stages.exemplars import ExemplarConfig, hooked_pass, k_tail, read_rows, spare_slots

    lm, _ = _load(model, shape, device, dtype, layers)
    cfg = ExemplarConfig(max_tokens=batches * batch_size * context, context=context, batch_size=batch_size)
    if lm.tokenizer is None:   # a random shape has no tokenizer; random ids cost the same
        from atlas.stages.corpus import Row
        gen = torch.Generator().manual_seed(0)
        vocab = lm.adapter.W_U(lm.model).shape[0]
        rows = [Row(i, "random", torch.randint(0, vocab, (context,), generator=gen).tolist())
                for i in range(batches * batch_size)]
    else:
        rows = read_rows(cfg, lm.tokenizer)
    L, d = lm.adapter.n_layers(lm.model), lm.adapter.d_mlp(lm.model)
    tokens = len(rows) * context

    def empty_state(device) -> PassState:
        # The same state the build's pass keeps for this many tokens.
        return PassState.empty(L, d, cfg.k, k_tail(cfg, tokens), device, spare_slots(cfg),
                               cfg.window_before, cfg.window_after)

    def timed(part: list, state: PassState | None) -> float:
        start = time.perf_counter()
        hooked_pass(lm, part, state, 0, batch_size, progress=False)
        _sync(lm.device)
        return time.perf_counter() - start

    # The default is the default build's whole pass (65,536 tokens): its first batches update
    # more exemplars than later ones, so a shorter pass would not be the pass a build runs.
    # Plain and hooked forward passes of the same batch run back to back, in alternating
    # order, so that the machine's drift over minutes (other tenants, clock speed) falls on
    # both alike. Two warm-up batches of each kind keep one-off costs (allocation, kernel
    # choice) out.
    timed(rows[:2 * batch_size], None)
    timed(rows[:2 * batch_size], empty_state(lm.device))
    plain, hooked = [], []
    for _ in range(max(1, repeats)):
        state = empty_state(lm.device)
        p = h = 0.0
        for i, b in enumerate(range(0, len(rows), batch_size)):
            part = rows[b:b + batch_size]
            if i % 2:
                h += timed(part, state)
                p += timed(part, None)
            else:
                p += timed(part, None)
                h += timed(part, state)
        plain.append(p)
        hooked.append(h)
    state_bytes = sum(t.numel() * t.element_size() for t in empty_state("cpu").state_dict().values())
    return {
        "stage": "corpus", "model": lm.model_id, "device": _device_name(lm.device),
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."), "tokens": tokens,
        "batch": f"{batch_size} x {context}", "plain_s": min(plain), "hooked_s": min(hooked),
        "plain_tokens_per_s": tokens / min(plain), "hooked_tokens_per_s": tokens / min(hooked),
        "ratio": min(plain) / min(hooked), "state_mb": state_bytes / 2**20,
        **peak_memory(lm.device),
    }


def print_corpus_table(r: dict) -> None:
    rows = [
        ("model", r["model"]), ("device", f"{r['device']} ({r['dtype']})"),
        ("timed", f"{r['tokens']:,} tokens in batches of {r['batch']}"),
        ("plain forward", f"{r['plain_s']:.2f} s ({r['plain_tokens_per_s']:,.0f} tokens/s)"),
        ("hooked pass", f"{r['hooked_s']:.2f} s ({r['hooked_tokens_per_s']:,.0f} tokens/s)"),
        ("throughput ratio", f"{r['ratio']:.3f} (target >= 0.8)"),
        ("memory", f"pass state {r['state_mb']:.0f} MiB (O(k x neurons)), {_peaks(r)}"),
    ]
    _print_rows(rows)


def print_table(r: dict) -> None:
    rows = [
        ("model", r["model"]), ("device", f"{r['device']} ({r['dtype']})"),
        ("timed", f"{r['layers_timed']} layers x {len(r['sides'])} sides = {r['directions_timed']:,} directions, "
                  f"vocab {r['vocab']:,}, chunk {r['chunk_rows']} rows"),
        ("decode", f"{r['decode_s']:.3f} s ({r['directions_per_s']:,.0f} directions/s)"),
        ("bare matmul+topk", f"{r['bare_matmul_topk_s']:.3f} s"),
        ("ratio", f"{r['ratio']:.3f} (target <= 1.3)"),
        ("whole model, est.", f"{r['full_model_estimate_s']:.1f} s for every side of every neuron"),
        ("memory", _peaks(r)),
    ]
    _print_rows(rows)


def _peaks(r: dict) -> str:
    gpu = f", GPU peak {r['peak_gpu_mb']:,.0f} MiB" if "peak_gpu_mb" in r else ""
    return f"process peak {r['peak_rss_mb']:,.0f} MiB{gpu}"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
