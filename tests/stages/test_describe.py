"""The describe stage against real HTTP servers on loopback that serve a tiny random model with the OpenAI API.

The tiny model's answers are gibberish, which is what protocol tests need: requests,
batching, retries, resume, scoring and storage are all real. Most tests use the list score
(one request per neuron, fewest requests); the logprob tests serve a copy of the tiny model
whose vocabulary has yes and no, so that its first-token probabilities are real numbers. The held-out check with the
embedded model is the slow test at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import pytest

from atlas.config import DescribeConfig
from atlas.errors import AtlasError
from atlas.llm.generate import Generator
from atlas.llm.server import make_server
from atlas.model.load import load_model
from atlas.pipeline import Build, render_site
from atlas.site.neuron_json import load as load_neuron, table_rows
from atlas.stages.decode import DecodeConfig
from atlas.llm.judge import auc, yes_share
from atlas.stages.describe import balanced_accuracy, parse_fits
from atlas.stages.exemplars import ExemplarConfig
from atlas.config import RenderConfig
from helpers import CFG, assert_one_line_error, atlas, corpus_file

NAME = "tiny-llama"


@contextlib.contextmanager
def serving(gen: Generator, **kw):
    """``atlas.llm.server`` on a free loopback port; yields (base URL ending in /v1, the stats URL)."""
    server = make_server(gen, "127.0.0.1", 0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield base + "/v1", base + "/stats"
    finally:
        server.shutdown()
        server.server_close()


def stats(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def tiny_gen(tiny_model_dir):
    return Generator(load_model(str(tiny_model_dir("llama")), device="cpu"), NAME)


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """A tiny atlas with decode and exemplars (5 per neuron: ranks 0, 2, 4 shown, 1 and 3 held out)."""
    tmp = tmp_path_factory.mktemp("describe")
    b = Build(tmp / "out", str(tiny_model_dir("llama")), device="cpu", progress=False)
    b.decode(DecodeConfig(top_k=5, bottom_k=2))
    b.exemplars(ExemplarConfig(corpus=str(corpus_file(tmp)), **CFG))
    return b


@pytest.fixture
def tiny_atlas(built, tmp_path):
    """A fresh copy of the built tiny atlas for one test."""
    out = tmp_path / "out"
    shutil.copytree(built.out, out)
    return Build(out, built.model_spec, device="cpu", progress=False)


def cfg(url: str, **kw) -> DescribeConfig:
    return DescribeConfig(**{"explainer_url": url, "explainer_model": NAME, "describe_budget": 4,
                             "score_contexts": 4, "describe_max_tokens": 6, "describe_concurrency": 4,
                             "describe_retries": 2, "score_method": "list", **kw})


def rows(out, sql: str) -> list[tuple]:
    with duckdb.connect(str(out / "atlas.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_parse_fits_and_balanced_accuracy():
    assert parse_fits("2, 4 and 9", 4) == {1, 3}
    assert parse_fits("none", 4) == set() and parse_fits("", 4) == set()
    kinds = ["held_out", "random", "held_out", "random"]
    assert balanced_accuracy({0, 2}, kinds) == (1.0, 1.0, 1.0)
    assert balanced_accuracy({0, 1, 2, 3}, kinds) == (0.5, 1.0, 0.0)
    assert balanced_accuracy({1}, kinds) == (0.25, 0.0, 0.5)


def test_auc_and_yes_share_on_hand_made_values():
    # 0.9 beats both negatives, 0.8 beats 0.1 and ties 0.8: (1 + 1 + 1 + 0.5) / 4.
    assert auc([0.9, 0.8], [0.1, 0.8]) == 0.875
    assert auc([0.2], [0.2, 0.2]) == 0.5 and auc([0.1, 0.2], [0.3]) == 0.0 and auc([1.0], [0.0]) == 1.0
    assert math.isnan(auc([], [0.5]))
    top = [{"token": "Yes", "logprob": math.log(0.3)}, {"token": " yes", "logprob": math.log(0.1)},
           {"token": "No", "logprob": math.log(0.15)}, {"token": " no", "logprob": math.log(0.05)},
           {"token": "yes!", "logprob": math.log(0.2)}, {"token": "Maybe", "logprob": math.log(0.2)}]
    assert yes_share(top) == pytest.approx(0.4 / 0.6)
    assert yes_share(top[4:]) == 0.5 and yes_share([]) == 0.5             # neither answer among them: no information


@pytest.fixture(scope="module")
def yesno_gen(tiny_model_dir, tmp_path_factory):
    """The tiny model with four of its words renamed to yes and no spellings, served under NAME.

    The four are among the likeliest first tokens of the random model whatever it reads, so
    that both answers are always among an endpoint's top 20 and p_yes moves with the input.
    """
    path = tmp_path_factory.mktemp("yesno")
    shutil.copytree(tiny_model_dir("llama"), path, dirs_exist_ok=True)
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    renamed = {"w20": "yes", "w7": "no", "w27": "Yes", "w14": "No"}
    spec["model"]["vocab"] = {renamed.get(w, w): i for w, i in vocab.items()}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return Generator(load_model(str(path), device="cpu"), NAME)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_served_logprobs_match_the_forward_pass_of_the_local_backend(yesno_gen):
    short = [{"role": "user", "content": "dog"}]
    long = [{"role": "user", "content": "w5 w7 w9 cat Paris dog w11 w13 w20"}]
    with serving(yesno_gen) as (url, _):
        data = post(url, {"model": NAME, "messages": long, "max_tokens": 3, "logprobs": True, "top_logprobs": 20})
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"] >= 1
    first = content[0]
    top = first["top_logprobs"]
    assert len(top) == 20 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    assert all(t["bytes"] == list(t["token"].encode()) for t in top)
    assert first["token"] == top[0]["token"] and first["logprob"] == pytest.approx(top[0]["logprob"], abs=1e-5)
    # One forward pass (left-padded beside a shorter prompt) gives the same probabilities as generation.
    words = tuple(t["token"] for t in top[:5] if t["token"].strip())
    batched = yesno_gen.first_tokens([short, long], words)[1].tokens[0]
    alone = {t["token"]: t["logprob"] for t in yesno_gen.first_tokens([long], words)[0].tokens[0]["top_logprobs"]}
    served = {t["token"]: t["logprob"] for t in top}
    assert batched["logprob"] == pytest.approx(first["logprob"], abs=1e-4) and alone
    for t in batched["top_logprobs"]:
        assert t["logprob"] == pytest.approx(alone[t["token"]], abs=1e-4) == pytest.approx(served[t["token"]], abs=1e-4)


def test_logprob_score_through_http_stores_p_yes_and_its_auc_and_never_pays_twice(tiny_atlas, yesno_gen):
    with serving(yesno_gen, batch=8) as (url, stats_url):
        proc = atlas("describe", "--out", tiny_atlas.out, "--explainer-url", url, "--explainer-model", NAME,
                     "--describe-budget", 4, "--score-contexts", 4, "--score-method", "logprob", "--dry-run")
        dry = json.loads(proc.stdout)
        assert (dry["score_method"], dry["explain_requests"], dry["score_requests"]) == ("logprob", 4, 16)
        assert dry["completion_tokens_max"] == 4 * 32 + 16 * 1       # a yes/no answer is one token

        config = cfg(url, score_method="logprob")
        result = tiny_atlas.describe(config)
        assert (result["described"], result["scored"], result["score_prompt"]) == (4, 4, "detect-logprob-v1")
        assert stats(stats_url)["requests"] == 4 + 16                # one request per context
        desc = {(r[0], r[1]): r[2:] for r in rows(tiny_atlas.out, "SELECT layer, neuron, score, scorer_prompt_version, "
                                                                  "contexts FROM descriptions")}
        windows = rows(tiny_atlas.out, "SELECT layer, neuron, kind, p_yes, fits FROM description_scores ORDER BY ALL")
        assert len(windows) == 16 and all(0 <= p <= 1 and fits == (p > 0.5) for *_, p, fits in windows)
        assert len({round(p, 6) for *_, p, _ in windows}) > 4         # real probabilities, not the 0.5 of no answer
        for key, (score, version, contexts) in desc.items():
            held = [p for *k, kind, p, _ in windows if tuple(k) == key and kind == "held_out"]
            rand = [p for *k, kind, p, _ in windows if tuple(k) == key and kind == "random"]
            wins = sum(1.0 if h > r else 0.5 if h == r else 0.0 for h in held for r in rand)
            assert (version, contexts) == ("detect-logprob-v1", 4)
            assert score == pytest.approx(wins / (len(held) * len(rand)))

        # A rerun pays nothing; a larger budget pays for the new neurons only; the check uses the same windows.
        assert tiny_atlas.describe(config) == {"skipped": True}
        assert stats(stats_url)["requests"] == 20
        more = tiny_atlas.describe(cfg(url, score_method="logprob", describe_budget=6))
        assert (more["described"], more["scored"], more["reused"]) == (2, 2, 4)
        assert stats(stats_url)["requests"] == 20 + 2 + 8
        from atlas.pipeline import describe_check
        check = describe_check(tiny_atlas.out, cfg(url, score_method="logprob", describe_budget=6), "cpu")
        assert stats(stats_url)["requests"] == 30 + 6 * 4
        assert check["pairs"] == 6 and check["score_method"] == "logprob"
        own = rows(tiny_atlas.out, "SELECT avg(score) FROM descriptions")[0][0]
        assert check["own_mean"] == pytest.approx(own)


def test_embedding_score_sends_nothing_and_stores_each_contexts_cosine(tiny_atlas, tiny_gen):
    """Descriptions written through HTTP, then scored by word vectors: no request, the AUC of the stored cosines."""
    from atlas import wordvec
    from atlas.pipeline import describe_check
    vectors, why = wordvec.load()
    if vectors is None:
        pytest.skip(why)
    with serving(tiny_gen, batch=4) as (url, stats_url):
        tiny_atlas.describe(cfg(url))                                  # 4 descriptions, list scores
        sent = stats(stats_url)["requests"]
        proc = atlas("describe", "--out", tiny_atlas.out, "--explainer-url", url, "--explainer-model", NAME,
                     "--describe-budget", 4, "--score-contexts", 4, "--score-method", "embedding", "--dry-run")
        dry = json.loads(proc.stdout)
        assert (dry["explain_requests"], dry["score_requests"], dry["already_stored"]) == (0, 0, 4)
        config = cfg(url, score_method="embedding")
        result = tiny_atlas.describe(config)
        check = describe_check(tiny_atlas.out, config, "cpu")
        assert stats(stats_url)["requests"] == sent                     # the embedding score asked nothing
    scorer = f"wordllama=={vectors.source['version']}:{vectors.source['file']}"
    assert (result["described"], result["scored"], result["scorer"], result["score_prompt"]) == (
        0, 4, scorer, "detect-embedding-v1")
    described = {(r[0], r[1]): r[2:] for r in rows(tiny_atlas.out, "SELECT layer, neuron, description, score, scorer, "
                                                                     "contexts FROM descriptions")}
    windows = rows(tiny_atlas.out, "SELECT layer, neuron, rank, kind, doc_id, token_pos, similarity, p_yes, fits "
                                   "FROM description_scores ORDER BY ALL")
    assert len(windows) == 16 and all(-1.0001 <= w[6] <= 1.0001 and w[7] is None for w in windows)
    from atlas.stages.describe import Corpus, gather, score_set
    with duckdb.connect(str(tiny_atlas.out / "atlas.duckdb"), read_only=True) as con:
        corpus = Corpus(con)
        neurons = {(nr.layer, nr.neuron): nr for nr in gather(con, corpus, list(described), config)}
    for key, (text, score, by, contexts) in described.items():
        mine = [w for w in windows if (w[0], w[1]) == key]
        shown = score_set(neurons[key], corpus, config.describe_seed)
        # Each stored cosine is the description's with that window's text, recomputed here.
        E = vectors.embed([text] + [w[3] for w in shown])
        assert [m[6] for m in mine] == pytest.approx((E[1:] @ E[0]).tolist(), abs=1e-5)
        assert [(m[3], m[4], m[5]) for m in mine] == [w[:3] for w in shown]
        held = [m[6] for m in mine if m[3] == "held_out"]
        rand = [m[6] for m in mine if m[3] == "random"]
        assert (by, contexts) == (scorer, 4) and score == pytest.approx(auc(held, rand), abs=1e-6)
    assert check["pairs"] == 4 and check["score_method"] == "embedding" and check["scorer"] == scorer


class _NoLogprobs(BaseHTTPRequestHandler):
    """An endpoint that answers every chat with a word and no logprobs, as some servers do."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "dogs"}}],
                           "usage": {"prompt_tokens": 9, "completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_an_endpoint_without_logprobs_names_the_list_method(tiny_atlas):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoLogprobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        one_line_error(tiny_atlas, cfg(url, score_method="logprob"), "no logprobs", "--score-method list")
        # The descriptions it wrote are kept, unscored; the list method scores them without asking again.
        assert rows(tiny_atlas.out, "SELECT count(*), count(score) FROM descriptions")[0] == (4, 0)
        result = tiny_atlas.describe(cfg(url))
        assert (result["described"], result["scored"]) == (0, 4)
    finally:
        server.shutdown()
        server.server_close()


def test_describe_through_http_scores_stores_batches_and_never_pays_twice(tiny_atlas, tiny_gen):
    with serving(tiny_gen, batch=4) as (url, stats_url):
        proc = atlas("describe", "--out", tiny_atlas.out, "--explainer-url", url,
                     "--explainer-model", NAME, "--describe-budget", 4, "--score-contexts", 4, "--score-method", "list",
                     "--dry-run")
        assert proc.returncode == 0, proc.stderr
        dry = json.loads(proc.stdout)
        assert (dry["explain_requests"], dry["score_requests"], dry["requests"]) == (4, 4, 8)
        assert dry["prompt_tokens_estimate"] > 0 and dry["completion_tokens_max"] == 8 * 32
        assert stats(stats_url)["requests"] == 0                     # the dry run sent nothing

        result = tiny_atlas.describe(cfg(url))
        after = stats(stats_url)
        assert after["requests"] == 8 == result["described"] + result["scored"]
        assert after["largest_batch"] > 1                            # concurrent requests answered together
        assert result["prompt_tokens"] > 0 and result["completion_tokens"] > 0

        desc = rows(tiny_atlas.out, "SELECT layer, neuron, description, explainer, prompt_version, score, scorer, "
                                    "scorer_prompt_version, contexts, seed FROM descriptions ORDER BY ALL")
        assert len(desc) == 4
        for layer, neuron, text, explainer, version, score, scorer, sversion, contexts, seed in desc:
            assert (explainer, version, scorer, sversion, contexts, seed) == (NAME, "explain-v1", NAME, "detect-v1", 4, 0)
            assert text is not None and 0.0 <= score <= 1.0
        # Held-out windows are the neuron's odd-rank exemplars, never one the explainer saw.
        held = rows(tiny_atlas.out, """
            SELECT s.layer, s.neuron, e.rank FROM description_scores s JOIN exemplars e
              ON e.layer = s.layer AND e.neuron = s.neuron AND e.doc_id = s.doc_id AND e.token_pos = s.token_pos
                 AND e.polarity = 'max'
            WHERE s.kind = 'held_out'""")
        assert len(held) == 8 and all(rank % 2 == 1 for _, _, rank in held)
        kinds = rows(tiny_atlas.out, "SELECT kind, count(*) FROM description_scores GROUP BY kind ORDER BY kind")
        assert kinds == [("held_out", 8), ("random", 8)]

        # A rerun is skipped; a larger budget asks only for the new neurons.
        assert tiny_atlas.describe(cfg(url)) == {"skipped": True}
        more = tiny_atlas.describe(cfg(url, describe_budget=6))
        assert (more["described"], more["scored"], more["reused"]) == (2, 2, 4)
        assert stats(stats_url)["requests"] == 12
        assert rows(tiny_atlas.out, "SELECT count(*) FROM descriptions")[0][0] == 6


def test_kill_mid_run_keeps_answers_and_the_rerun_asks_only_for_the_rest(tiny_atlas, tiny_gen):
    with serving(tiny_gen, batch=4) as (url, stats_url):
        flags = ["describe", "--out", tiny_atlas.out, "--model", tiny_atlas.model_spec, "--explainer-url", url,
                 "--explainer-model", NAME, "--describe-budget", 4, "--score-contexts", 4,
                 "--describe-max-tokens", 6, "--describe-concurrency", 1, "--score-method", "list", "--quiet"]
        proc = atlas(*flags, env={"ATLAS_FAULT": "describe:2"})          # SIGKILL after the second answer is stored
        assert proc.returncode == -9
        assert rows(tiny_atlas.out, "SELECT count(*) FROM descriptions")[0][0] == 2
        sent = stats(stats_url)["requests"]
        result = tiny_atlas.describe(cfg(url, describe_concurrency=1))
        assert (result["described"], result["scored"], result["reused"]) == (2, 4, 2)
        assert stats(stats_url)["requests"] - sent == 6
        assert rows(tiny_atlas.out, "SELECT count(*), count(score) FROM descriptions")[0] == (4, 4)


def test_rate_limited_requests_are_retried_after_retry_after(tiny_atlas, tiny_gen):
    with serving(tiny_gen, batch=4, rate_limit=4.0) as (url, stats_url):
        result = tiny_atlas.describe(cfg(url, describe_budget=6, describe_retries=8))
        seen = stats(stats_url)
    assert seen["rate_limited"] > 0 and result["retried"] >= seen["rate_limited"]
    assert rows(tiny_atlas.out, "SELECT count(*), count(score) FROM descriptions")[0] == (6, 6)


class _Malformed(BaseHTTPRequestHandler):
    """An endpoint that answers 200 with JSON that is not a chat completion."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"choices": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def one_line_error(build: Build, config: DescribeConfig, *needles: str) -> None:
    """The stage stops with one AtlasError line naming the problem (the CLI prints it as ``error: ...``)."""
    with pytest.raises(AtlasError) as e:
        build.describe(config)
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_bad_endpoints_fail_in_one_line_and_keep_what_is_stored(tiny_atlas, tiny_gen):
    with serving(tiny_gen) as (url, _):
        assert tiny_atlas.describe(cfg(url, describe_budget=2))["scored"] == 2
        one_line_error(tiny_atlas, cfg(url, explainer_model="no-such-model"), "does not serve the model 'no-such-model'")
    with serving(tiny_gen, rate_limit=0.2) as (url, _):       # one request, then 429 with Retry-After ~5 s
        one_line_error(tiny_atlas, cfg(url, describe_retries=0), "rate limited", "rerun to resume")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Malformed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        one_line_error(tiny_atlas, cfg(f"http://127.0.0.1:{server.server_address[1]}/v1"), "malformed chat completion")
    finally:
        server.shutdown()
        server.server_close()
    # Nothing stored was lost: the 2 described and scored neurons, plus the one the 429 run got in.
    assert rows(tiny_atlas.out, "SELECT count(*), count(score) FROM descriptions")[0] == (3, 2)
    # From the command line the same failures are one `error:` line and exit code 2.
    with socket.socket() as s:                                    # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    proc = atlas("describe", "--out", tiny_atlas.out, "--model", tiny_atlas.model_spec, "--explainer-url", dead,
                 "--explainer-model", NAME, "--quiet")
    assert_one_line_error(proc, "cannot reach", dead)
    assert rows(tiny_atlas.out, "SELECT count(*), count(score) FROM descriptions")[0] == (3, 2)


def test_local_backend_runs_the_model_in_process(tiny_atlas):
    result = tiny_atlas.describe(DescribeConfig(explainer_url="local", explainer_model=tiny_atlas.model_spec,
                                                describe_budget=3, score_contexts=2, describe_max_tokens=5,
                                                describe_concurrency=2, score_method="logprob"))
    assert (result["described"], result["scored"]) == (3, 3)
    assert rows(tiny_atlas.out, "SELECT DISTINCT explainer, scorer, scorer_prompt_version FROM descriptions") == [
        (tiny_atlas.model_spec, tiny_atlas.model_spec, "detect-logprob-v1")]         # p(yes) from the forward pass
    assert rows(tiny_atlas.out, "SELECT count(*), count(p_yes) FROM description_scores") == [(6, 6)]


def test_pages_json_exports_and_search_carry_descriptions(tiny_atlas, tiny_gen):
    with serving(tiny_gen) as (url, _):
        tiny_atlas.describe(cfg(url, describe_budget=2))
    layer, neuron = rows(tiny_atlas.out, "SELECT layer, neuron FROM descriptions ORDER BY ALL LIMIT 1")[0]
    # Model output is untrusted text: a description with markup must stay text on the page.
    with duckdb.connect(str(tiny_atlas.out / "atlas.duckdb")) as con:
        con.execute("UPDATE descriptions SET description = ? WHERE layer = ? AND neuron = ?",
                    ['<script>alert(1)</script> zebracrossing words', layer, neuron])
    render_site(tiny_atlas.out, RenderConfig(workers=1), progress=False)
    site = tiny_atlas.out / "site"
    page = (site / f"neurons/{layer}/{neuron}/index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; zebracrossing" in page and "<script>alert(1)" not in page
    assert f"written by <code>{NAME}</code>" in page and "detection score <strong>" in page
    data = load_neuron(site / f"neurons/{layer}/{neuron}.json")
    (shown,) = table_rows(data, "descriptions")
    assert shown["explainer"] == NAME and "zebracrossing" in shown["description"]
    exports = site.parent / "exports"            # beside the site, not inside it
    with duckdb.connect(str(exports / "atlas.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM descriptions").fetchone()[0] == 2
    assert (exports / "descriptions.parquet").is_file()
    proc = atlas("search", site, "zebracrossing", "--json")
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)["hits"]
    assert [(h["layer"], h["neuron"]) for h in hits] == [(layer, neuron)]
    assert hits[0]["matches"][0]["source"] == "description"


def test_describe_settings_are_checked_before_anything_runs(tmp_path):
    for flags, needle in ((["--explainer-url", "http://x/v1"], "needs --explainer-model"),
                          (["--score-contexts", 3], "even number"),
                          (["--score-method", "vibes"], "give 'list', 'logprob' or 'embedding'"),
                          (["--describe-budget", -2], "--describe-budget")):
        assert_one_line_error(atlas("describe", "--out", tmp_path / "o", *flags), needle)
    assert not (tmp_path / "o").exists()
    with pytest.raises(AtlasError):
        DescribeConfig(describe_concurrency=0).validate()


@pytest.mark.slow
def test_embedded_model_describes_scores_and_beats_shuffled_descriptions(default_atlas, default_lm, tmp_path):
    """The embedded SmolLM2-135M behind `atlas serve-model`'s server: a tiny budget, and the held-out check.

    The README reports the figures of a larger run; this one checks that the pairs are
    made and scored on the same windows, whatever margin a 135M model reaches.
    """
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(default_atlas / "atlas.duckdb", out / "atlas.duckdb")      # the shared build stays as it is
    gen = Generator(default_lm, "smollm2")
    with serving(gen, batch=3) as (url, stats_url):
        # One batch per phase; a loaded 2-core machine needs minutes for one, hence the timeout.
        config = cfg(url, explainer_model="smollm2", describe_budget=3, describe_shown=4, score_contexts=4,
                     describe_max_tokens=12, describe_concurrency=3, describe_timeout=900.0)
        result = Build(out, "default", device="cpu", progress=False).describe(config)
        from atlas.pipeline import describe_check
        check = describe_check(out, config, "cpu")
        sent = stats(stats_url)["requests"]
        own = rows(out, "SELECT avg(score) FROM descriptions")[0][0]
        # The same descriptions scored by word vectors, and their held-out check: nothing more is sent.
        words = cfg(url, explainer_model="smollm2", describe_budget=3, describe_shown=4, score_contexts=4,
                    score_method="embedding")
        by_words = Build(out, "default", device="cpu", progress=False).describe(words)
        check_words = describe_check(out, words, "cpu")
        assert stats(stats_url)["requests"] == sent
    assert (result["described"], result["scored"]) == (3, 3) and sent == 9           # the list score: one per neuron
    assert check["pairs"] == 3 and check["own_higher"] + check["ties"] + check["own_lower"] == 3
    assert abs(check["own_mean"] - own) < 1e-6
    assert (by_words["described"], by_words["scored"], check_words["pairs"]) == (0, 3, 3)
    print("held-out check (3 neurons):", json.dumps(check), json.dumps(check_words))
