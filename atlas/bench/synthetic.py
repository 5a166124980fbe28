"""A synthetic store with the shape of a decoded model, for render tests and benchmarks.

Rendering needs no model, only rows; this writes rows that look like the decode stage's
output (sorted logits, softmax probabilities, per-side moments) for any shape, including
Llama-3.1-8B's 32 x 14,336, in seconds. With ``corpus`` it also writes what a corpus pass
leaves (inputs, exemplars with their activation windows, histograms, attributions and the
neurons' activation statistics), and with ``clamp`` what the clamp stage leaves for every
neuron (as it does on a GPU), so that pages have every section. Some vocabulary
entries and labels are hostile strings, so every test that renders this store also tests
escaping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from atlas import __version__
from atlas.resources import hostile
from atlas.config import HOLDS, ClampConfig, ClusterConfig, ExemplarConfig
from atlas.schema import SIDES, SIDE_STATS
from atlas.site.concept_source import EVIDENCE, POSTINGS
from atlas.stages import STAGES
from atlas.stages.contract import Context, insert_arrow, write_record
from atlas.store import Store

# Token texts that break a page if any renderer forgets to escape them. They take the
# first vocab ids and fill the top of layer 0 / neuron 0's `out` side, so the home page,
# the layer-0 page and the first neuron page all show them.
HOSTILE_TOKENS = tuple(hostile("tokens"))
HOSTILE_LABELS = tuple(hostile("labels"))

CREATED_AT = "2024-01-01T00:00:00Z"
_SYLLABLES = np.array(["ka", "lo", "mi", "ne", "su", "ta", "ri", "do", "ve", "pa", "qu", "zo",
                       "the", "ing", "ion", "er", "al", "an", "en", "or"])


def _vocab(vocab_size: int, rng: np.random.Generator) -> list[str]:
    """Hostile strings first, then distinct made-up words, half of them with a leading space."""
    words = []
    for i in range(vocab_size - len(HOSTILE_TOKENS)):
        n, syllables = i // 2, []
        while True:                      # i // 2 written in base len(_SYLLABLES), as syllables
            n, d = divmod(n, len(_SYLLABLES))
            syllables.append(_SYLLABLES[d])
            if n == 0:
                break
        words.append((" " if i % 2 else "") + "".join(syllables))
    rng.shuffle(words)
    return list(HOSTILE_TOKENS) + words


def _coprime_steps(vocab_size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Strides coprime with the vocab size, so ``base + j*step`` never repeats a token in a row."""
    candidates = np.arange(1, min(vocab_size, 4096))
    candidates = candidates[np.gcd(candidates, vocab_size) == 1]
    return rng.choice(candidates, size=n)


def _decoded_layer(layer: int, d_mlp: int, sides: tuple[str, ...], top_k: int, bottom_k: int,
                   tokens: pa.Array, rng: np.random.Generator) -> pa.Table:
    """All decoded_tokens rows of one layer, ordered by (neuron, side, polarity, rank)."""
    V, S, K = len(tokens), len(sides), top_k + bottom_k
    base = rng.integers(0, V, size=(d_mlp, S, 1))
    step = _coprime_steps(V, d_mlp * S, rng).reshape(d_mlp, S, 1)
    token_id = (base + np.arange(K) * step) % V                        # [d_mlp, S, K]
    if layer == 0 and "out" in sides:
        token_id[0, sides.index("out")] = np.arange(K) % V            # hostile tokens on top

    # Top logits fall from ~8 and bottom logits rise from ~-8, like a decoded direction.
    top = rng.normal(8, 1, (d_mlp, S, 1)) - np.cumsum(rng.exponential(0.3, (d_mlp, S, top_k)), -1)
    bottom = rng.normal(-8, 1, (d_mlp, S, 1)) + np.cumsum(rng.exponential(0.3, (d_mlp, S, bottom_k)), -1)
    logit = np.concatenate([top, bottom], -1).astype(np.float32)       # [d_mlp, S, K]
    log_z = top[..., :1] + rng.lognormal(1.5, 0.3, (d_mlp, S, 1))      # log partition function
    prob = np.exp(logit - log_z).astype(np.float32)

    n_rows = d_mlp * S * K
    polarity_idx = np.tile(np.r_[np.zeros(top_k, np.int8), np.ones(bottom_k, np.int8)], d_mlp * S)
    rank = np.tile(np.r_[np.arange(top_k), np.arange(bottom_k)], d_mlp * S).astype(np.int16)
    side_idx = np.tile(np.repeat(np.arange(S, dtype=np.int8), K), d_mlp)
    flat_ids = pa.array(token_id.reshape(-1).astype(np.int32))
    return pa.table({
        "layer": pa.array(np.full(n_rows, layer, np.int16)),
        "neuron": pa.array(np.repeat(np.arange(d_mlp, dtype=np.int32), S * K)),
        "side": pa.DictionaryArray.from_arrays(pa.array(side_idx), pa.array(list(sides))),
        "polarity": pa.DictionaryArray.from_arrays(pa.array(polarity_idx), pa.array(["top", "bottom"])),
        "rank": pa.array(rank),
        "token_id": flat_ids,
        "token": tokens.take(flat_ids),
        "logit": pa.array(logit.reshape(-1)),
        "prob": pa.array(prob.reshape(-1)),
    })


