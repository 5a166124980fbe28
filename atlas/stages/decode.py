"""Decode stage: every neuron's in / gate / out direction read through the LM head.

Definitions (DESIGN.md): ``in`` and ``gate`` are weight rows times the pre-MLP norm's gain,
``out`` is the down-projection column; each direction ``v`` is decoded as
``logits = W_U (g_final * v)``. Work is committed one layer at a time, so an interrupted
run resumes at the first unfinished layer.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from atlas import faults
from atlas.stages.decode_kernel import Decoded, Unembedding, chunk_rows, decode_directions
from atlas.config import DecodeConfig  # noqa: F401 (re-exported)
from atlas.model.load import LoadedModel, vocab_strings
from atlas.schema import SIDE_STATS
from atlas.store import Store

STAGE = "decode"


def fingerprint(weights_hash: str, cfg: DecodeConfig) -> str:
    """What the decoded rows depend on; chunking changes speed, not results, so it is left out."""
    inputs = {"weights": weights_hash, "top_k": cfg.top_k, "bottom_k": cfg.bottom_k, "sides": cfg.sides}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def default_chunk(device: torch.device, vocab: int, chunk_mb: int) -> int:
    if chunk_mb:
        budget = chunk_mb << 20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        # Small chunks keep the elementwise passes inside the CPU's caches (measured: 64-128
        # rows of a 49k vocabulary are fastest on 2 cores).
        budget = 48 << 20
    return chunk_rows(vocab, budget)


def run_decode(store: Store, lm: LoadedModel, cfg: DecodeConfig, weights_hash: str,
               progress: bool = True) -> dict:
    """Decode every layer not yet stored under this configuration; returns timing and counts."""
    cfg.validate()
    fp = fingerprint(weights_hash, cfg)
    if store.stage_done(STAGE, fp):
        return {"skipped": True}
    status = store.stage_status(STAGE)
    if status is None or status.get("fingerprint") != fp:
        _reset(store, lm)
    model, adapter = lm.model, lm.adapter
    sides = cfg.side_list(adapter.sides)
    n_layers, device = adapter.n_layers(model), lm.device
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    U = Unembedding.build(adapter.W_U(model), adapter.final_gain(model), device, next(model.parameters()).dtype)
    chunk = default_chunk(device, U.vocab, cfg.chunk_mb)
    done = store.units_done(STAGE, fp)
    todo = [layer for layer in range(n_layers) if f"layer:{layer}" not in done]
    store.set_meta(f"stage.{STAGE}", {"status": "running", "fingerprint": fp, "config": asdict(cfg)})
    start = time.perf_counter()
    bar = tqdm(total=len(todo) * len(sides), desc="decode", unit="side", disable=not progress)
    for layer in todo:
        decoded = {}
        for side in sides:
            V = adapter.direction(model, layer, side)                           # [d_mlp, d_model]
            decoded[side] = (decode_directions(V, U, cfg.top_k, cfg.bottom_k, chunk),
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
    store.set_meta(f"stage.{STAGE}", {"status": "done", "fingerprint": fp, "config": asdict(cfg),
                                      "sides": sides, "chunk_rows": chunk})
    return {"layers": len(todo), "sides": sides, "seconds": seconds,
            "neurons": store.count("neurons")}


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
        con.register("new_vocab", vocab)
        con.execute("INSERT INTO vocab SELECT * FROM new_vocab")
        con.unregister("new_vocab")


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
    con.register("new_tokens", rows)
    con.register("new_neurons", pa.table(neurons))
    con.execute("DELETE FROM decoded_tokens WHERE layer = ?", [layer])
    con.execute("DELETE FROM neurons WHERE layer = ?", [layer])
    con.execute("""
        INSERT INTO decoded_tokens
        SELECT t.layer, t.neuron, t.side, t.polarity, t.rank, t.token_id, v.token, t.logit, t.prob
        FROM new_tokens t JOIN vocab v USING (token_id)
        ORDER BY t.neuron, t.side, t.polarity DESC, t.rank""")
    # The provisional label is the neuron's three strongest `out` tokens; the labels stage
    # replaces it once exemplars exist.
    label_side = "out" if "out" in decoded else next(iter(decoded))
    cols = ", ".join(f"n.{c}" for c in neurons)
    con.execute(f"""
        INSERT INTO neurons (label, {", ".join(neurons)})
        SELECT l.label, {cols}
        FROM new_neurons n LEFT JOIN (
            SELECT t.neuron, string_agg(trim(v.token), ' · ' ORDER BY t.rank) AS label
            FROM new_tokens t JOIN vocab v USING (token_id)
            WHERE t.side = ? AND t.polarity = 'top' AND t.rank < 3
            GROUP BY t.neuron) l ON l.neuron = n.neuron
        ORDER BY n.neuron""", [label_side])
    con.unregister("new_tokens")
    con.unregister("new_neurons")
