"""Exemplars stage: one hooked pass over a corpus, then attribution on sampled positions.

Every layer's MLP activation is captured in the same forward pass (hooks on the input of
each down projection); the model stops after the last MLP, since the logits are not needed.
The pass state is checkpointed every few batches, so an interrupted pass resumes from the
last checkpoint and ends with exactly the state of an uninterrupted one.
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from atlas import faults
from atlas.stages.activations import PassState, hist_edges, hist_index
from atlas.stages.attribution import AttributionState, attribute_batch
from atlas.stages.corpus import (Deduper, Row, corpus_hash, corpus_identity, corpus_kind, cut_rows,
                                 default_sources, describe_default, open_corpus)
from atlas.config import RAY_SETTINGS, ExemplarConfig
from atlas.errors import AtlasError
from atlas.files import write_bytes_atomic
from atlas.model.load import LoadedModel
from atlas.stages.contract import Context, insert_arrow, update_from_arrow
from atlas.store import Store

STAGE = "exemplars"
# Band samples shown per neuron: the histogram bins holding these fractions of its normaliser
# (bins are about a third wide, so each fraction lands in its own bin), SAMPLES tokens each.
BAND_FRACTIONS = (0.5, 0.25, 0.1)


class _StopForward(Exception):
    """Raised after the last MLP: the rest of the model does not change any activation."""


def read_rows(cfg: ExemplarConfig, tokenizer, counts: dict | None = None, dedupe: Deduper | None = None) -> list[Row]:
    """The corpus cut into model inputs; ``counts`` gains each source's tokens, ``dedupe`` the paragraphs dropped."""
    rows = list(cut_rows(open_corpus(cfg.corpus, cfg.text_column, dedupe), tokenizer, cfg.context,
                         cfg.max_tokens, counts))
    if not rows:
        n = sum(len(tokenizer.encode(t, add_special_tokens=False)) for _, t in open_corpus(cfg.corpus, cfg.text_column))
        what = cfg.corpus
        if n == 0:
            raise AtlasError(f"corpus {what} is empty (no text)")
        raise AtlasError(f"corpus {what} has {n} tokens, fewer than one context of {cfg.context}")
    return rows


def check_corpus(cfg: ExemplarConfig) -> None:
    """Fail early on a corpus that cannot be read or holds no text: read documents up to the first with text.

    Reading a document runs the reader's checks (binary, not UTF-8, a huge line), so a bad
    first file is reported before any model is loaded; later files are checked as the pass
    reaches them.
    """
    if not any(text.strip() for _, text in open_corpus(cfg.corpus, cfg.text_column)):
        raise AtlasError(f"corpus {cfg.corpus} is empty (no text)")


def _settings(cfg: ExemplarConfig, *also_ignored: str) -> dict:
    # Batch size, checkpointing and Ray change the speed, not the numbers.
    return {k: v for k, v in asdict(cfg).items()
            if k not in ("batch_size", "checkpoint_every", *RAY_SETTINGS, *also_ignored)}


def fingerprint(ctx: Context, rows_hash: str, cfg: ExemplarConfig) -> str:
    return ctx.fingerprint(weights=ctx.weights_hash, corpus=rows_hash, **_settings(cfg, "corpus"))


def quick_key(ctx: Context, cfg: ExemplarConfig) -> str:
    """Like ``fingerprint`` but from the corpus files' names, sizes and times instead of their
    tokens: equal keys let a rerun skip the stage without loading the model or the corpus."""
    return ctx.fingerprint(weights=ctx.weights_hash, corpus_files=corpus_identity(cfg.corpus, cfg.text_column),
                           **_settings(cfg))


def k_tail(cfg: ExemplarConfig, n_tokens: int) -> int:
    """Token-level top values kept per neuron so that the upper quantile is exact."""
    return math.floor(cfg.quantile * n_tokens) + 1


def spare_slots(cfg: ExemplarConfig) -> int:
    """Unsorted exemplar slots per neuron beyond k: one batch's worth, at most 32 (memory)."""
    return min(cfg.batch_size, 32)


