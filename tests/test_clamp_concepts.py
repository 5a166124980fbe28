"""The issue's bar on the embedded default model: clamping a concept's strongest neuron raises the
concept on held-out prompts for at least 8 of 10 everyday concepts (the README table)."""

from __future__ import annotations

import duckdb
import pytest

from atlas.stages.clamp import ClampConfig
from atlas.concepts import CONCEPTS, HELD_OUT, check, markdown
from atlas.stages.decode import DecodeConfig
from atlas.stages.exemplars import ExemplarConfig
from atlas.pipeline import Build

pytestmark = pytest.mark.slow


def test_concept_neurons_raise_their_concept_on_held_out_prompts(tmp_path):
    b = Build(tmp_path / "atlas", device="cpu", progress=False)
    # Only what the check reads: `out` decodings and normalisers (on the same corpus slice as
    # the README's run).
    b.decode(DecodeConfig(sides="out"))
    b.exemplars(ExemplarConfig(max_tokens=16384, attribution_rows=0))
    with duckdb.connect(str(b.out / "atlas.duckdb"), read_only=True) as con:
        results = check(con, b.lm, ClampConfig.clamp_multiple)
    print(markdown(results, ClampConfig.clamp_multiple, len(HELD_OUT)))
    assert [r.concept for r in results] == CONCEPTS
    assert sum(r.rises for r in results) >= 8
