"""Describe stage: a language model writes one short description per neuron, and another scores it.

**Explain.** The explainer sees the neuron's strongest corpus exemplars (every other one
of the top ``describe_shown * 2``, the token it fires on marked ``<<like this>>``) and
the top tokens its ``out`` direction decodes to, and answers with one phrase.

**Score** (detection, in the sense of EleutherAI's Delphi). The scorer judges the
description against ``score_contexts`` plain text windows in a seeded shuffled order: half
are the neuron's held-out top exemplars (the ones between those shown to the explainer),
half are windows of the same length at random corpus positions. ``--score-method list``
(the default) asks for the numbers of the windows that fit in one request and scores the
balanced accuracy of the answer; ``logprob`` asks one yes/no question per window and scores
the AUC of the yes probability; ``embedding`` sends nothing and scores the AUC of each
window's word-vector cosine with the description (``describe_score``). 0.5 is chance for
all three, 1.0 a perfect split.

**Resume.** Every answer is stored as it arrives, in its own transaction. A rerun asks
again only for the neurons without a description from the same explainer and the same
prompt (version and text), and scores again only those without a score from the same
scorer, scorer prompt, number of contexts and seed: it never pays twice for one answer.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from atlas import faults
from atlas.config import DescribeConfig
from atlas.errors import AtlasError
from atlas.llm.client import ChatClient
from atlas.model.files import DEFAULT_MODEL, EMBEDDED_ID
from atlas.resources import data_json
from atlas.stages.contract import Context, registered, write_record
from atlas.stages.describe_score import (  # noqa: F401  (parse_fits, balanced_accuracy: this stage's API)
    EMBEDDING, answers, balanced_accuracy, conversations, parse_fits, score_prompt, score_set, scores)
from atlas.store import finished_stage

STAGE = "describe"
WINDOW = 16                 # tokens of one context: the exemplars' stored window
OUT_TOKENS = 10             # decoded `out` tokens shown to the explainer
BYTES_PER_TOKEN = 4         # --dry-run's estimate of prompt tokens from prompt bytes (see README)


def prompts() -> dict:
    return data_json("describe_prompts.json")


@dataclass
class Neuron:
    layer: int
    neuron: int
    shown: list[str]                            # exemplar windows for the explainer, focus token marked
    tokens: list[str]                           # top decoded `out` tokens
    held: list[tuple[int, int, str]]            # (doc_id, token_pos, text) held-out top exemplars
    explain: list[dict] = field(default_factory=list)
    prompt_hash: str = ""


# -- reading the store -------------------------------------------------------------------
def select(con, budget: int) -> list[tuple[int, int]]:
    """The neurons to describe: round-robin over layers, each layer's strongest first, ``budget`` of them (-1: all).

    Strength is ``normaliser x |out|``, as the clamp stage ranks neurons; neurons never
    active on the corpus (no positive normaliser) have no exemplars to show and are left out.
    """
    limit = "" if budget < 0 else f"LIMIT {int(budget)}"
    return [(int(a), int(b)) for a, b in con.execute(f"""
        SELECT layer, neuron FROM (
            SELECT layer, neuron, row_number() OVER (PARTITION BY layer
                   ORDER BY normaliser * coalesce(out_norm, 1) DESC, neuron) AS r
            FROM neurons WHERE normaliser > 0 AND isfinite(normaliser))
        ORDER BY r, layer, neuron {limit}""").fetchall()]


class Corpus:
    """Token text of corpus windows: the store's vocabulary and documents, read once."""

    def __init__(self, con):
        rows = con.execute("SELECT token_id, token FROM vocab ORDER BY token_id").fetchall()
        self.vocab = {i: t or "" for i, t in rows}
        self.docs = dict(con.execute("SELECT doc_id, token_ids FROM corpus_docs").fetchall())
        self.doc_ids = sorted(d for d, ids in self.docs.items() if ids and len(ids) >= WINDOW)

    def text(self, doc_id: int, start: int, focus: int | None = None) -> str:
        ids = self.docs[doc_id]
        start = max(0, min(start, len(ids) - WINDOW))
        parts = []
        for pos in range(start, min(start + WINDOW, len(ids))):
            tok = self.vocab.get(ids[pos], "")
            parts.append(f"<<{tok}>>" if pos == focus else tok)
        return " ".join("".join(parts).split())       # one line: newlines and tabs of the corpus become spaces

    def random_windows(self, rng: np.random.Generator, n: int) -> list[tuple[int, int, str]]:
        out = []
        for _ in range(n):
            doc = self.doc_ids[int(rng.integers(len(self.doc_ids)))]
            start = int(rng.integers(len(self.docs[doc]) - WINDOW + 1))
            out.append((doc, start + WINDOW // 2, self.text(doc, start)))
        return out


def gather(con, corpus: Corpus, chosen: list[tuple[int, int]], cfg: DescribeConfig) -> list[Neuron]:
    """Each chosen neuron's shown exemplars, held-out exemplars and decoded tokens, and its explain prompt."""
    want = {key: Neuron(*key, [], [], []) for key in chosen}
    if not want:
        return []
    sel = pa.table({"layer": pa.array([k[0] for k in chosen], pa.int16()),
                    "neuron": pa.array([k[1] for k in chosen], pa.int32())})
    with registered(con, "describe_sel", sel):
        for layer, n, rank, doc, pos, start in con.execute("""
                SELECT e.layer, e.neuron, e.rank, e.doc_id, e.token_pos, coalesce(e.window_start, e.token_pos - 8)
                FROM exemplars e JOIN describe_sel USING (layer, neuron) WHERE e.polarity = 'max'
                ORDER BY e.layer, e.neuron, e.rank""").fetchall():
            nr = want[(layer, n)]
            # Even ranks go to the explainer, odd ranks are held out for the scorer: both
            # sets are equally strong, which a split at rank describe_shown would not give.
            if rank % 2 == 0 and len(nr.shown) < cfg.describe_shown:
                nr.shown.append(corpus.text(doc, start, pos))
            elif rank % 2 == 1 and len(nr.held) < cfg.score_contexts // 2:
                nr.held.append((doc, pos, corpus.text(doc, start)))
        for layer, n, token in con.execute("""
                SELECT d.layer, d.neuron, d.token FROM decoded_tokens d JOIN describe_sel USING (layer, neuron)
                WHERE d.side = 'out' AND d.polarity = 'top' AND d.rank < ? ORDER BY ALL""", [OUT_TOKENS]).fetchall():
            want[(layer, n)].tokens.append(token or "")
    p = prompts()["explain"]
    out = []
    for nr in want.values():
        if not nr.shown:
            continue
        user = p["user"].format(exemplars="\n".join(f"{i + 1}. {t}" for i, t in enumerate(nr.shown)),
                                tokens=", ".join(repr(t) for t in nr.tokens) or "(none)")
        nr.explain = [{"role": "system", "content": p["system"]}, {"role": "user", "content": user}]
        nr.prompt_hash = hashlib.sha256(repr(nr.explain).encode()).hexdigest()[:16]
        out.append(nr)
    return out


# -- backends -----------------------------------------------------------------------------
def make_client(url: str, model: str, cfg: DescribeConfig, device: str = "auto"):
    """An OpenAI-compatible endpoint's client, or with url 'local' the model generating in this process."""
    if url == "local":
        from atlas.llm.generate import Generator, LocalClient
        return LocalClient(Generator.load(model, device))
    return ChatClient(url, model, cfg.describe_timeout, cfg.describe_retries, cfg.api_key_env)


# -- the stage ---------------------------------------------------------------------------
@dataclass
class Plan:
    explain: list[Neuron]                       # neurons without a stored description of this explainer and prompt
    score: list[tuple[Neuron, str]]             # (neuron, description) still to score, described or to be
    neurons: int                                # neurons chosen by the budget


def names(cfg: DescribeConfig) -> tuple[str, str]:
    """(explainer, scorer) as the stored rows name them: the model names sent, the embedded model by its id,
    the embedding method's word vectors by package, version and file."""
    def name(url: str, model: str) -> str:
        return EMBEDDED_ID if url == "local" and model in ("", DEFAULT_MODEL) else model
    if cfg.score_method == EMBEDDING:
        src = word_vectors().source
        scorer = f"{src['name']}=={src['version']}:{src['file']}"
    else:
        scorer = name(cfg.scorer_url or cfg.explainer_url, cfg.scorer_model or cfg.explainer_model)
    return name(cfg.explainer_url, cfg.explainer_model), scorer


def word_vectors():
    """The embedding method's word vectors (``atlas.wordvec``), or a one-line error naming what is missing."""
    from atlas import wordvec
    vectors, why = wordvec.load()
    if vectors is None:
        raise AtlasError(f"--score-method embedding needs the word vectors: {why}")
    return vectors


def make_scorer(cfg: DescribeConfig, device: str, explainer=None):
    """The scorer: the explainer's client where it is the same model, else its own; the word vectors
    for the embedding method."""
    if cfg.score_method == EMBEDDING:
        return word_vectors()
    explainer_name, scorer_name = names(cfg)
    if explainer is not None and (cfg.scorer_url or cfg.explainer_url) == cfg.explainer_url \
            and scorer_name == explainer_name:
        return explainer
    return make_client(cfg.scorer_url or cfg.explainer_url, cfg.scorer_model or cfg.explainer_model, cfg, device)


def make_plan(con, corpus: Corpus, cfg: DescribeConfig, explainer: str, scorer: str) -> Plan:
    neurons = gather(con, corpus, select(con, cfg.describe_budget), cfg)
    has_table = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'descriptions'"
                            ).fetchone()[0]     # a store written before the describe stage, opened read-only
    stored = {(r[0], r[1]): r[2:] for r in con.execute(
        "SELECT layer, neuron, description, explainer, prompt_version, prompt_hash, scorer, scorer_prompt_version, "
        "contexts, seed, score FROM descriptions").fetchall()} if has_table else {}
    version, score_version = prompts()["explain"]["version"], score_prompt(cfg.score_method)["version"]
    plan = Plan([], [], len(neurons))
    for nr in neurons:
        old = stored.get((nr.layer, nr.neuron))
        if old and old[1:4] == (explainer, version, nr.prompt_hash):
            if cfg.score_contexts and nr.held and old[4:8] != (scorer, score_version, 2 * len(nr.held), cfg.describe_seed):
                plan.score.append((nr, old[0]))
        else:
            plan.explain.append(nr)
    return plan


def estimate(plan: Plan, cfg: DescribeConfig, corpus: Corpus) -> dict:
    """Requests and tokens the plan will send: prompt tokens estimated at 4 bytes a token, answers at their cap
    (one token for a logprob score)."""
    def tokens(messages: list[dict]) -> int:
        return math.ceil(sum(len(m["content"].encode()) for m in messages) / BYTES_PER_TOKEN)
    explain_in = sum(tokens(nr.explain) for nr in plan.explain)
    placeholder = "x" * (cfg.describe_max_tokens * BYTES_PER_TOKEN)     # a description of the longest answer
    to_score = [nr for nr, _ in plan.score] + ([nr for nr in plan.explain if nr.held] if cfg.score_contexts else [])
    score_convs = [c for nr in to_score
                   for c in conversations(cfg.score_method, placeholder, score_set(nr, corpus, cfg.describe_seed))]
    score_in = sum(tokens(c) for c in score_convs)
    score_out = len(score_convs) * (cfg.describe_max_tokens if cfg.score_method == "list" else 1)
    requests = len(plan.explain) + len(score_convs)
    return {"neurons": plan.neurons, "explain_requests": len(plan.explain), "score_requests": len(score_convs),
            "score_method": cfg.score_method, "requests": requests, "prompt_tokens_estimate": explain_in + score_in,
            "completion_tokens_max": len(plan.explain) * cfg.describe_max_tokens + score_out,
            "already_stored": plan.neurons - len(plan.explain)}


def dry_run(con, cfg: DescribeConfig) -> dict:
    """What ``run`` would send, computed from the store alone: no request leaves, no model loads."""
    cfg.validate()
    if not cfg.active:
        return {"neurons": 0, "requests": 0, "note": "no explainer (--explainer-url) or --describe-budget 0"}
    if finished_stage(con, "exemplars") is None:
        raise AtlasError("the store has no finished exemplars stage (the contexts an explainer reads); "
                         "run `atlas exemplars` or `atlas build` first")
    corpus = Corpus(con)
    return estimate(make_plan(con, corpus, cfg, *names(cfg)), cfg, corpus)


def run(ctx: Context, cfg: DescribeConfig) -> dict:
    """Describe and score the neurons the budget picks; without an explainer nothing is sent or written."""
    cfg.validate()
    if not cfg.active:
        # Nothing to do is not a skipped result: no record is written, and no stage reads this one.
        return {"described": 0, "note": "no explainer (--explainer-url)" if not cfg.explainer_url
                else "--describe-budget 0"}
    ctx.require("exemplars", "the exemplars an explainer reads")
    store, con = ctx.store, ctx.store.con
    explainer_name, scorer_name = names(cfg)
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("describe_concurrency", "describe_timeout", "describe_retries", "api_key_env")}
    fp = ctx.fingerprint(prompts=prompts(), **settings)
    if ctx.is_done(fp):
        return {"skipped": True}
    corpus = Corpus(con)
    plan = make_plan(con, corpus, cfg, explainer_name, scorer_name)
    cost = estimate(plan, cfg, corpus)
    began = time.perf_counter()
    # A running record: the site's inputs change with it, so partial answers are rendered too.
    with store.transaction():
        ctx.start(fp, cfg)
    try:
        return _ask(ctx, cfg, fp, corpus, plan, cost, began)
    except BaseException:
        # What a stopped run stored stays, and the record says how much, so that a render sees it.
        n = con.execute("SELECT count(*), count(score) FROM descriptions").fetchone()
        with store.transaction():
            write_record(store, ctx.stage, "running", fp, asdict(cfg), stored={"descriptions": n[0], "scores": n[1]})
        raise


