"""Yes/no judgements read from the probabilities of an answer's first token, and the AUC that ranks them.

The log-probability detection score asks the scorer one yes/no question per context and
reads, instead of the answer's text, how likely its first token is to be a yes and to be a
no. A small model that will not write a list of numbers still puts more weight on "yes"
for some contexts than for others, and that ordering is what the AUC measures.
"""

from __future__ import annotations

import math

# The spellings of the answer's first token that count as yes and as no. A tokenizer has a
# single token for some of them and not others; every one it has counts.
YES = ("yes", " yes", "Yes", " Yes")
NO = ("no", " no", "No", " No")


def yes_share(top_logprobs: list[dict]) -> float:
    """``p_yes / (p_yes + p_no)`` over the first token's alternatives (``{"token", "logprob"}`` as OpenAI gives them).

    Each side sums the probability of its spellings. With neither among the alternatives the
    answer says nothing either way: 0.5.
    """
    p_yes = sum(math.exp(a["logprob"]) for a in top_logprobs if a.get("token") in YES)
    p_no = sum(math.exp(a["logprob"]) for a in top_logprobs if a.get("token") in NO)
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5


def auc(positives: list[float], negatives: list[float]) -> float:
    """The chance that a random positive scores above a random negative, ties counting half (Mann-Whitney U / n1 n2)."""
    if not positives or not negatives:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))