N_DOCS, CONTEXT = 64, 128
WINDOW_BEFORE = ExemplarConfig().window_before                 # the exemplars stage's default window
WINDOW = WINDOW_BEFORE + 1 + ExemplarConfig().window_after
CLAMP = ClampConfig()                                          # the clamp stage's defaults
# Ranks that keep their window, per polarity, as the stage does.
WINDOW_RANKS = {"max": ExemplarConfig().window_ranks, "min": ExemplarConfig().window_ranks_min}


def _corpus_docs(words: list[str], rng: np.random.Generator) -> pa.Table:
    """Model inputs of random tokens; the first input starts with every hostile token."""
    ids = rng.integers(0, len(words), (N_DOCS, CONTEXT)).astype(np.int32)
    ids[0, :len(HOSTILE_TOKENS)] = np.arange(len(HOSTILE_TOKENS))
    return pa.table({"doc_id": pa.array(np.arange(N_DOCS, dtype=np.int32)),
                     "source": pa.array(["atlas.synthetic"] * N_DOCS),
                     "text": pa.array(["".join(words[i] for i in row) for row in ids]),
                     "token_ids": pa.array(list(ids), pa.list_(pa.int32()))})


def _corpus_layer(layer: int, neurons: pa.Table, k: int, tokens: pa.Array,
                  rng: np.random.Generator) -> tuple[pa.Table, dict[str, pa.Table]]:
    """One layer's exemplars, histograms and attributions, and its neurons with their activation stats."""
    d = neurons.num_rows
    normaliser = rng.lognormal(0, 0.5, d).astype(np.float32)                  # [d]
    top = normaliser[:, None] * (1.2 - np.cumsum(rng.exponential(0.03, (d, k)), 1))
    bottom = -normaliser[:, None] * (0.8 - np.cumsum(rng.exponential(0.03, (d, k)), 1))
    cols = {}
    for polarity, acts in (("max", top), ("min", bottom)):
        doc = rng.integers(0, N_DOCS, (d, k))
        pos = rng.integers(0, CONTEXT, (d, k))
        window = (rng.normal(0, 0.08, (d, k, WINDOW)) * normaliser[:, None, None]).astype(np.float32)
        window[:, :, WINDOW_BEFORE] = acts
        offsets = pos[..., None] - WINDOW_BEFORE + np.arange(WINDOW)
        window[(offsets < 0) | (offsets >= CONTEXT)] = np.nan                 # beyond the input
        cols[polarity] = dict(neuron=np.repeat(np.arange(d), k), rank=np.tile(np.arange(k), d), doc_id=doc.ravel(),
                              token_pos=pos.ravel(), activation=acts.ravel(), window=window.reshape(-1, WINDOW),
                              norm=(acts / normaliser[:, None]).ravel(), ranks=np.full(d * k, WINDOW_RANKS[polarity]))
    n = 2 * d * k

    def both(key):
        return np.concatenate([cols["max"][key], cols["min"][key]])

    windows = both("window").astype(np.float32)
    exemplars = pa.table({
        "layer": pa.array(np.full(n, layer, np.int16)), "neuron": pa.array(both("neuron").astype(np.int32)),
        "polarity": pa.array(["max"] * (d * k) + ["min"] * (d * k)), "rank": pa.array(both("rank").astype(np.int16)),
        "doc_id": pa.array(both("doc_id").astype(np.int32)), "token_pos": pa.array(both("token_pos").astype(np.int32)),
        "activation": pa.array(both("activation").astype(np.float32)),
        "norm_activation": pa.array(both("norm").astype(np.float32)),
        "window_start": pa.array((both("token_pos") - WINDOW_BEFORE).astype(np.int32)),
        "window_activations": pa.FixedSizeListArray.from_arrays(pa.array(windows.ravel()), WINDOW,
                                                                mask=pa.array(both("rank") >= both("ranks")))})
    counts = rng.poisson(np.exp(-np.linspace(-3, 3, 64) ** 2) * 200, (d, 64)).astype(np.int64)
    histograms = pa.table({"layer": pa.array(np.full(d, layer, np.int16)),
                           "neuron": pa.array(np.arange(d, dtype=np.int32)),
                           "counts": pa.FixedSizeListArray.from_arrays(pa.array(counts.ravel()), 64)})
    target = rng.integers(0, len(tokens), n).astype(np.int32)
    strength = np.cumsum(rng.exponential(1e-3, (2, d, k))[..., ::-1], -1)[..., ::-1]
    attributions = pa.table({
        "layer": pa.array(np.full(n, layer, np.int16)), "neuron": pa.array(both("neuron").astype(np.int32)),
        "rank": pa.array(both("rank").astype(np.int16)), "token_id": pa.array(target),
        "token": tokens.take(pa.array(target)),
        "attribution": pa.array(np.concatenate([strength[0].ravel(), -strength[1].ravel()]).astype(np.float32)),
        "polarity": pa.array(["supports"] * (d * k) + ["suppresses"] * (d * k)),
        "doc_id": pa.array(rng.integers(0, N_DOCS, n).astype(np.int32)),
        "token_pos": pa.array(rng.integers(0, CONTEXT, n).astype(np.int32))})
    stats = {"normaliser": normaliser, "act_mean": rng.normal(0, 0.02, d), "act_std": normaliser / 8,
             "act_max": top[:, 0], "act_min": bottom[:, 0], "density": rng.uniform(0.3, 0.7, d),
             "attr_mean_abs": rng.lognormal(-8, 1, d)}
    for name, values in stats.items():
        neurons = neurons.append_column(name, pa.array(np.asarray(values, np.float32)))
    return neurons, {"exemplars": exemplars, "histograms": histograms, "attributions": attributions,
                     "exemplar_samples": _samples_layer(layer, normaliser)}


