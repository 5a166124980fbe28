"""Clamp stage: push neurons to a multiple of their normaliser and see what the model says next.

A neuron is clamped by overwriting its activation (the input of the MLP's down projection)
at every position of a prompt, as the clamping experiments of arXiv 2501.02688 do; the
effect is read from the next-token distribution at the prompt's last position. Each batch
row carries a different neuron (any layer), so one forward pass measures a whole batch of
neurons on one probe prompt.

Per neuron the stage stores the tokens whose log-probability rises and falls most (mean
over the probe prompts), the change for the neuron's own top decoded ``out`` tokens, and a
faithfulness figure: the mean percentile of those tokens' rise within the whole vocabulary
(1.0: they rise more than any other token; 0.5: no better than chance).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from atlas import faults
from atlas.config import CPU_BUDGET, HOLDS, RAY_SETTINGS, ClampConfig
from atlas.errors import AtlasError
from atlas.intervene import block_inputs, clamped, load_prompts, next_logprobs, prompt_ids, start_at
from atlas.model.load import LoadedModel
from atlas.stages.contract import Context, insert_arrow, registered, update_from_arrow

STAGE = "clamp"


@dataclass
class Effects:
    """Results for n neurons: rises/falls [n, k] token ids and deltas, own [n, m], faithfulness [n]."""
    rise_ids: np.ndarray
    rise: np.ndarray
    fall_ids: np.ndarray
    fall: np.ndarray
    own: np.ndarray             # [n, m] Δ log p of each own token (NaN where a neuron has fewer)
    lift: np.ndarray            # [n] mean Δ log p of the own tokens
    faithfulness: np.ndarray    # [n] mean percentile of the own tokens' Δ within the vocabulary

    def merge(self, other: "Effects") -> "Effects":
        """The effects of this run of neurons followed by ``other``'s (shards of the clamp check)."""
        return Effects(**{f: np.concatenate([getattr(self, f), getattr(other, f)]) for f in self.__dataclass_fields__})


def measure(lm: LoadedModel, prompts: Sequence[Sequence[int]], layers: np.ndarray, neurons: np.ndarray,
            values: np.ndarray, own_ids: np.ndarray, top_k: int = 10, batch: int = 64,
            progress: bool = False, skip_early: bool = True) -> Effects:
    """Clamp each neuron (``values`` at every position) on every prompt, one neuron per batch row.

    ``own_ids`` is [n, m] token ids (-1 for none). Δ log p is averaged over the prompts.
    With ``skip_early`` a batch starts at its lowest clamped layer from the cached residual
    stream (the blocks below give the same result for every row), so that neurons of late
    layers cost a fraction of a forward pass; sort neurons by layer to profit from it.
    """
    n = len(layers)
    base = torch.cat([next_logprobs(lm, p) for p in prompts])                  # [P, V]
    cached = [block_inputs(lm, p) for p in prompts] if skip_early and n else []
    V = base.shape[1]
    k = min(top_k, V)
    out = {name: [] for name in ("rise_ids", "rise", "fall_ids", "fall", "own", "lift", "faithfulness")}
    for start in tqdm(range(0, n, batch), desc="clamp", unit="batch", disable=not progress):
        sl = slice(start, min(start + batch, n))
        B = sl.stop - sl.start
        delta = torch.zeros(B, V)                                              # [B, V]
        first = int(layers[sl].min()) if skip_early else 0
        with clamped(lm, range(B), layers[sl], neurons[sl], values[sl]):
            for p, ids in enumerate(prompts):
                with start_at(lm, first, cached[p] if first else None):
                    delta += next_logprobs(lm, ids, B).cpu() - base[p].cpu()
        delta /= len(prompts)
        top = delta.topk(k, dim=1)
        bottom = (-delta).topk(k, dim=1)
        own = torch.as_tensor(own_ids[sl], dtype=torch.long)                   # [B, m]
        have = own >= 0
        own_delta = delta.gather(1, own.clamp_min(0)).masked_fill(~have, math.nan)
        # Percentile of each own token's rise among all V tokens (ties count half).
        below = (delta.unsqueeze(1) < own_delta.unsqueeze(2)).sum(-1)         # [B, m]
        equal = (delta.unsqueeze(1) == own_delta.unsqueeze(2)).sum(-1) - 1
        pct = ((below + 0.5 * equal) / max(V - 1, 1)).masked_fill(~have, math.nan)
        out["rise_ids"].append(top.indices.numpy())
        out["rise"].append(top.values.numpy())
        out["fall_ids"].append(bottom.indices.numpy())
        out["fall"].append(-bottom.values.numpy())
        out["own"].append(own_delta.numpy())
        count = have.sum(1).clamp_min(1)
        out["lift"].append((own_delta.nan_to_num(0).sum(1) / count).masked_fill(~have.any(1), math.nan).numpy())
        out["faithfulness"].append((pct.nan_to_num(0).sum(1) / count).masked_fill(~have.any(1), math.nan).numpy())
    if n == 0:
        empty = np.zeros((0, k))
        return Effects(empty.astype(int), empty, empty.astype(int), empty, np.zeros((0, own_ids.shape[1])),
                       np.zeros(0), np.zeros(0))
    return Effects(**{name: np.concatenate(parts) for name, parts in out.items()})


