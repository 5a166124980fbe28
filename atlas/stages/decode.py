"""Decode stage: every neuron's in / gate / out direction read through the LM head.

Definitions (DESIGN.md): ``in`` and ``gate`` are weight rows times the pre-MLP norm's gain,
``out`` is the down-projection column; each direction ``v`` is decoded as
``logits = W_U (g_final * v)``. Work is committed one layer at a time, so an interrupted
run resumes at the first unfinished layer.
"""

from __future__ import annotations

import datetime as dt
import os
import time

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from atlas import __version__, faults
from atlas.stages.decode_kernel import Decoded, Unembedding, chunk_rows, decode_directions
from atlas.config import DecodeConfig
from atlas.model.load import LoadedModel, vocab_strings
from atlas.schema import SIDE_STATS
from atlas.stages.contract import Context, insert_arrow
from atlas.store import Store

STAGE = "decode"
HOOK_POINT = "input of the MLP's down projection (mlp.out)"


def default_chunk(device: torch.device, vocab: int, chunk_mb: int) -> int:
    """Rows decoded per matmul."""
    if chunk_mb:
        budget = chunk_mb << 20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        # Measured on 2 cores (default model, min of 5): 85-row chunks 1.75 s per side, 512-row
        # chunks with their elementwise passes cut into cache-sized slices (stats_rows) 1.12 s.
        budget = 288 << 20
    return chunk_rows(vocab, budget)


