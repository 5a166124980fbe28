"""The store's schema: every table, every migration, and the table order that exports and JSON use.

Table and column names are a public API (DESIGN.md's data contract): add, never rename.
Stages never create or alter tables themselves; a column a stage needs is declared here,
and a store of an older version is brought up to date by ``MIGRATIONS`` when it is opened
for writing.
"""

from __future__ import annotations

from typing import Callable

import duckdb

SCHEMA_VERSION = 9
SIDES = ("in", "gate", "out")
SIDE_STATS = ("norm", "logit_mean", "logit_std", "logit_skew", "logit_kurtosis")

_neuron_stat_cols = ",\n    ".join(f"{s}_{c} FLOAT" for s in SIDES for c in SIDE_STATS)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS atlas_meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS stage_progress (stage VARCHAR, unit VARCHAR, fingerprint VARCHAR,
    PRIMARY KEY (stage, unit));
CREATE TABLE IF NOT EXISTS vocab (token_id INTEGER PRIMARY KEY, token VARCHAR, piece VARCHAR);
CREATE TABLE IF NOT EXISTS neurons (
    layer SMALLINT NOT NULL,
    neuron INTEGER NOT NULL,
    label VARCHAR,
    cluster_id INTEGER,
    x FLOAT,
    y FLOAT,
    normaliser FLOAT,
    act_mean FLOAT,
    act_std FLOAT,
    act_max FLOAT,
    act_min FLOAT,
    density FLOAT,
    attr_mean_abs FLOAT,
    {_neuron_stat_cols},
    clamp_value FLOAT,
    clamp_lift FLOAT,
    faithfulness FLOAT,
    PRIMARY KEY (layer, neuron)
);
CREATE TABLE IF NOT EXISTS decoded_tokens (
    layer SMALLINT NOT NULL,
    neuron INTEGER NOT NULL,
    side VARCHAR NOT NULL,
    polarity VARCHAR NOT NULL,
    rank SMALLINT NOT NULL,
    token_id INTEGER NOT NULL,
    token VARCHAR,
    logit FLOAT,
    prob FLOAT
);
CREATE TABLE IF NOT EXISTS clusters (cluster_id INTEGER PRIMARY KEY, size INTEGER, label VARCHAR,
    x FLOAT, y FLOAT, cohesion FLOAT, named_by VARCHAR);
CREATE TABLE IF NOT EXISTS neighbours (layer SMALLINT, neuron INTEGER, rank SMALLINT,
    nb_layer SMALLINT, nb_neuron INTEGER, cosine FLOAT);
CREATE TABLE IF NOT EXISTS corpus_docs (doc_id INTEGER PRIMARY KEY, source VARCHAR, text VARCHAR,
    token_ids INTEGER[]);
CREATE TABLE IF NOT EXISTS exemplars (layer SMALLINT, neuron INTEGER, polarity VARCHAR,
    rank SMALLINT, doc_id INTEGER, token_pos INTEGER, activation FLOAT, norm_activation FLOAT,
    window_start INTEGER, window_activations FLOAT[]);
CREATE TABLE IF NOT EXISTS exemplar_samples (layer SMALLINT, neuron INTEGER, band SMALLINT, rank SMALLINT,
    bin_lo FLOAT, bin_hi FLOAT, doc_id INTEGER, token_pos INTEGER, activation FLOAT, norm_activation FLOAT);
CREATE TABLE IF NOT EXISTS attributions (layer SMALLINT, neuron INTEGER, rank SMALLINT,
    token_id INTEGER, token VARCHAR, attribution FLOAT, polarity VARCHAR, doc_id INTEGER,
    token_pos INTEGER);
CREATE TABLE IF NOT EXISTS histograms (layer SMALLINT, neuron INTEGER, counts BIGINT[64]);
CREATE TABLE IF NOT EXISTS neuron_labels (layer SMALLINT, neuron INTEGER, label VARCHAR, concept VARCHAR,
    evidence VARCHAR[], tokens VARCHAR[], method VARCHAR, score FLOAT);
CREATE TABLE IF NOT EXISTS clamp_effects (layer SMALLINT, neuron INTEGER, direction VARCHAR,
    rank SMALLINT, token_id INTEGER, token VARCHAR, delta_logprob FLOAT);
CREATE TABLE IF NOT EXISTS descriptions (layer SMALLINT NOT NULL, neuron INTEGER NOT NULL,
    description VARCHAR, explainer VARCHAR, prompt_version VARCHAR, prompt_hash VARCHAR,
    score FLOAT, scorer VARCHAR, scorer_prompt_version VARCHAR, contexts SMALLINT, seed INTEGER,
    true_positive_rate FLOAT, true_negative_rate FLOAT, PRIMARY KEY (layer, neuron));
CREATE TABLE IF NOT EXISTS concept_postings (word VARCHAR, layer SMALLINT, neuron INTEGER, n_ev SMALLINT,
    sim_sum FLOAT, z DOUBLE, rank SMALLINT, evidence VARCHAR, side VARCHAR);
CREATE TABLE IF NOT EXISTS concept_examples (word VARCHAR, term VARCHAR, prob FLOAT, rank SMALLINT);
CREATE TABLE IF NOT EXISTS concept_translations (word VARCHAR, language VARCHAR, term VARCHAR, prob FLOAT,
    accepted BOOLEAN);
