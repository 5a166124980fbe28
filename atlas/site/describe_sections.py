"""Descriptions on the site: the neuron page's sentence, its detection score and who wrote and scored it.

Apart from the stage (atlas/stages/describe.py), which talks to models, so that page
workers import nothing of it. A neuron the describe stage did not reach shows nothing.
"""

from __future__ import annotations

import json


def has_descriptions(con) -> bool:
    """Whether the store holds any description (a stopped describe run's answers count: they are real)."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    return "descriptions" in tables and con.execute("SELECT count(*) FROM descriptions").fetchone()[0] > 0


def description_sections(con, layer: int, lo: int, hi: int) -> dict[int, dict]:
    """Per described neuron of ``lo..hi-1``: the description, its explainer and prompt, and its score if any."""
    out = {}
    for n, text, explainer, version, score, scorer, scorer_version, contexts, seed, tpr, tnr in con.execute(
            "SELECT neuron, description, explainer, prompt_version, score, scorer, scorer_prompt_version, contexts, "
            "seed, true_positive_rate, true_negative_rate FROM descriptions WHERE layer = ? AND neuron >= ? "
            "AND neuron < ? ORDER BY neuron", [layer, lo, hi]).fetchall():
        out[n] = {"text": text or "", "explainer": explainer, "prompt_version": version, "score": score,
                  "scorer": scorer, "scorer_prompt_version": scorer_version, "contexts": contexts, "seed": seed,
                  "tpr": tpr, "tnr": tnr}
    return out


def summary(con) -> dict | None:
    """What the method page says about the descriptions, or None without any."""
    if not has_descriptions(con):
        return None
    n, scored, mean = con.execute("SELECT count(*), count(score), avg(score) FROM descriptions").fetchone()
    explainers = [r[0] for r in con.execute("SELECT DISTINCT explainer FROM descriptions ORDER BY 1").fetchall()]
    scorers = [r[0] for r in con.execute("SELECT DISTINCT scorer FROM descriptions WHERE scorer IS NOT NULL "
                                         "ORDER BY 1").fetchall()]
    row = con.execute("SELECT value FROM atlas_meta WHERE key = 'describe.shuffled_check'").fetchone()
    return {"neurons": n, "scored": scored, "mean_score": mean, "explainers": explainers, "scorers": scorers,
            "check": json.loads(row[0]) if row else None}
