"""Do concept neurons work? Clamp the atlas's strongest neuron for a concept on unseen prompts.

For each concept word, the *strongest neuron* is the neuron whose top decoded ``out``
tokens give the concept (any of its single-token case and leading-space variants) the
largest softmax probability, summed over the variants. It is clamped, like the clamp
stage does, to a multiple of its normaliser at every position of held-out prompts that the
clamp stage never uses, and the concept's next-token probability (summed over the
variants) is compared with the unclamped model's. ``scripts/concept_check.py`` prints the
README table from this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atlas.intervene import clamped, load_prompts, next_logprobs
from atlas.errors import AtlasError
from atlas.resources import concepts
from atlas.model.load import LoadedModel

# Everyday concepts (animals, a place, food, a sport, an emotion, ...) chosen before looking
# at any result, and topic-free prompts, none of them a probe prompt of the clamp stage (a
# test checks this): data/concepts.json.
CONCEPTS = concepts("clamp_check")
HELD_OUT = concepts("held_out_prompts")


@dataclass
class ConceptResult:
    concept: str
    layer: int | None
    neuron: int | None
    decoded_prob: float | None      # the variants' summed probability in the neuron's `out` decoding
    value: float | None             # activation it was clamped to
    baseline: float | None          # mean p(concept) over the prompts, as is
    clamped: float | None           # the same with the neuron clamped
    prompts_up: int                 # prompts on which p(concept) rose

    @property
    def rises(self) -> bool:
        return self.clamped is not None and self.clamped > self.baseline


def variants(tokenizer, word: str) -> list[int]:
    """Ids of the single-token spellings of ``word``: lower, capitalised, as given, with and without a leading space."""
    forms = {word, word.lower(), word.capitalize()}
    ids = set()
    for form in forms:
        for text in (form, " " + form):
            enc = tokenizer(text, add_special_tokens=False).input_ids
            if len(enc) == 1 and enc[0] != tokenizer.unk_token_id:
                ids.add(enc[0])
    return sorted(ids)


def strongest_neuron(con, token_ids: list[int]) -> tuple[int, int, float, float] | None:
    """(layer, neuron, decoded probability, normaliser) of the concept's strongest neuron, or None."""
    if not token_ids:
        return None
    marks = ", ".join("?" * len(token_ids))
    return con.execute(f"""
        SELECT d.layer, d.neuron, sum(d.prob) AS p, n.normaliser FROM decoded_tokens d
        JOIN neurons n USING (layer, neuron)
        WHERE d.side = 'out' AND d.polarity = 'top' AND d.token_id IN ({marks}) AND n.normaliser > 0
        GROUP BY d.layer, d.neuron, n.normaliser ORDER BY p DESC, d.layer, d.neuron LIMIT 1""",
                       token_ids).fetchone()


def check(con, lm: LoadedModel, multiple: float, concepts: list[str] = CONCEPTS,
          prompts: list[str] = HELD_OUT) -> list[ConceptResult]:
    """Clamp each concept's strongest neuron to ``multiple`` x its normaliser on ``prompts``."""
    probe = set(load_prompts())
    if probe & set(prompts):
        raise AtlasError(f"held-out prompts overlap the probe prompts: {sorted(probe & set(prompts))}")
    encoded = [lm.tokenizer(p).input_ids for p in prompts]
    results = []
    for concept in concepts:
        ids = variants(lm.tokenizer, concept)
        found = strongest_neuron(con, ids)
        if found is None:
            results.append(ConceptResult(concept, None, None, None, None, None, None, 0))
            continue
        layer, neuron, prob, normaliser = found
        value = multiple * normaliser
        index = torch.tensor(ids)
        base, pushed = [], []
        with clamped(lm, [1], [layer], [neuron], [value]):
            for p in encoded:
                logp = next_logprobs(lm, p, rows=2)                            # row 0 as is, row 1 clamped
                probs = logp[:, index].exp().sum(1)
                base.append(probs[0].item())
                pushed.append(probs[1].item())
        results.append(ConceptResult(concept, layer, neuron, prob, value, sum(base) / len(base),
                                     sum(pushed) / len(pushed), sum(b < c for b, c in zip(base, pushed))))
    return results


def markdown(results: list[ConceptResult], multiple: float, n_prompts: int) -> str:
    lines = [f"| concept | neuron | p in its `out` decoding | clamped to ({multiple:g} × normaliser) | "
             f"p(concept) as is | p(concept) clamped | prompts up (of {n_prompts}) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.layer is None:
            lines.append(f"| {r.concept} | none decodes to it | | | | | |")
            continue
        lines.append(f"| {r.concept} | {r.layer}/{r.neuron} | {r.decoded_prob:.3f} | {r.value:.3g} | "
                     f"{r.baseline:.2e} | {r.clamped:.2e} | {r.prompts_up} |")
    up = sum(r.rises for r in results)
    lines.append(f"\n{up} of {len(results)} concepts rise (mean over the prompts).")
    return "\n".join(lines)
