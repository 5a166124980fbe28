"""The model's own examples of a concept word: what it writes after "The most common kinds of
animal are".

Word vectors know that "bird" lies near "animal", but not that "iron" is a metal or
"pneumonia" a disease: a static vector of 256 numbers keeps spelling and topic, not
membership. The model being mapped does know, and it can be asked without any other
resource: its next-token distribution after ``TEMPLATE`` puts most of its mass on the
category's members ("mammals, dogs, birds, insects", "iron, aluminum, copper, steel"). The
labels stage asks it once per concept word, keeps the ``top`` likeliest terms
(``concept_examples``), and counts a neuron's top `out` term that is one of a word's examples
as evidence for the word (``atlas.site.concept_source``).

Every prompt begins with the same words, so the model reads them once: their keys and values
are copied to each batch, which then runs only " metal are" (a quarter of the work on a CPU).
A prompt whose tokens do not begin with the prefix's own (a tokenizer that spells the join
differently), or a model whose cache cannot be copied that way, runs whole, left-padded.

Only the first token of each answer is read, so a member the model spells with several
tokens ("cheetah") comes out as a piece ("che") and is never evidence, which must be a word.
"""

from __future__ import annotations

import copy
import inspect
import time

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from atlas.site.index_format import normalise

TEMPLATE = "The most common kinds of {word} are"
# What a word of another language means to the model: its likeliest next word. Of five templates
# tried on the 48 words of data/concepts.json's tune_other_languages, this one's first answer was
# right for 31 (the next best 23).
TRANSLATE = 'The {language} word "{word}" means "'
BATCH = 128


def ask(lm, words: list[str], top: int, progress: bool = True, template: str = TEMPLATE,
        reuse_prefix: bool = True, desc: str = "labels: the model's examples") -> tuple[pa.Table, float]:
    """Per word, the ``top`` likeliest next terms after ``template`` (tokens that normalise to the
    same term summed), as rows (word, term, prob, rank) in the order of ``words``; and the seconds
    it took. ``reuse_prefix`` False runs every prompt whole (the tests compare the two)."""
    import torch
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    terms = [normalise(tok.decode([i])) for i in range(len(tok))]
    ids = tok([template.format(word=w) for w in words]).input_ids if words else []
    head = tok(template.split("{word}")[0].rstrip()).input_ids
    cached = [i for i, s in enumerate(ids) if reuse_prefix and head and len(s) > len(head) and s[:len(head)] == head]
    # A prompt the tokenizer makes nothing of gets no answer.
    answers: dict[int, list[tuple[str, float]]] = {i: [] for i, s in enumerate(ids) if not s}
    whole = sorted(set(range(len(words))) - set(cached) - set(answers))
    start = time.perf_counter()
    bar = tqdm(total=len(words), desc=desc, unit="word", disable=not progress or not words)

    def keep(rows: list[int], logits) -> None:
        # Twice ``top``: tokens that are one term (" iron", "iron", " Iron") merge below.
        prob, best = logits.float().softmax(-1).topk(min(2 * top, logits.shape[-1]))
        for i, ps, ts in zip(rows, prob.tolist(), best.tolist()):
            merged: dict[str, float] = {}
            for p, t in zip(ps, ts):
                term = terms[t] if t < len(terms) else ""
                if term:
                    merged[term] = merged.get(term, 0.0) + p
            answers[i] = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        bar.update(len(rows))

    with torch.inference_mode():
        if cached:
            try:
                _with_prefix(lm, ids, head, cached, keep)
            except (AttributeError, TypeError, ValueError, RuntimeError):     # a cache that cannot be copied so
                whole = sorted(set(whole) | {i for i in cached if i not in answers})
        _whole(lm, ids, whole, keep)
    bar.close()
    cols: dict[str, list] = {"word": [], "term": [], "prob": [], "rank": []}
    for i, word in enumerate(words):
        for rank, (term, p) in enumerate(answers[i]):
            cols["word"].append(word)
            cols["term"].append(term)
            cols["prob"].append(p)
            cols["rank"].append(rank)
    table = pa.table({"word": pa.array(cols["word"], pa.string()), "term": pa.array(cols["term"], pa.string()),
                      "prob": pa.array(cols["prob"], pa.float32()), "rank": pa.array(cols["rank"], pa.int16())})
    return table, round(time.perf_counter() - start, 2)


def translate(lm, words: list[str], language: str, progress: bool = True) -> tuple[pa.Table, float]:
    """Per word of ``language`` (its English name), the model's likeliest reading of it
    (``TRANSLATE``): rows (word, term, prob), and the seconds it took."""
    table, seconds = ask(lm, words, 5, progress, TRANSLATE.replace("{language}", language),
                         desc=f"labels: the model's {language}")
    first = table.filter(pa.compute.equal(table.column("rank"), 0))
    return first.select(["word", "term", "prob"]), seconds


def _pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id):
        if t is not None:
            return t
    return 0


def _with_prefix(lm, ids: list[list[int]], head: list[int], rows: list[int], keep) -> None:
    """The prompts ``rows``, each read after one copy of the prefix's keys and values; the
    rest of each prompt right-padded, its answer read at its own last token."""
    import torch

    device, n_head = lm.device, len(head)
    # transformers 5 calls the cache `cache`; 4.x `past_key_values`.
    name = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    out = lm.model(torch.tensor([head], device=device), use_cache=True)
    prefix = getattr(out, name)
    for lo in range(0, len(rows), BATCH):
        batch = rows[lo:lo + BATCH]
        rest = [ids[i][n_head:] for i in batch]
        width, n = max(map(len, rest)), len(batch)
        x = torch.full((n, width), _pad_id(lm.tokenizer), dtype=torch.long)
        mask = torch.zeros((n, n_head + width), dtype=torch.long)
        mask[:, :n_head] = 1
        for j, r in enumerate(rest):
            x[j, :len(r)] = torch.tensor(r)
            mask[j, n_head:n_head + len(r)] = 1
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(n)
        positions = torch.arange(n_head, n_head + width).expand(n, width)
        logits = lm.model(x.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                          use_cache=True, **{name: cache}).logits
        last = torch.tensor([len(r) - 1 for r in rest], device=logits.device)
        keep(batch, logits[torch.arange(n, device=logits.device), last])


def _whole(lm, ids: list[list[int]], rows: list[int], keep) -> None:
    """The prompts ``rows`` whole, left-padded, each position counted from its own first token."""
    import torch

    device = lm.device
    for lo in range(0, len(rows), BATCH):
        batch = rows[lo:lo + BATCH]
        width, n = max(len(ids[i]) for i in batch), len(batch)
        x = torch.full((n, width), _pad_id(lm.tokenizer), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for j, i in enumerate(batch):
            x[j, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[j, width - len(ids[i]):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        args = dict(attention_mask=mask.to(device), position_ids=positions.to(device))
        try:                    # only the last position's logits: a fifth of the time on a CPU
            logits = lm.model(x.to(device), logits_to_keep=1, **args).logits[:, -1]
        except TypeError:       # a model class that does not take the argument
            logits = lm.model(x.to(device), **args).logits[:, -1]
        keep(batch, logits)
