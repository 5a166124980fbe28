"""Detection scores of the describe stage: how well a description picks its neuron's held-out contexts.

Both methods judge the same seeded windows (``score_set``): half the neuron's held-out top
exemplars, half windows at random corpus positions, shuffled.

- **list** (``detect-v1``): one request shows the scorer every window, numbered, and asks for
  the numbers of those that fit. The score is the balanced accuracy of that answer.
- **logprob** (``detect-logprob-v1``): one request per window asks whether the window
  contains what the description says, and reads the first answer token's probabilities:
  ``p_yes / (p_yes + p_no)``, each summed over the spellings in ``atlas.llm.judge``. The
  score is the AUC of ``p_yes``, held-out windows against random ones.
- **embedding** (``detect-embedding-v1``): no language model and no request. The
  description and each window are embedded with the static word vectors the concepts use
  (``atlas.wordvec``: the mean of their tokens' rows, unit length), and the score is the AUC
  of their cosine, held-out windows against random ones (Delphi's embedding score, with a
  static embedding in place of its encoder). It measures whether a description names what
  the neuron's contexts are about, in a space no explainer was tuned to; it cannot judge a
  description that only an LLM could apply (a syntactic role, "the token after a comma").

The list answer needs a scorer that writes a list; SmolLM2-135M answered without any
number 7 times of 8, so every score came out at chance. The yes/no probabilities exist for
any model, and their ordering carries what the model believes even when its greedy answer
is always the same word.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from atlas.llm.judge import auc, yes_share
from atlas.resources import data_json

METHODS = {"list": "score", "logprob": "score_logprob"}        # --score-method -> its prompt in describe_prompts.json
EMBEDDING = "embedding"                                         # --score-method without a language model
EMBEDDING_VERSION = "detect-embedding-v1"


def score_prompt(method: str) -> dict:
    """The scorer's prompt (the embedding method has none: only its version)."""
    if method == EMBEDDING:
        return {"version": EMBEDDING_VERSION}
    return data_json("describe_prompts.json")[METHODS[method]]


def score_set(nr, corpus, seed: int) -> list[tuple[str, int, int, str]]:
    """The scorer's windows, shuffled: (kind, doc_id, token_pos, text), kind 'held_out' or 'random'."""
    rng = np.random.default_rng([seed, nr.layer, nr.neuron])
    items = [("held_out", *h) for h in nr.held]
    items += [("random", *r) for r in corpus.random_windows(rng, len(nr.held))]
    return [items[i] for i in rng.permutation(len(items))]


def score_messages(description: str, windows: list[tuple[str, int, int, str]]) -> list[dict]:
    """The list method's one conversation: every window, numbered."""
    p = score_prompt("list")
    user = p["user"].format(description=description,
                            contexts="\n".join(f"{i + 1}. {w[3]}" for i, w in enumerate(windows)))
    return [{"role": "system", "content": p["system"]}, {"role": "user", "content": user}]


def judge_messages(description: str, window: str) -> list[dict]:
    """The logprob method's conversation about one window."""
    p = score_prompt("logprob")
    return [{"role": "system", "content": p["system"]},
            {"role": "user", "content": p["user"].format(description=description, context=window)}]


def conversations(method: str, description: str, windows: list) -> list[list[dict]]:
    """The requests that score one description: one for the list method, one per window for logprob,
    none for the embedding method."""
    if method == EMBEDDING:
        return []
    if method == "list":
        return [score_messages(description, windows)]
    return [judge_messages(description, w[3]) for w in windows]


def parse_fits(answer: str, n: int) -> set[int]:
    """The window numbers (1..n) the scorer named, as 0-based indices; "none" or no number: empty."""
    return {int(m) - 1 for m in re.findall(r"\d+", answer) if 1 <= int(m) <= n}


def balanced_accuracy(fits: set[int], kinds: list[str]) -> tuple[float, float, float]:
    """(balanced accuracy, true positive rate, true negative rate) of the windows named as fitting."""
    pos = [i for i, k in enumerate(kinds) if k == "held_out"]
    neg = [i for i, k in enumerate(kinds) if k != "held_out"]
    tpr = sum(i in fits for i in pos) / len(pos) if pos else math.nan
    tnr = sum(i not in fits for i in neg) / len(neg) if neg else math.nan
    return (tpr + tnr) / 2, tpr, tnr


@dataclass
class Scored:
    score: float                    # balanced accuracy (list) or AUC (logprob, embedding)
    tpr: float                      # logprob: of the windows whose yes is the likelier answer (p_yes > 0.5);
    tnr: float                      # embedding: of the half of the windows nearest the description
    fits: list[bool]                # per window, in the order shown
    p_yes: list[float | None]       # per window (logprob only)
    prompt_tokens: int
    completion_tokens: int
    unparsed: bool = False          # a list answer with neither a number nor "none"
    similarity: list[float | None] | None = None   # per window, cosine with the description (embedding only)


