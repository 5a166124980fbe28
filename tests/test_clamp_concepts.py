"""The issue's bar on the embedded default model: clamping a concept's strongest neuron raises the
concept on held-out prompts for at least 8 of 10 everyday concepts (the README table)."""

from __future__ import annotations

import duckdb
import pytest

from atlas.concepts import CONCEPTS, HELD_OUT, check, markdown
from atlas.stages.clamp import ClampConfig

pytestmark = pytest.mark.slow


def test_concept_neurons_raise_their_concept_on_held_out_prompts(default_atlas, default_lm):
    # The check reads `out` decodings and normalisers: those of the session's default build
    # (on the same corpus slice as the README's run), and the session's loaded model.
    lm = default_lm
    with duckdb.connect(str(default_atlas / "atlas.duckdb"), read_only=True) as con:
        results = check(con, lm, ClampConfig.clamp_multiple)
    print(markdown(results, ClampConfig.clamp_multiple, len(HELD_OUT)))
    assert [r.concept for r in results] == CONCEPTS
    assert sum(r.rises for r in results) >= 8
