"""The clamp check on the site: what the home, method and neuron pages show of it.

Apart from the stage (atlas/stages/clamp.py), which needs torch, so that page workers do not import it.
"""

from __future__ import annotations

import math

from atlas.config import HOLDS
from atlas.store import finished_stage

SHOWN = 5       # rising and falling tokens a page draws from its JSON (as many as attributions)


def has_clamp(con) -> bool:
    return finished_stage(con, "clamp") is not None


def summary(con) -> dict | None:
    """What the home and method pages say about the clamp check, or None without one."""
    status = finished_stage(con, "clamp")
    if status is None:
        return None
    stats = status.get("stats", {})
    n = stats.get("neurons") or 0
    return {**stats, "share": (stats.get("holds", 0) / n) if n else None, "probe_prompts": status.get("prompts", [])}



def clamp_sections(con, layer: int, lo: int, hi: int) -> dict[int, dict]:
    """Per measured neuron of ``lo..hi-1``: value, faithfulness, and its own `out` tokens' Δ log p by
    rank (in the page's HTML, beside those tokens); atlas-neuron.js draws the top rises and falls
    from the neuron's JSON."""
    out: dict[int, dict] = {}
    for n, value, lift, faith in con.execute(
            "SELECT neuron, clamp_value, clamp_lift, faithfulness FROM neurons WHERE layer = ? AND neuron >= ? "
            "AND neuron < ? AND clamp_value IS NOT NULL ORDER BY neuron", [layer, lo, hi]).fetchall():
        # NaN (stores written before NULL was) reads as "no figure"; the figure shown is rounded
        # half up to hundredths, as search rounds it, so page and search show the same number.
        faith = faith if faith is not None and math.isfinite(faith) else None
        lift = lift if lift is not None and math.isfinite(lift) else None
        out[n] = {"value": value, "lift": lift, "holds": faith is not None and faith >= HOLDS,
                  "faithfulness": None if faith is None else math.floor(faith * 100 + 0.5) / 100, "hold_threshold": HOLDS,
                  "shown": SHOWN, "own_by_rank": {}}
    for n, rank, delta in con.execute(
            "SELECT neuron, rank, delta_logprob FROM clamp_effects WHERE layer = ? AND neuron >= ? "
            "AND neuron < ? AND direction = 'own' ORDER BY neuron, rank", [layer, lo, hi]).fetchall():
        if n in out:
            out[n]["own_by_rank"][rank] = delta        # shown beside the decoded `out` tokens
    return out