CREATE TABLE IF NOT EXISTS description_scores (layer SMALLINT, neuron INTEGER, rank SMALLINT,
    kind VARCHAR, doc_id INTEGER, token_pos INTEGER, fits BOOLEAN, p_yes FLOAT, similarity FLOAT);
"""


def _v1_to_v2(con: duckdb.DuckDBPyConnection) -> None:
    """v1 stores got the clamp columns and clusters.cohesion from the stages that wrote them; v2 has them always."""
    con.execute("""
        ALTER TABLE clusters ADD COLUMN IF NOT EXISTS cohesion FLOAT;
        ALTER TABLE neurons ADD COLUMN IF NOT EXISTS clamp_value FLOAT;
        ALTER TABLE neurons ADD COLUMN IF NOT EXISTS clamp_lift FLOAT;
        ALTER TABLE neurons ADD COLUMN IF NOT EXISTS faithfulness FLOAT;""")


def _v2_to_v3(con: duckdb.DuckDBPyConnection) -> None:
    """v3 exemplar windows have the length the pass was given (a list, 16 long in v2 stores);
    exemplar_samples is new, and SCHEMA creates it."""
    if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'exemplars'").fetchone()[0]:
        con.execute("ALTER TABLE exemplars ALTER COLUMN window_activations TYPE FLOAT[]")


def _v3_to_v4(con: duckdb.DuckDBPyConnection) -> None:
    """v4 keeps each scored context's probability of a yes (the logprob detection score); NULL in older rows."""
    if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'description_scores'"
                   ).fetchone()[0]:
        con.execute("ALTER TABLE description_scores ADD COLUMN IF NOT EXISTS p_yes FLOAT")


def _v4_to_v5(con: duckdb.DuckDBPyConnection) -> None:
    """v5 keeps the labels stage's concept postings for search; SCHEMA creates the table, and the
    labels stage's fingerprint changed with it, so the next build fills it."""


def _v5_to_v6(con: duckdb.DuckDBPyConnection) -> None:
    """v6 says how each cluster was named (clusters.named_by: 'concept', 'token kind', NULL for its
    tokens; the labels stage's fingerprint changed with it, so the next build fills it) and keeps
    each scored context's cosine with the description (description_scores.similarity, the
    embedding score's; NULL in older rows)."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "clusters" in tables:
        con.execute("ALTER TABLE clusters ADD COLUMN IF NOT EXISTS named_by VARCHAR")
    if "description_scores" in tables:
        con.execute("ALTER TABLE description_scores ADD COLUMN IF NOT EXISTS similarity FLOAT")


def _v6_to_v7(con: duckdb.DuckDBPyConnection) -> None:
    """v7 keeps the model's examples of each concept word (concept_examples); SCHEMA creates the
    table, and the labels stage's fingerprint changed with it, so the next build fills it."""


def _v7_to_v8(con: duckdb.DuckDBPyConnection) -> None:
    """v8 keeps the model's reading of words of other languages (concept_translations); SCHEMA
    creates the table, and the labels stage's fingerprint changed with it, so the next build fills it."""


def _v8_to_v9(con: duckdb.DuckDBPyConnection) -> None:
    """v9 keeps concept matches of the tokens a neuron fires on beside those of the tokens it writes
    (concept_postings.side: 'out' or 'exemplars'); older rows are all 'out'. The labels stage's
    fingerprint changed with it, so the next build adds the others."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "concept_postings" in tables:
        con.execute("ALTER TABLE concept_postings ADD COLUMN IF NOT EXISTS side VARCHAR")
        con.execute("UPDATE concept_postings SET side = 'out' WHERE side IS NULL")


# Store migrations: MIGRATIONS[v] turns a v store into a v + 1 store, inside one transaction.
# A store older than the oldest registered step is refused with a message that says so.
MIGRATIONS: dict[int, Callable[[duckdb.DuckDBPyConnection], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5,
                                                                 5: _v5_to_v6, 6: _v6_to_v7, 7: _v7_to_v8,
                                                                 8: _v8_to_v9}

# The public tables, in the order exports list them, each with the key its rows are sorted
# by; stage_progress is bookkeeping and stays out.
EXPORT_TABLES = {
    "atlas_meta": "key",
    "neurons": "layer, neuron",
    "decoded_tokens": "layer, neuron, side, polarity, rank",
    "vocab": "token_id",
    "clusters": "cluster_id",
    "neighbours": "layer, neuron, rank",
    "corpus_docs": "doc_id",
    "exemplars": "layer, neuron, polarity, rank",
    "exemplar_samples": "layer, neuron, band, rank",
    "attributions": "layer, neuron, polarity, rank",
    "histograms": "layer, neuron",
    "clamp_effects": "layer, neuron, direction, rank",
    "descriptions": "layer, neuron",
    "description_scores": "layer, neuron, rank",
    "neuron_labels": "layer, neuron",
    "concept_postings": "word, side, layer, neuron",
    "concept_examples": "word, rank",
    "concept_translations": "language, word",
}

# The tables a neuron's JSON carries, in this order, with the order of one neuron's rows.
JSON_TABLES = {"decoded_tokens": "side, polarity, rank", "exemplars": "polarity, rank",
               "exemplar_samples": "band, rank",
               "attributions": "polarity, rank", "histograms": "neuron", "neighbours": "rank",
               "clamp_effects": "direction, rank", "descriptions": "neuron"}