def _samples_layer(layer: int, normaliser: np.ndarray, bands=(0.5, 0.25, 0.1), per_band: int = 2) -> pa.Table:
    """Band samples shaped like the exemplars stage's: ``per_band`` tokens near each fraction of
    the normaliser (their own generator, so the other tables stay as they were)."""
    rng = np.random.default_rng(10_000 + layer)
    d, b = len(normaliser), len(bands)
    frac = np.repeat(np.tile(np.asarray(bands), d), per_band)                 # [d * b * per_band]
    norm = np.repeat(normaliser, b * per_band)
    act = (norm * frac * rng.uniform(0.9, 1.1, len(frac))).astype(np.float32)
    return pa.table({
        "layer": pa.array(np.full(len(act), layer, np.int16)),
        "neuron": pa.array(np.repeat(np.arange(d), b * per_band).astype(np.int32)),
        "band": pa.array(np.tile(np.repeat(np.arange(b), per_band), d).astype(np.int16)),
        "rank": pa.array(np.tile(np.arange(per_band), d * b).astype(np.int16)),
        "bin_lo": pa.array((norm * frac * 0.85).astype(np.float32)),
        "bin_hi": pa.array((norm * frac * 1.15).astype(np.float32)),
        "doc_id": pa.array(rng.integers(0, N_DOCS, len(act)).astype(np.int32)),
        "token_pos": pa.array(rng.integers(1, CONTEXT, len(act)).astype(np.int32)),
        "activation": pa.array(act), "norm_activation": pa.array((act / norm).astype(np.float32))})