def stats_rows(device: torch.device, vocab: int) -> int:
    """Rows per slice of a chunk's elementwise passes: on a CPU, a slice and its square fit
    in a 16 MiB L3 cache (32 rows of a 49k vocabulary); a GPU takes the chunk whole (0)."""
    return 0 if device.type == "cuda" else max(1, (6 << 20) // (vocab * 4))


def run(ctx: Context, cfg: DecodeConfig) -> dict:
    """Decode every layer not yet stored under this configuration; returns timing and counts."""
    cfg.validate()
    # What the decoded rows depend on; chunking changes speed, not results, so it is left out.
    fp = ctx.fingerprint(weights=ctx.weights_hash, top_k=cfg.top_k, bottom_k=cfg.bottom_k, sides=cfg.sides)
    if ctx.is_done(fp):
        return {"skipped": True}
    store, lm = ctx.store, ctx.lm
    record_model(store, lm, ctx.weights_hash)
    if ctx.record().get("fingerprint") != fp:
        _reset(store, lm)
    model, adapter = lm.model, lm.adapter
    sides = cfg.side_list(adapter.sides)
    n_layers, device = adapter.n_layers(model), lm.device
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    U = Unembedding.build(adapter.W_U(model), adapter.final_gain(model), device, next(model.parameters()).dtype)
    chunk, slices = default_chunk(device, U.vocab, cfg.chunk_mb), stats_rows(device, U.vocab)
    done = store.units_done(STAGE, fp)
    todo = [layer for layer in range(n_layers) if f"layer:{layer}" not in done]
    # Running from here on: every stage that read the old rows is stale until it runs again.
    ctx.start(fp, cfg)
    start = time.perf_counter()
    bar = tqdm(total=len(todo) * len(sides), desc="decode", unit="side", disable=not ctx.progress)
    for layer in todo:
        decoded = {}
        for side in sides:
            V = adapter.direction(model, layer, side)                           # [d_mlp, d_model]
            decoded[side] = (decode_directions(V, U, cfg.top_k, cfg.bottom_k, chunk, slices),
                             V.float().norm(dim=1).cpu())
            bar.update()
            faults.point(STAGE, f"layer {layer} side {side} decoded")
        with store.transaction() as con:
            _write_layer(con, layer, decoded)
            store.mark_unit(STAGE, f"layer:{layer}", fp)
            faults.point(STAGE, f"layer {layer} written, not committed")
        faults.point(STAGE, f"layer {layer} committed")
    bar.close()
    seconds = time.perf_counter() - start
    ctx.finish(fp, cfg, sides=sides, chunk_rows=chunk)
    return {"layers": len(todo), "sides": sides, "seconds": seconds,
            "neurons": store.count("neurons")}


def record_model(store: Store, lm: LoadedModel, weights_hash: str) -> None:
    """The model's provenance in atlas_meta; ``created_at`` is set once, by the first decode."""
    store.set_meta("model", lm.describe())
    store.set_meta("weights_hash", weights_hash)
    store.set_meta("tool_version", __version__)
    store.set_meta("hook_point", HOOK_POINT)
    if store.meta("created_at") is None:
        store.set_meta("created_at", _created_at())


def _created_at() -> str:
    # SOURCE_DATE_EPOCH pins the one timestamp an atlas carries, for reproducible builds.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch else dt.datetime.now(dt.timezone.utc)
    return when.replace(microsecond=0).isoformat()


def _reset(store: Store, lm: LoadedModel) -> None:
    """Start the stage afresh: drop rows written under another configuration, refresh the vocabulary."""
    vocab_size = lm.adapter.W_U(lm.model).shape[0]
    texts, pieces = vocab_strings(lm.tokenizer, vocab_size)
    vocab = pa.table({"token_id": pa.array(np.arange(vocab_size, dtype=np.int32)),
                      "token": pa.array(texts, pa.string()), "piece": pa.array(pieces, pa.string())})
    with store.transaction() as con:
        store.reset_stage(STAGE)
        con.execute("DELETE FROM decoded_tokens")
        con.execute("DELETE FROM neurons")
        con.execute("DELETE FROM vocab")
        insert_arrow(con, "vocab", vocab)


def _token_rows(layer: int, side: str, polarity: str, ids: torch.Tensor, logits: torch.Tensor,
                probs: torch.Tensor) -> dict[str, np.ndarray]:
    n, k = ids.shape
    return {
        "layer": np.full(n * k, layer, np.int16),
        "neuron": np.repeat(np.arange(n, dtype=np.int32), k),
        "side": np.full(n * k, side, object),
        "polarity": np.full(n * k, polarity, object),
        "rank": np.tile(np.arange(k, dtype=np.int16), n),
        "token_id": ids.numpy().astype(np.int32).ravel(),
        "logit": logits.numpy().astype(np.float32).ravel(),
        "prob": probs.numpy().astype(np.float32).ravel(),
    }


def _write_layer(con, layer: int, decoded: dict[str, tuple[Decoded, torch.Tensor]]) -> None:
    parts = []
    d_mlp = next(iter(decoded.values()))[0].top_ids.shape[0]
    neurons = {"layer": np.full(d_mlp, layer, np.int16), "neuron": np.arange(d_mlp, dtype=np.int32)}
    for side, (d, norm) in decoded.items():
        parts.append(_token_rows(layer, side, "top", d.top_ids, d.top_logits, d.top_probs))
        parts.append(_token_rows(layer, side, "bottom", d.bottom_ids, d.bottom_logits, d.bottom_probs))
        neurons[f"{side}_norm"] = norm.numpy().astype(np.float32)
        for i, stat in enumerate(SIDE_STATS[1:]):
            neurons[f"{side}_{stat}"] = d.stats[:, i].numpy().astype(np.float32)
    rows = pa.table({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    con.execute("DELETE FROM decoded_tokens WHERE layer = ?", [layer])
    con.execute("DELETE FROM neurons WHERE layer = ?", [layer])
    insert_arrow(con, "decoded_tokens", rows, join="JOIN vocab v USING (token_id)",
                 select="t.layer, t.neuron, t.side, t.polarity, t.rank, t.token_id, v.token, t.logit, t.prob",
                 order="t.neuron, t.side, t.polarity DESC, t.rank")
    insert_arrow(con, "neurons", pa.table(neurons), order="t.neuron")
    # The provisional label is the neuron's three strongest `out` tokens; the labels stage
    # replaces it once exemplars exist.
    label_side = "out" if "out" in decoded else next(iter(decoded))
    con.execute("""
        UPDATE neurons SET label = l.label FROM (
            SELECT neuron, string_agg(trim(token), ' · ' ORDER BY rank) AS label FROM decoded_tokens
            WHERE layer = ? AND side = ? AND polarity = 'top' AND rank < 3 GROUP BY neuron) l
        WHERE neurons.layer = ? AND neurons.neuron = l.neuron""", [layer, label_side, layer])