# -- the stage ----------------------------------------------------------------------------
@dataclass
class Selection:
    layers: np.ndarray          # [n] sorted by (layer, neuron)
    neurons: np.ndarray
    values: np.ndarray          # [n] activation each neuron is set to
    own_ids: np.ndarray         # [n, m] its top decoded `out` token ids, -1 padded

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.layers, self.neurons, self.values, self.own_ids):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def budget_for(cfg: ClampConfig, device_type: str) -> int | None:
    """Neurons to measure; None means all of them."""
    if cfg.clamp_budget == -1:
        return None if device_type == "cuda" else CPU_BUDGET
    return cfg.clamp_budget


def select(con, cfg: ClampConfig, budget: int | None) -> Selection:
    """The neurons to clamp and their values: all, or the strongest of each cluster and of each layer.

    A neuron's strength is normaliser x ‖out‖, the size of what it writes to the residual
    stream at its normaliser. Neurons are taken in rounds: the strongest of every cluster and
    of every layer first, then the second strongest, and so on, until the budget is spent.
    Neurons without a positive normaliser (never active on the corpus) are skipped.
    """
    if budget == 0:
        return Selection(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.float32)),
                         np.zeros((0, cfg.clamp_own), dtype=np.int64))
    limit = "" if budget is None else f"LIMIT {int(budget)}"
    rows = con.execute(f"""
        WITH s AS (SELECT layer, neuron, cluster_id, normaliser,
                          normaliser * coalesce(out_norm, 1) AS strength FROM neurons
                   WHERE normaliser > 0 AND isfinite(normaliser)),
             r AS (SELECT *, row_number() OVER (PARTITION BY layer ORDER BY strength DESC, neuron) AS in_layer,
                          CASE WHEN cluster_id IS NULL THEN NULL ELSE row_number() OVER (
                              PARTITION BY cluster_id ORDER BY strength DESC, layer, neuron) END AS in_cluster
                   FROM s)
        SELECT layer, neuron, normaliser FROM (
            SELECT * FROM r ORDER BY least(in_layer, coalesce(in_cluster, in_layer)), strength DESC, layer, neuron
            {limit}) ORDER BY layer, neuron""").fetchall()
    layers = np.array([r[0] for r in rows], dtype=np.int64)
    neurons = np.array([r[1] for r in rows], dtype=np.int64)
    values = np.array([r[2] * cfg.clamp_multiple for r in rows], dtype=np.float32)
    own = np.full((len(rows), cfg.clamp_own), -1, dtype=np.int64)
    index = {(int(layer), int(n)): i for i, (layer, n) in enumerate(zip(layers, neurons))}
    chosen = pa.table({"layer": pa.array(layers, pa.int16()), "neuron": pa.array(neurons, pa.int32())})
    with registered(con, "clamp_sel", chosen):
        for layer, n, rank, token_id in con.execute(
                "SELECT d.layer, d.neuron, d.rank, d.token_id FROM decoded_tokens d JOIN clamp_sel USING (layer, neuron) "
                "WHERE d.side = 'out' AND d.polarity = 'top' AND d.rank < ? ORDER BY ALL", [cfg.clamp_own]).fetchall():
            own[index[(layer, n)], rank] = token_id
    if len(rows) and (own[:, 0] < 0).all():
        raise AtlasError("the clamp stage needs the decode stage's `out` side; run `atlas decode --sides in,gate,out`")
    return Selection(layers, neurons, values, own)


def run(ctx: Context, cfg: ClampConfig) -> dict:
    """Measure the clamp effect of the selected neurons; the model loads only if there is work."""
    cfg.validate()
    ctx.require("exemplars", "normalisers")
    store = ctx.store
    prompts = load_prompts(cfg.clamp_prompts)
    sel = select(store.con, cfg, budget_for(cfg, ctx.device_type))
    # The budget and the multiple are inside the selection; batching and Ray change only the speed.
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("clamp_batch", "clamp_budget", "clamp_prompts", *RAY_SETTINGS)}
    fp = ctx.fingerprint(weights=ctx.weights_hash, prompts=prompts, selection=sel.digest(), **settings)
    if ctx.is_done(fp):
        return {"skipped": True}
    began, began_cpu = time.perf_counter(), time.process_time()
    if cfg.ray and len(sel.layers):
        eff = ray_measure(ctx, cfg, prompts, sel)
    else:
        lm = ctx.lm
        eff = measure(lm, prompt_ids(lm, prompts), sel.layers, sel.neurons, sel.values, sel.own_ids,
                      cfg.clamp_top_k, cfg.clamp_batch, ctx.progress)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
    faults.point(STAGE, "measured")
    n_total = store.count("neurons")
    faith = eff.faithfulness[np.isfinite(eff.faithfulness)]
    stats = {"neurons": int(len(sel.layers)), "of": int(n_total), "prompts": len(prompts),
             "multiple": cfg.clamp_multiple, "device": ctx.device_type, "hold_threshold": HOLDS,
             "holds": int((faith >= HOLDS).sum()),
             "median_faithfulness": float(np.median(faith)) if len(faith) else None,
             "neurons_per_s": round(len(sel.layers) / max(seconds, 1e-9), 1), "cpu_s": round(cpu_seconds, 1)}
    with store.transaction() as con:
        _write(con, sel, eff)
        ctx.finish(fp, cfg, prompts=prompts, stats=stats, seconds=round(seconds, 1))
        faults.point(STAGE, "written, not committed")
    faults.point(STAGE, "committed")
    return {**stats, "seconds": round(seconds, 1)}