def _clamp_layer(layer: int, neurons: pa.Table, decoded: pa.Table, top_k: int, cfg: ClampConfig,
                 rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """One layer's clamp_effects (rises, falls and the own top `out` tokens) and its neurons
    with clamp_value, clamp_lift and faithfulness, shaped like the clamp stage's output."""
    d, n_top = neurons.num_rows, cfg.clamp_top_k
    vocab_ids = decoded.column("token_id").to_numpy()
    tokens = decoded.column("token").combine_chunks()
    sides = decoded.column("side").chunk(0).dictionary.to_pylist()
    per_neuron = len(vocab_ids) // d
    # The own tokens are the top `out` tokens, ranks 0..n_own-1, as the stage picks them.
    out_first = sides.index("out") * (per_neuron // len(sides))
    n_own = min(cfg.clamp_own, top_k)
    own_rows = (np.arange(d)[:, None] * per_neuron + out_first + np.arange(n_own)).ravel()
    rise = np.sort(rng.exponential(2.0, (d, n_top)), 1)[:, ::-1] + 0.5
    fall = -(np.sort(rng.exponential(2.0, (d, n_top)), 1)[:, ::-1] + 0.5)
    own = rng.normal(1.0, 2.0, (d, n_own))
    rows = {"neuron": [], "direction": [], "rank": [], "token": [], "token_id": [], "delta": []}
    picks = rng.integers(0, len(vocab_ids), (2, d, n_top))
    for direction, deltas, ids_at in (("rises", rise, picks[0]), ("falls", fall, picks[1]),
                                      ("own", own, own_rows.reshape(d, n_own))):
        k = deltas.shape[1]
        rows["neuron"].append(np.repeat(np.arange(d), k))
        rows["direction"] += [direction] * (d * k)
        rows["rank"].append(np.tile(np.arange(k), d))
        rows["token_id"].append(vocab_ids[ids_at.ravel()])
        rows["token"].append(tokens.take(pa.array(ids_at.ravel())))
        rows["delta"].append(deltas.ravel())
    n = len(rows["direction"])
    effects = pa.table({
        "layer": pa.array(np.full(n, layer, np.int16)), "neuron": pa.array(np.concatenate(rows["neuron"]).astype(np.int32)),
        "direction": pa.array(rows["direction"]), "rank": pa.array(np.concatenate(rows["rank"]).astype(np.int16)),
        "token_id": pa.array(np.concatenate(rows["token_id"]).astype(np.int32)),
        "token": pa.concat_arrays(rows["token"]),
        "delta_logprob": pa.array(np.concatenate(rows["delta"]).astype(np.float32))})
    normaliser = neurons.column("normaliser").to_numpy()
    stats = {"clamp_value": cfg.clamp_multiple * normaliser, "clamp_lift": own.mean(1), "faithfulness": rng.beta(8, 2, d)}
    for name, values in stats.items():
        neurons = neurons.append_column(name, pa.array(np.asarray(values, np.float32)))
    return neurons, effects


def _neurons_layer(layer: int, d_mlp: int, sides: tuple[str, ...], words: list[str],
                   rng: np.random.Generator) -> pa.Table:
    labels = [f"synthetic {words[i].strip()}" for i in rng.integers(len(HOSTILE_TOKENS), len(words), d_mlp)]
    if layer == 0:
        for i, label in enumerate(HOSTILE_LABELS[:d_mlp]):
            labels[i] = label
        if d_mlp > len(HOSTILE_LABELS):
            labels[len(HOSTILE_LABELS)] = None       # a neuron with no label yet
    cols = {"layer": pa.array(np.full(d_mlp, layer, np.int16)),
            "neuron": pa.array(np.arange(d_mlp, dtype=np.int32)),
            "label": pa.array(labels, pa.string())}
    for side in SIDES:
        draws = {"norm": rng.lognormal(0, 0.3, d_mlp), "logit_mean": rng.normal(0, 0.05, d_mlp),
                 "logit_std": rng.lognormal(0, 0.3, d_mlp), "logit_skew": rng.normal(0, 0.3, d_mlp),
                 "logit_kurtosis": rng.lognormal(0, 0.5, d_mlp)}
        for stat in SIDE_STATS:
            values = draws[stat].astype(np.float32) if side in sides else None
            cols[f"{side}_{stat}"] = pa.array(values, pa.float32()) if values is not None \
                else pa.nulls(d_mlp, pa.float32())
    return pa.table(cols)


def make_synthetic_store(path: str | Path, n_layers: int, d_mlp: int, vocab_size: int = 8192,
                         top_k: int = 20, bottom_k: int = 10, gated: bool = True, seed: int = 0,
                         d_model: int = 576, clusters: bool = False, corpus: bool = False,
                         k: int = 20, clamp: bool = False, concepts: int = 0, progress: bool = False) -> Path:
    """Write a store at ``path`` whose decode stage is done; the same seed gives the same rows.

    With ``clusters`` the cluster stage runs too, on synthetic `out` directions that have
    planted families (see ``synthetic_directions``). With ``corpus`` the exemplars stage is
    marked done with ``k`` exemplars and attributions per polarity and neuron; with
    ``clamp`` (which needs ``corpus``, for the normalisers) the clamp stage is marked done
    with every neuron measured. With ``concepts`` (a number of words; the default atlas has
    27,000) the labels stage is marked done with ``concept_postings`` shaped like the default
    atlas's (``_concept_postings``).
    """
    if clamp and not corpus:
        raise ValueError("a synthetic clamp stage needs corpus=True (clamp values are multiples of normalisers)")
    if vocab_size < top_k + bottom_k or vocab_size <= len(HOSTILE_TOKENS):
        raise ValueError("vocab_size must exceed top_k + bottom_k and the hostile token list")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; a synthetic store is always written to a new file")
    rng = np.random.default_rng(seed)
    sides = ("in", "gate", "out") if gated else ("in", "out")
    words = _vocab(vocab_size, rng)
    tokens = pa.array(words, pa.string())
    pieces = [w.replace(" ", "\u0120") for w in words]     # GPT-2 style byte-level pieces

    with Store(path) as store:
        con = store.con
        # One transaction per layer keeps memory flat at any size; the decode stage is marked
        # done last, so an interrupted run leaves a store that render refuses.
        with store.transaction():
            vocab = pa.table({"token_id": pa.array(np.arange(vocab_size, dtype=np.int32)),
                              "token": tokens, "piece": pa.array(pieces, pa.string())})
            insert_arrow(con, "vocab", vocab)
        if corpus:
            with store.transaction():
                insert_arrow(con, "corpus_docs", _corpus_docs(words, rng))
        for layer in tqdm(range(n_layers), desc="synthetic store", unit="layer", disable=not progress):
            with store.transaction():
                neurons = _neurons_layer(layer, d_mlp, sides, words, rng)
                decoded = _decoded_layer(layer, d_mlp, sides, top_k, bottom_k, tokens, rng)
                tables = {}
                if corpus:
                    neurons, tables = _corpus_layer(layer, neurons, k, tokens, rng)
                if clamp:
                    neurons, tables["clamp_effects"] = _clamp_layer(layer, neurons, decoded, top_k, CLAMP, rng)
                for name, table in tables.items():
                    insert_arrow(con, name, table)
                insert_arrow(con, "neurons", neurons)
                insert_arrow(con, "decoded_tokens", decoded, select="t.layer, t.neuron, t.side::VARCHAR, "
                             "t.polarity::VARCHAR, t.rank, t.token_id, t.token, t.logit, t.prob")

        store.set_meta("model", {
            "id": f"synthetic/{'gated' if gated else 'plain'}-{n_layers}x{d_mlp}",
            "source": "atlas.synthetic", "adapter": "llama" if gated else "gpt2",
            "architecture": "llama" if gated else "gpt2", "sides": list(sides),
            "n_layers": n_layers, "d_mlp": d_mlp, "d_model": d_model, "vocab_size": vocab_size,
            "dtype": "float32",
            "config": {"architectures": ["SyntheticForCausalLM"], "num_hidden_layers": n_layers,
                       "intermediate_size": d_mlp, "hidden_size": d_model, "vocab_size": vocab_size},
        })
        store.set_meta("weights_hash", f"sha256:{seed:064x}")
        store.set_meta("tool_version", __version__)
        store.set_meta("created_at", CREATED_AT)
        store.set_meta("hook_point", "input of mlp.down_proj")
        write_record(store, STAGES["decode"], "done", f"synthetic-{seed}",
                     {"top_k": top_k, "bottom_k": bottom_k, "sides": list(sides)}, seconds=0.0)
        if corpus:
            store.set_meta("corpus", {"source": "atlas.synthetic", "rows": N_DOCS, "context": CONTEXT,
                                      "tokens": N_DOCS * CONTEXT, "hash": f"sha256:{seed + 1:064x}",
                                      "sources": [{"name": "atlas.synthetic", "version": __version__,
                                                   "hash": f"sha256:{seed + 1:064x}", "tokens": N_DOCS * CONTEXT}]})
            store.set_meta("histogram_edges", [float(e) for e in np.sinh(np.linspace(-9.0, 9.0, 65)) * 0.05])
            write_record(store, STAGES["exemplars"], "done", f"synthetic-{seed}",
                         {"k": k, "context": CONTEXT, "corpus": "atlas.synthetic"})
        if clusters:
            from atlas.stages.cluster import cluster_store
            ctx = Context(store, STAGES["cluster"], f"sha256:{seed:064x}", get_lm=None, progress=False)
            cluster_store(ctx, ClusterConfig(), lambda: synthetic_directions(n_layers, d_mlp, d_model, seed))
        if concepts:
            with store.transaction():
                postings = _concept_postings(n_layers, d_mlp, rng, concepts)
                insert_arrow(con, "concept_postings", postings, order="word, side, layer, neuron")
                write_record(store, STAGES["labels"], "done", f"synthetic-{seed}", {}, resource={"name": "atlas.synthetic"},
                             concept_postings=postings.num_rows)
        if clamp:
            n = n_layers * d_mlp
            # After the clusters, which the clamp stage reads: its record names their fingerprint.
            holds = con.execute("SELECT count(*) FROM neurons WHERE faithfulness >= ?", [HOLDS]).fetchone()[0]
            median = con.execute("SELECT median(faithfulness) FROM neurons").fetchone()[0]
            write_record(store, STAGES["clamp"], "done", f"synthetic-{seed}",
                         {"clamp_multiple": CLAMP.clamp_multiple, "clamp_top_k": CLAMP.clamp_top_k,
                          "clamp_own": CLAMP.clamp_own},
                         prompts=["The", "I think that"],
                         stats={"neurons": n, "of": n, "prompts": 2, "multiple": CLAMP.clamp_multiple,
                                "device": "synthetic", "hold_threshold": HOLDS, "holds": int(holds),
                                "median_faithfulness": float(median)})
    return path


def _concept_postings(n_layers: int, d_mlp: int, rng: np.random.Generator, n_words: int,
                      per_word: int = POSTINGS) -> pa.Table:
    """Concept postings shaped like the default atlas's: ``n_words`` words with 50 each of each side
    (the tokens a neuron writes, those it fires on), 2-10 evidence terms (median 2), strengths 6-40 σ
    (median 13, both sides: the labels stage scales the second's to the first's), evidence strings
    of about 21 characters."""
    # The query words: made-up words as the vocabulary's, more of them than it has (as a lexicon's are).
    made_up = _vocab(2 * n_words + len(HOSTILE_TOKENS), np.random.default_rng(0))[len(HOSTILE_TOKENS):]
    names = sorted({w.strip() for w in made_up})[:n_words]
    n = len(names) * per_word * 2
    n_ev = np.minimum(2 + rng.geometric(0.6, n) - 1, 10)
    picked = rng.integers(0, len(names), (n, EVIDENCE))
    evidence = [", ".join(names[i] for i in row[:k]) for row, k in zip(picked.tolist(), np.minimum(n_ev, EVIDENCE).tolist())]
    return pa.table({
        "word": pa.array(np.repeat(names, per_word * 2)), "layer": pa.array(rng.integers(0, n_layers, n).astype(np.int16)),
        "neuron": pa.array(rng.integers(0, d_mlp, n).astype(np.int32)), "n_ev": pa.array(n_ev.astype(np.int16)),
        "sim_sum": pa.array((n_ev * rng.uniform(0.15, 0.3, n)).astype(np.float32)),
        "z": pa.array(np.exp(rng.normal(np.log(13), 0.5, n))), "rank": pa.array(rng.integers(0, 20, n).astype(np.int16)),
        "evidence": pa.array(evidence, pa.string()),
        "side": pa.array(np.tile(np.repeat(["out", "exemplars"], per_word), len(names)))})


def synthetic_directions(n_layers: int, d_mlp: int, d_model: int, seed: int = 0, families: int = 0):
    """Per-layer `out` directions [d_mlp, d_model] drawn around ``families`` random centres.

    Each direction is its family's centre plus isotropic noise of about the same norm, so
    members of a family have a cosine near 0.5 and strangers near 0; one layer at a time,
    so a Llama-sized set never needs more than the clustering's own copy.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    families = families or max(2, round((n_layers * d_mlp) ** 0.5))
    centres = torch.randn(families, d_model, generator=g)
    centres /= centres.norm(dim=1, keepdim=True)
    for _ in range(n_layers):
        family = torch.randint(0, families, (d_mlp,), generator=g)
        noise = torch.randn(d_mlp, d_model, generator=g) / d_model ** 0.5
        yield centres[family] + noise