def judge(method: str, windows: list, replies: list) -> Scored:
    """The score of one description from its replies (``Answer``s, as many as ``conversations`` made)."""
    kinds = [w[0] for w in windows]
    used = (sum(a.prompt_tokens for a in replies), sum(a.completion_tokens for a in replies))
    if method == "list":
        text = replies[0].text
        fits = parse_fits(text, len(windows))
        ba, tpr, tnr = balanced_accuracy(fits, kinds)
        return Scored(ba, tpr, tnr, [i in fits for i in range(len(windows))], [None] * len(windows), *used,
                      unparsed=not re.search(r"\d|none", text, re.I))
    p_yes = [yes_share(a.tokens[0]["top_logprobs"]) for a in replies]
    fits = {i for i, p in enumerate(p_yes) if p > 0.5}
    _, tpr, tnr = balanced_accuracy(fits, kinds)
    score = auc([p for p, k in zip(p_yes, kinds) if k == "held_out"], [p for p, k in zip(p_yes, kinds) if k != "held_out"])
    return Scored(score, tpr, tnr, [i in fits for i in range(len(windows))], p_yes, *used)


def similarity_score(vectors, description: str, windows: list) -> Scored:
    """The embedding method's score of one description: AUC of each window's cosine with it."""
    kinds = [w[0] for w in windows]
    E = vectors.embed([description] + [w[3] for w in windows])
    sims = [round(float(x), 6) for x in E[1:] @ E[0]]
    # "Fits": the nearer half of the windows (ties to the median included), for a TPR and TNR at a fixed rate.
    median = float(np.median(sims)) if sims else 0.0
    fits = {i for i, x in enumerate(sims) if x >= median}
    _, tpr, tnr = balanced_accuracy(fits, kinds)
    score = auc([x for x, k in zip(sims, kinds) if k == "held_out"], [x for x, k in zip(sims, kinds) if k != "held_out"])
    return Scored(score, tpr, tnr, [i in fits for i in range(len(windows))], [None] * len(windows), 0, 0,
                  similarity=sims)


def answers(jobs: list, one: Callable, many: Callable | None, concurrency: int) -> Iterator[tuple]:
    """(job, reply) as the replies arrive; at most ``concurrency`` jobs in flight (``many``: a batch of them at once).

    A failure that retries cannot mend stops the jobs not yet sent and is raised after the
    replies already in hand have been yielded, so that they are stored.
    """
    if many is not None:
        for i in range(0, len(jobs), concurrency):
            batch = jobs[i:i + concurrency]
            yield from zip(batch, many(batch))
        return
    pending, queue, error = set(), iter(jobs), None
    with ThreadPoolExecutor(concurrency, thread_name_prefix="atlas-describe") as pool:
        def fill():
            for job in queue:
                fut = pool.submit(one, job)
                fut.job = job
                pending.add(fut)
                if len(pending) >= concurrency:
                    return
        fill()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                pending.discard(fut)
                if fut.exception() is not None:
                    error = error or fut.exception()
                else:
                    yield fut.job, fut.result()
            if error is None:
                fill()
    if error is not None:
        raise error


def scores(client, method: str, jobs: list, windows: Callable, max_tokens: int, seed: int,
           concurrency: int) -> Iterator[tuple]:
    """(job, ``Scored``) for jobs of (neuron, description), as they are scored; ``windows(neuron)`` its windows.

    A job's requests go together: one list request, or one yes/no request per window (sent
    one after another within the job, ``concurrency`` jobs at a time; a local model takes a
    batch of jobs' windows through one forward pass). For the embedding method ``client`` is
    the word vectors, and nothing is sent.
    """
    if method == EMBEDDING:
        for job in jobs:
            yield job, similarity_score(client, job[1], windows(job[0]))
        return
    def convs(job):
        return conversations(method, job[1], windows(job[0]))

    if method == "list":
        def send(convs_: list[list[dict]]) -> list:
            return [client.chat(c, max_tokens, seed) for c in convs_]
        send_many = (lambda cs: client.chat_many(cs, max_tokens, seed)) if hasattr(client, "chat_many") else None
    else:
        def send(convs_: list[list[dict]]) -> list:
            return client.first_tokens(convs_, seed)
        send_many = send if hasattr(client, "chat_many") else None

    def many(batch: list) -> list:
        flat = [convs(job) for job in batch]
        replies = iter(send_many([c for cs in flat for c in cs]))
        return [[next(replies) for _ in cs] for cs in flat]

    for job, replies in answers(jobs, lambda job: send(convs(job)), many if send_many else None, concurrency):
        yield job, judge(method, windows(job[0]), replies)