# A GPU folds the activations of several layers at once (PassState.update on [G, B, T, d]):
# the statistics cost a few hundred small kernels and a host sync per call whatever the width,
# which measured per layer made the hooked pass 0.239 of a plain forward pass on an H200. A
# group's buffer of float32 activations is kept under GROUP_BYTES: at the Llama-3.1-8B shape
# (16 x 128 tokens, d_mlp 14336: 117 MB a layer) that is 8 layers, 4 calls per batch instead
# of 32, and the update's temporaries stay a few GiB beside the model's 16 GiB of weights.
# More layers per group would save little more: the calls left cost well under the forward pass.
GROUP_BYTES = 1 << 30


def layers_per_group(device, batch_size: int, context: int, d_mlp: int, n_layers: int) -> int:
    """Layers folded together by the hooked pass: one on the CPU, whose update is tuned to keep
    blocks of rows in cache (a group would only add memory); on a GPU as many as GROUP_BYTES
    allow, at least one, spread evenly (32 layers at most 9 a group are 4 groups of 8)."""
    if torch.device(device).type == "cpu":
        return 1
    most = max(1, min(n_layers, GROUP_BYTES // (batch_size * context * d_mlp * 4)))
    return math.ceil(n_layers / math.ceil(n_layers / most))


def hooked_pass(lm: LoadedModel, rows: list[Row], state: PassState | None, start_batch: int, batch_size: int,
                on_batch=None, progress: bool = True, group: int | None = None) -> PassState | None:
    """Fold batches ``start_batch..`` of ``rows`` into ``state`` with every layer hooked at once.

    With ``state=None`` the same forward passes run with no statistics: the bound that
    `atlas bench corpus` measures the hooked pass against. ``group`` layers are folded
    together (default: ``layers_per_group``); the state is the same whatever it is.
    """
    model, adapter = lm.model, lm.adapter
    n_layers, T = adapter.n_layers(model), len(rows[0].token_ids)
    group = group or layers_per_group(lm.device, batch_size, T, adapter.d_mlp(model), n_layers)
    first = {"token": 0}
    pending = {}

    def capture(layer):
        def hook(module, args):
            if group == 1:
                state.update(layer, args[0], first["token"])
                return
            # Each layer's activation is copied into its group's float32 buffer when it is
            # made (the copy is the conversion update would do anyway), so no reference to a
            # model tensor is held past its hook: whatever the model later does with its
            # buffers cannot reach the statistics. (Eager HF MLPs make the down projection's
            # input fresh and never write to it again, so holding it would be safe too.)
            start = layer - layer % group
            size = min(group, n_layers - start)
            if layer == start:
                pending["acts"] = torch.empty((size, *args[0].shape), dtype=torch.float32, device=args[0].device)
            pending["acts"][layer - start].copy_(args[0])
            if layer == start + size - 1:
                state.update(start, pending.pop("acts"), first["token"])      # [G, B, T, d_mlp]
        return hook

    def stop(module, args, output):
        raise _StopForward

    hooks = [] if state is None else \
        [adapter.out_module(model, layer).register_forward_pre_hook(capture(layer)) for layer in range(n_layers)]
    hooks.append(adapter.out_module(model, n_layers - 1).register_forward_hook(stop))
    n_batches = math.ceil(len(rows) / batch_size)
    try:
        for b in tqdm(range(start_batch, n_batches), desc="corpus pass", unit="batch", disable=not progress,
                      initial=start_batch, total=n_batches):
            batch = rows[b * batch_size:(b + 1) * batch_size]
            ids = torch.tensor([r.token_ids for r in batch], device=lm.device)      # [B, T]
            first["token"] = batch[0].doc_id * T
            try:
                with torch.inference_mode():
                    model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            if state is not None:
                state.count_tokens(ids.numel())
            if on_batch:
                on_batch(b + 1, state)
    finally:
        for h in hooks:
            h.remove()
    return state


def _checkpoint_path(store: Store) -> Path:
    return store.path.with_name(f".{store.path.name}.{STAGE}.ckpt")


def run(ctx: Context, cfg: ExemplarConfig) -> dict:
    cfg.validate()
    ctx.require("decode", "the neuron rows this stage fills in")
    if ctx.record().get("status") == "done" and ctx.record().get("quick_key") == quick_key(ctx, cfg):
        return {"skipped": True}            # without loading the model or reading the corpus
    check_corpus(cfg)
    store, lm = ctx.store, ctx.lm
    if corpus_kind(cfg.corpus)[0] == "default":
        print(describe_default(), file=sys.stderr)
    counts: dict[str, int] = {}
    dedupe = Deduper()
    rows = read_rows(cfg, lm.tokenizer, counts, dedupe)
    rows_hash = corpus_hash(rows)
    fp = fingerprint(ctx, rows_hash, cfg)
    if ctx.is_done(fp):
        return {"skipped": True}
    adapter, model = lm.adapter, lm.model
    n_layers, d_mlp = adapter.n_layers(model), adapter.d_mlp(model)
    n_tokens = len(rows) * cfg.context
    ckpt = _checkpoint_path(store)
    state, start = PassState.empty(n_layers, d_mlp, cfg.k, k_tail(cfg, n_tokens), lm.device, spare_slots(cfg),
                                   cfg.window_before, cfg.window_after), 0
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        # A Ray run's checkpoint holds merged shards (k slots, no room to fold into): only
        # a Ray run resumes from it; a Ray run resumes from either kind.
        if saved.get("fingerprint") == fp and (cfg.ray or not saved.get("merged")):
            state, start = PassState.from_state_dict(saved["state"]).to(lm.device), int(saved["batches"])
    ctx.start(fp, cfg)

    def checkpoint(done: int, st: PassState) -> None:
        if done % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, fp, done, st)
        faults.point(STAGE, f"batch {done}")

    began = time.perf_counter()
    if cfg.ray:
        state = ray_pass(ctx, cfg, rows, state if start else None, start, ckpt, fp)
    else:
        hooked_pass(lm, rows, state, start, cfg.batch_size, checkpoint, ctx.progress)
    pass_s = time.perf_counter() - began
    attr = None
    if cfg.attribution_rows:
        attr = attribute_rows(lm, rows, cfg, ctx.progress)
    normaliser = state.normaliser(cfg.quantile).cpu()
    with store.transaction() as con:
        _write(con, lm, rows, state.to("cpu").finished(), normaliser, attr, cfg)
        store.set_meta("corpus", {"source": cfg.corpus, "rows": len(rows), "context": cfg.context,
                                  "tokens": n_tokens, "hash": rows_hash,
                                  "sources": corpus_sources(cfg, counts),
                                  "near_duplicates_dropped": dedupe.dropped,
                                  "window": {"before": cfg.window_before, "after": cfg.window_after,
                                             "ranks": cfg.window_ranks, "ranks_min": cfg.window_ranks_min}})
        store.set_meta("histogram_edges", [float(e) for e in hist_edges()])
        ctx.finish(fp, cfg, quick_key=quick_key(ctx, cfg))
        faults.point(STAGE, "written, not committed")
    faults.point(STAGE, "committed")
    ckpt.unlink(missing_ok=True)
    return {"rows": len(rows), "tokens": n_tokens, "pass_seconds": round(pass_s, 1), "sources": counts,
            "tokens_per_s": round((len(rows) - start * cfg.batch_size) * cfg.context / max(pass_s, 1e-9))}


def corpus_sources(cfg: ExemplarConfig, counts: dict[str, int]) -> list[dict]:
    """Every source of the corpus with its version, hash and the tokens it put into the inputs
    (BOS tokens not counted). A user's corpus is one source per file name the rows came from."""
    if corpus_kind(cfg.corpus)[0] == "default":
        return [{k: v for k, v in s.items() if k != "reader"} | {"tokens": counts.get(s["name"], 0)}
                for s in default_sources()]
    return [{"name": name, "tokens": n} for name, n in sorted(counts.items())]


def _save_checkpoint(path: Path, fp: str, batches: int, state: PassState, merged: bool = False) -> None:
    buf = io.BytesIO()
    torch.save({"fingerprint": fp, "batches": batches, "state": state.state_dict(), "merged": merged}, buf)
    write_bytes_atomic(path, buf.getvalue())


# -- the pass on Ray ----------------------------------------------------------------------
RAY_CHECKPOINT_S = 30.0         # a Ray run's driver saves the merged shards at most this often (and after the first)


@dataclass(frozen=True)
class ShardJob:
    """The inputs of one shard of the pass: whole batches of rows, so that every forward pass
    holds the same inputs as in one process."""
    rows: list[Row]
    batch_size: int
    k: int
    k_tail: int
    spare: int
    end_batch: int              # batches of the whole pass done once this shard is merged
    window_before: int
    window_after: int


def shard_pass(lm: LoadedModel, job: ShardJob, report) -> PassState:
    """On a Ray worker: fold one shard into a fresh state; returns it finished, on the CPU."""
    adapter = lm.adapter
    state = PassState.empty(adapter.n_layers(lm.model), adapter.d_mlp(lm.model), job.k, job.k_tail,
                            lm.device, job.spare, job.window_before, job.window_after)
    T = len(job.rows[0].token_ids)

    def on_batch(done: int, st) -> None:
        report(min(done * job.batch_size, len(job.rows)) * T)
        faults.point(STAGE, f"shard batch {done}")

    hooked_pass(lm, job.rows, state, 0, job.batch_size, on_batch, progress=False)
    return state.finished().to("cpu")


SHARDS_PER_WORKER = 4         # enough to balance uneven workers; each shard's state is shipped and merged once


def shards(cfg: ExemplarConfig, rows: list[Row], start: int, n_tokens: int, workers: int = 1) -> list[Shard]:
    """Batches ``start..`` of the pass cut into shards by input id: ``checkpoint_every`` batches
    each, or more so that there are about SHARDS_PER_WORKER shards per worker (the driver
    merges every shard's O(k x neurons) state, so many small shards would make it the bottleneck)."""
    from atlas.distributed import Shard

    bs, T = cfg.batch_size, cfg.context
    n_batches = math.ceil(len(rows) / bs)
    per = max(cfg.checkpoint_every, math.ceil((n_batches - start) / (SHARDS_PER_WORKER * workers)))
    out = []
    for i, b in enumerate(range(start, n_batches, per)):
        end = min(b + per, n_batches)
        part = rows[b * bs:end * bs]
        out.append(Shard(i, shard_pass, ShardJob(part, bs, cfg.k, k_tail(cfg, n_tokens), spare_slots(cfg), end,
                                                             cfg.window_before, cfg.window_after),
                         len(part) * T))
    return out


def ray_pass(ctx: Context, cfg: ExemplarConfig, rows: list[Row], prefix: PassState | None, start: int,
             ckpt: Path, fp: str) -> PassState:
    """The pass over batches ``start..`` on Ray workers, merged in shard order onto ``prefix``
    (the checkpointed state of batches ``..start``); the driver checkpoints the merged state."""
    from atlas import distributed

    pool = distributed.stage_workers(ctx, cfg.ray, cfg.ray_workers)
    acc = {"state": prefix, "saved": -math.inf}
    device = ctx.lm.device              # merges run where the driver's model is: on its GPU if it has one

    def fold(shard, state) -> None:
        state = state.to(device)
        acc["state"] = state if acc["state"] is None else acc["state"].merge(state)
        if time.monotonic() - acc["saved"] >= RAY_CHECKPOINT_S or shard is parts[-1]:
            _save_checkpoint(ckpt, fp, shard.job.end_batch, acc["state"], merged=True)
            acc["saved"] = time.monotonic()
        faults.point(STAGE, f"shard {shard.index + 1} merged")

    parts = shards(cfg, rows, start, len(rows) * cfg.context, len(pool))
    distributed.run_shards(pool, parts, fold, ctx.progress, f"corpus pass ({len(pool)} Ray workers)")
    return acc["state"].to("cpu")


def attribute_rows(lm: LoadedModel, rows: list[Row], cfg: ExemplarConfig, progress: bool) -> AttributionState:
    """Attribution at one seeded position of each of ``attribution_rows`` evenly spaced inputs."""
    n = min(cfg.attribution_rows, len(rows))
    picked = [rows[i] for i in np.linspace(0, len(rows) - 1, n).round().astype(int)]
    gen = torch.Generator().manual_seed(cfg.attribution_seed)
    positions = torch.randint(0, cfg.context - 1, (n,), generator=gen)
    # Inputs batched by position, each batch cut after its last target: a causal model's
    # activations and logits up to a position never see the tokens after it, so the rest of
    # the context is work for nothing (64 default-model inputs of 128 tokens: 0.56 of the time).
    order = torch.argsort(positions, stable=True)
    picked, positions = [picked[i] for i in order.tolist()], positions[order]
    adapter = lm.adapter
    state = AttributionState.empty(adapter.n_layers(lm.model), adapter.d_mlp(lm.model), cfg.k)
    bs = max(1, cfg.batch_size // 2)
    for start in tqdm(range(0, n, bs), desc="attribution", unit="batch", disable=not progress):
        chunk = picked[start:start + bs]
        pos = positions[start:start + bs]
        ids = torch.tensor([r.token_ids[:int(pos.max()) + 2] for r in chunk], device=lm.device)
        pos = pos.to(lm.device)
        scores = attribute_batch(lm.model, adapter, ids, pos)                  # [L, b, d_mlp]
        targets = ids[torch.arange(len(chunk)), pos + 1]
        token_index = torch.tensor([r.doc_id for r in chunk], device=lm.device) * cfg.context + pos
        state.update(scores.cpu(), targets.cpu(), token_index.cpu())
        faults.point(STAGE, f"attribution batch {start // bs + 1}")
    return state


def _write(con, lm: LoadedModel, rows: list[Row], state: PassState, normaliser: torch.Tensor,
           attr: AttributionState | None, cfg: ExemplarConfig) -> None:
    T = cfg.context
    con.execute("DELETE FROM corpus_docs")
    con.execute("DELETE FROM exemplars")
    con.execute("DELETE FROM attributions")
    con.execute("DELETE FROM histograms")
    texts = lm.tokenizer.batch_decode([r.token_ids for r in rows], clean_up_tokenization_spaces=False)
    docs = pa.table({"doc_id": pa.array([r.doc_id for r in rows], pa.int32()),
                     "source": pa.array([r.source for r in rows], pa.string()),
                     "text": pa.array(texts, pa.string()),
                     "token_ids": pa.array([r.token_ids for r in rows], pa.list_(pa.int32()))})
    insert_arrow(con, "corpus_docs", docs)
    L, _, d = state.top_vals.shape
    k = cfg.k
    norm = normaliser.numpy()                                                  # [L, d]
    parts = []
    for polarity, vals, pos, wins in (("max", state.top_vals[:, :k], state.top_pos[:, :k], state.top_win),
                                      ("min", state.bot_vals, state.bot_pos, state.bot_win)):
        valid = (pos >= 0).numpy()                                             # [L, k, d]
        layer, rank, neuron = np.nonzero(valid)
        p = pos.numpy()[layer, rank, neuron]
        n = norm[layer, neuron]
        act = vals.numpy()[layer, rank, neuron]
        w = wins.numpy()[layer, rank, neuron]                                  # [n, W]
        windowed = rank < (cfg.window_ranks if polarity == "max" else cfg.window_ranks_min)   # deeper: no window
        offsets = np.concatenate([[0], np.cumsum(windowed * w.shape[1])]).astype(np.int32)
        parts.append(pa.table({
            "layer": pa.array(layer.astype(np.int16)), "neuron": pa.array(neuron.astype(np.int32)),
            "polarity": pa.array(np.full(len(p), polarity, object), pa.string()),
            "rank": pa.array(rank.astype(np.int16)), "doc_id": pa.array((p // T).astype(np.int32)),
            "token_pos": pa.array((p % T).astype(np.int32)), "activation": pa.array(act.astype(np.float32)),
            "norm_activation": pa.array(np.where(n > 0, act / np.where(n > 0, n, 1), np.nan).astype(np.float32)),
            "window_start": pa.array((p % T - state.before).astype(np.int32)),
            "window_activations": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(w[windowed].reshape(-1).astype(np.float32)), mask=pa.array(~windowed)),
        }))
    insert_arrow(con, "exemplars", pa.concat_tables(parts), order="layer, neuron, polarity, rank")
    n_tok = max(int(state.n_tokens), 1)
    mean = (state.act_sum / n_tok)
    std = (state.act_sumsq / n_tok - mean.square()).clamp_min(0).sqrt()
    hist = state.hist.numpy()                                                  # [L, d, bins]
    density = hist[:, :, hist.shape[2] // 2:].sum(-1) / np.maximum(hist.sum(-1), 1)
    layer, neuron = np.meshgrid(np.arange(L), np.arange(d), indexing="ij")
    stats = pa.table({
        "layer": pa.array(layer.ravel().astype(np.int16)), "neuron": pa.array(neuron.ravel().astype(np.int32)),
        "normaliser": pa.array(norm.ravel().astype(np.float32)),
        "act_mean": pa.array(mean.numpy().ravel().astype(np.float32)),
        "act_std": pa.array(std.numpy().ravel().astype(np.float32)),
        "act_max": pa.array(state.top_vals[:, 0].numpy().ravel().astype(np.float32)),
        "act_min": pa.array(state.bot_vals[:, 0].numpy().ravel().astype(np.float32)),
        "density": pa.array(density.ravel().astype(np.float32)),
        "attr_mean_abs": pa.array((attr.mean_abs().numpy().ravel() if attr else np.full(L * d, np.nan)).astype(np.float32)),
    })
    update_from_arrow(con, "neurons", stats)
    hists = pa.table({"layer": pa.array(layer.ravel().astype(np.int16)),
                      "neuron": pa.array(neuron.ravel().astype(np.int32)),
                      "counts": pa.FixedSizeListArray.from_arrays(
                          pa.array(hist.reshape(-1).astype(np.int64)), hist.shape[2])})
    insert_arrow(con, "histograms", hists, order="layer, neuron")
    con.execute("DELETE FROM exemplar_samples")
    insert_arrow(con, "exemplar_samples", band_samples(state, norm, T), order="layer, neuron, band, rank")
    if attr is not None:
        insert_arrow(con, "attributions", attr.table(T), order="layer, neuron, polarity DESC, rank",
                select="t.layer, t.neuron, t.rank, t.token_id, v.token, t.attribution, t.polarity, "
                       "t.doc_id, t.token_pos", join="JOIN vocab v USING (token_id)")


def band_samples(state: PassState, norm: np.ndarray, T: int) -> pa.Table:
    """The sampled tokens of the bins that hold BAND_FRACTIONS of each neuron's normaliser.

    The pass keeps samples for every bin, since the normaliser is known only at the end; this
    picks the bins to show from the final normaliser. Neurons without a positive one get none.
    """
    L, d = norm.shape
    edges = hist_edges().numpy()
    fractions = torch.tensor(BAND_FRACTIONS, dtype=torch.float32)
    bins = hist_index(torch.from_numpy(norm).float().unsqueeze(-1) * fractions)          # [L, d, bands]
    pos = state.samp_pos.gather(2, bins.unsqueeze(-1).expand(-1, -1, -1, state.samp_pos.shape[-1])).numpy()
    val = state.samp_val.gather(2, bins.unsqueeze(-1).expand(-1, -1, -1, state.samp_val.shape[-1])).numpy()
    ok = (pos >= 0) & (norm > 0)[:, :, None, None]                                         # [L, d, bands, S]
    layer, neuron, band, rank = np.nonzero(ok)
    p, a, b = pos[ok], val[ok], bins.numpy()[layer, neuron, band]
    n = norm[layer, neuron]
    return pa.table({
        "layer": pa.array(layer.astype(np.int16)), "neuron": pa.array(neuron.astype(np.int32)),
        "band": pa.array(band.astype(np.int16)), "rank": pa.array(rank.astype(np.int16)),
        "bin_lo": pa.array(edges[b].astype(np.float32)), "bin_hi": pa.array(edges[b + 1].astype(np.float32)),
        "doc_id": pa.array((p // T).astype(np.int32)), "token_pos": pa.array((p % T).astype(np.int32)),
        "activation": pa.array(a.astype(np.float32)), "norm_activation": pa.array((a / n).astype(np.float32)),
    })