def _ask(ctx: Context, cfg: DescribeConfig, fp: str, corpus: Corpus, plan: Plan, cost: dict, began: float) -> dict:
    store, con = ctx.store, ctx.store.con
    explainer_name, scorer_name = names(cfg)
    explainer = make_client(cfg.explainer_url, cfg.explainer_model, cfg, ctx.device_type) if plan.explain else None
    scorer = None
    used = {"prompt_tokens": 0, "completion_tokens": 0}
    version, score_version = prompts()["explain"]["version"], score_prompt(cfg.score_method)["version"]
    one = lambda nr: explainer.chat(nr.explain, cfg.describe_max_tokens, cfg.describe_seed)     # noqa: E731
    many = (lambda batch: explainer.chat_many([nr.explain for nr in batch], cfg.describe_max_tokens,
                                              cfg.describe_seed)) if hasattr(explainer, "chat_many") else None
    for nr, ans in answers(plan.explain, one, many, cfg.describe_concurrency) if explainer else ():
        text = " ".join(ans.text.split())[:500]
        with store.transaction() as tx:
            tx.execute("DELETE FROM description_scores WHERE layer = ? AND neuron = ?", [nr.layer, nr.neuron])
            tx.execute("INSERT OR REPLACE INTO descriptions (layer, neuron, description, explainer, prompt_version, "
                       "prompt_hash) VALUES (?, ?, ?, ?, ?, ?)",
                       [nr.layer, nr.neuron, text, explainer_name, version, nr.prompt_hash])
        faults.point(STAGE, "description stored")
        used["prompt_tokens"] += ans.prompt_tokens
        used["completion_tokens"] += ans.completion_tokens
        if cfg.score_contexts and nr.held:
            plan.score.append((nr, text))
    unparsed = 0
    scored = []
    if plan.score:
        scorer = make_scorer(cfg, ctx.device_type, explainer)
        windows = {(nr.layer, nr.neuron): score_set(nr, corpus, cfg.describe_seed) for nr, _ in plan.score}
        for (nr, text), sc in scores(scorer, cfg.score_method, plan.score, lambda nr: windows[(nr.layer, nr.neuron)],
                                     cfg.describe_max_tokens, cfg.describe_seed, cfg.describe_concurrency):
            win = windows[(nr.layer, nr.neuron)]
            unparsed += sc.unparsed
            with store.transaction() as tx:
                tx.execute("UPDATE descriptions SET score = ?, scorer = ?, scorer_prompt_version = ?, contexts = ?, "
                           "seed = ?, true_positive_rate = ?, true_negative_rate = ? WHERE layer = ? AND neuron = ?",
                           [sc.score, scorer_name, score_version, len(win), cfg.describe_seed, sc.tpr, sc.tnr,
                            nr.layer, nr.neuron])
                tx.execute("DELETE FROM description_scores WHERE layer = ? AND neuron = ?", [nr.layer, nr.neuron])
                sims = sc.similarity or [None] * len(win)
                tx.executemany("INSERT INTO description_scores (layer, neuron, rank, kind, doc_id, token_pos, fits, "
                               "p_yes, similarity) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               [[nr.layer, nr.neuron, i, kind, doc, pos, fit, p, sim] for i, ((kind, doc, pos, _), fit, p, sim)
                                in enumerate(zip(win, sc.fits, sc.p_yes, sims))])
            faults.point(STAGE, "score stored")
            used["prompt_tokens"] += sc.prompt_tokens
            used["completion_tokens"] += sc.completion_tokens
            scored.append(sc.score)
    seconds = time.perf_counter() - began
    mean = con.execute("SELECT avg(score), count(score), count(*) FROM descriptions").fetchone()
    stats = {"described": len(plan.explain), "scored": len(scored), "reused": cost["already_stored"],
             "neurons": plan.neurons, "explainer": explainer_name, "scorer": scorer_name,
             "explain_prompt": version, "score_method": cfg.score_method, "score_prompt": score_version,
             "unparsed_scores": unparsed,
             "retried": sum(getattr(c, "retried", 0) for c in {id(c): c for c in (explainer, scorer) if c}.values()),
             "mean_score": mean[0], "scored_total": mean[1], "descriptions_total": mean[2], **used}
    with store.transaction():
        ctx.finish(fp, cfg, stats=stats, seconds=round(seconds, 1))
    return {**stats, "seconds": round(seconds, 1)}