# -- the clamp check on Ray -----------------------------------------------------------------
SHARD_BATCHES = 4           # clamp batches per shard of a Ray run


@dataclass(frozen=True)
class ClampJob:
    """A run of neurons (whole batches of the one-process order) with what measuring them needs."""
    prompts: list[str]
    sel: Selection
    top_k: int
    batch: int


def shard_measure(lm: LoadedModel, job: ClampJob, report) -> Effects:
    """On a Ray worker: the effects of one run of neurons; the worker tokenizes the prompts itself."""
    s = Selection(*(np.array(a) for a in (job.sel.layers, job.sel.neurons, job.sel.values, job.sel.own_ids)))
    eff = measure(lm, prompt_ids(lm, job.prompts), s.layers, s.neurons, s.values, s.own_ids, job.top_k, job.batch)
    report(len(s.layers))
    return eff


def ray_measure(ctx: Context, cfg: ClampConfig, prompts: list[str], sel: Selection) -> Effects:
    """``measure`` with the selection cut into runs of whole batches, one per shard, merged in order.

    The driver needs no model of its own here: the workers load it and tokenize the prompts.
    """
    from atlas import distributed

    pool = distributed.stage_workers(ctx, cfg.ray, cfg.ray_workers)
    per = SHARD_BATCHES * cfg.clamp_batch
    parts = [distributed.Shard(i, shard_measure, ClampJob(prompts, Selection(
        sel.layers[a:a + per], sel.neurons[a:a + per], sel.values[a:a + per], sel.own_ids[a:a + per]),
        cfg.clamp_top_k, cfg.clamp_batch), min(per, len(sel.layers) - a))
        for i, a in enumerate(range(0, len(sel.layers), per))]
    acc: list[Effects] = []

    def fold(shard, eff: Effects) -> None:
        acc[:] = [eff if not acc else acc[0].merge(eff)]

    distributed.run_shards(pool, parts, fold, ctx.progress, f"clamp ({len(pool)} Ray workers)", unit="neuron")
    return acc[0]


def _nullable(values: np.ndarray) -> pa.Array:
    """float32, NaN (a neuron without decoded `out` tokens to check) stored as NULL: "not measured"."""
    values = values.astype(np.float32)
    return pa.array(values, mask=~np.isfinite(values))


def _write(con, sel: Selection, eff: Effects) -> None:
    con.execute("DELETE FROM clamp_effects")
    con.execute("UPDATE neurons SET clamp_value = NULL, clamp_lift = NULL, faithfulness = NULL "
                "WHERE clamp_value IS NOT NULL OR faithfulness IS NOT NULL")
    n = len(sel.layers)
    if n == 0:
        return
    parts = []
    for direction, ids, deltas in (("rises", eff.rise_ids, eff.rise), ("falls", eff.fall_ids, eff.fall),
                                   ("own", sel.own_ids, eff.own)):
        i, rank = np.nonzero(ids >= 0)
        parts.append(pa.table({
            "layer": pa.array(sel.layers[i].astype(np.int16)), "neuron": pa.array(sel.neurons[i].astype(np.int32)),
            "direction": pa.array(np.full(len(i), direction, object), pa.string()),
            "rank": pa.array(rank.astype(np.int16)), "token_id": pa.array(ids[i, rank].astype(np.int32)),
            "delta_logprob": pa.array(deltas[i, rank].astype(np.float32))}))
    insert_arrow(con, "clamp_effects", pa.concat_tables(parts), join="LEFT JOIN vocab v USING (token_id)",
                 select="t.layer, t.neuron, t.direction, t.rank, t.token_id, v.token, t.delta_logprob",
                 order="t.layer, t.neuron, t.direction, t.rank")
    update_from_arrow(con, "neurons", pa.table({
        "layer": pa.array(sel.layers.astype(np.int16)), "neuron": pa.array(sel.neurons.astype(np.int32)),
        "clamp_value": pa.array(sel.values.astype(np.float32)), "clamp_lift": _nullable(eff.lift),
        "faithfulness": _nullable(eff.faithfulness)}))