# -- the held-out check ------------------------------------------------------------------
def shuffled_check(store, cfg: DescribeConfig, device: str = "auto") -> dict:
    """Score each scored neuron's own contexts again with another neuron's description.

    The neurons scored under ``cfg``'s scorer, prompt, contexts and seed are put in
    (layer, neuron) order and each gets the description of the next one (the last the
    first's), judged on exactly the windows its own description was judged on. If the
    descriptions say something about their neurons, the own scores are higher on average.
    The result goes into ``atlas_meta`` as ``describe.shuffled_check``.
    """
    cfg.validate()
    con = store.con
    _, scorer_name = names(cfg)
    version = score_prompt(cfg.score_method)["version"]
    own = con.execute("SELECT layer, neuron, description, score FROM descriptions WHERE scorer = ? AND "
                      "scorer_prompt_version = ? AND seed = ? AND score IS NOT NULL ORDER BY layer, neuron",
                      [scorer_name, version, cfg.describe_seed]).fetchall()
    if len(own) < 2:
        raise AtlasError(f"the held-out check needs at least 2 neurons scored by {scorer_name!r}; "
                         "run `atlas describe` with a larger --describe-budget first")
    corpus = Corpus(con)
    neurons = {(nr.layer, nr.neuron): nr for nr in gather(con, corpus, [(r[0], r[1]) for r in own], cfg)}
    jobs = [(neurons[(r[0], r[1])], own[(i + 1) % len(own)][2]) for i, r in enumerate(own) if (r[0], r[1]) in neurons]
    windows = {(nr.layer, nr.neuron): score_set(nr, corpus, cfg.describe_seed) for nr, _ in jobs}
    client = make_scorer(cfg, device)
    shuffled = {(nr.layer, nr.neuron): sc.score for (nr, _), sc in scores(
        client, cfg.score_method, jobs, lambda nr: windows[(nr.layer, nr.neuron)], cfg.describe_max_tokens,
        cfg.describe_seed, cfg.describe_concurrency)}
    pairs = [(r[3], shuffled[(r[0], r[1])]) for r in own if (r[0], r[1]) in shuffled]
    diffs = np.array([a - b for a, b in pairs])
    result = {"pairs": len(pairs), "scorer": scorer_name, "score_method": cfg.score_method, "score_prompt": version,
              "seed": cfg.describe_seed,
              "own_mean": float(np.mean([a for a, _ in pairs])), "shuffled_mean": float(np.mean([b for _, b in pairs])),
              "margin": float(diffs.mean()), "margin_se": float(diffs.std(ddof=1) / math.sqrt(len(diffs))),
              "own_higher": int((diffs > 0).sum()), "ties": int((diffs == 0).sum()), "own_lower": int((diffs < 0).sum())}
    with store.transaction():
        store.set_meta("describe.shuffled_check", result)
    return result
