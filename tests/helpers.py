"""Shared test factories and checks: plain functions and constants, imported as ``from helpers import ...``.

Fixtures live in ``conftest.py`` (whose folder, ``tests/``, pytest puts on ``sys.path``, so
test files in any subfolder import this module the same way). Test modules never import
each other: what two of them share is here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import traceback
import urllib.parse
import warnings
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import torch

from atlas.resources import hostile
from atlas.store import without_timings

# -- fault counts ------------------------------------------------------------------------------
# What the fault-injection tests tried (tests/test_faults.py, test_bad_input.py, test_hostile.py,
# and every one-line-error check): conftest.py prints it at the end of the run, the README quotes it.
FAULT_COUNTS: dict[str, set] = {"kill points": set(), "bad inputs": set(), "hostile strings": set()}

# -- tiny models -------------------------------------------------------------------------------
# Token strings a tokenizer may hold and a page must never run (data/hostile.json): the tiny
# tokenizer's vocabulary holds every distinct non-empty one, and the site escapes them all.
HOSTILE_TOKENS = [t for t in dict.fromkeys(hostile("tokens")) if t]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox"]


def tiny_config(arch: str, vocab: int = 64):
    """A 2-layer, d_model=32 config of each supported family."""
    import transformers as tf

    common = dict(vocab_size=vocab, num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                  intermediate_size=48, max_position_embeddings=64)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gemma":
        return tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=None, **common)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, final_logit_softcapping=None, **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_layer=2, n_head=4, n_embd=32, n_inner=48, n_positions=64)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    if arch == "opt":  # a causal LM family atlas has no adapter for
        return tf.OPTConfig(vocab_size=vocab, num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                            ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64)
    raise KeyError(arch)


def tiny_model(arch: str, vocab: int = 64):
    """A random model whose norm gains are random too, so that a missing gain shows in the tests."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.normal_(0.5 if p.ndim == 1 else 0.0, 0.3)
    return model.eval()


def tiny_tokenizer(vocab: int = 64):
    """A word-level tokenizer whose vocabulary includes the hostile strings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + HOSTILE_TOKENS + [" dog", "dog", " cat", " Paris"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(path: Path, arch: str = "llama", vocab: int = 64) -> Path:
    """Save a tiny model (seeded: the same weights whoever asks first) with its tokenizer into ``path``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tiny_model(arch, vocab).save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


# -- a small corpus and the settings the stage tests build with ----------------------------------
WORDS = ["dog", " dog", "cat", "Paris", "w5", "w7", "w9", "w11", "w13", "w20", "w30"]
CFG = dict(context=16, batch_size=4, k=5, attribution_rows=8, checkpoint_every=2)     # ExemplarConfig
EPOCH = "1700000000"          # pins created_at, so that sites of different runs compare byte for byte
BUILD = ["--context", 16, "--batch-size", 4, "--k", 5, "--attribution-rows", 8, "--checkpoint-every", 2,
         "--top-k", 5, "--bottom-k", 3, "--quiet"]                                    # `atlas build` flags


# The one build of the embedded default model that the slow tests share (conftest's
# `default_atlas`): the default settings on a small corpus slice, the one of the README's
# concept table. A rerun with the same flags must skip every stage.
# The clamp check measures 64 neurons, not the CPU default of 2048: no slow test reads its breadth,
# and 256 cost CI a minute more (tests/test_clamp_concepts.py measures the concepts themselves).
# 8,192 corpus tokens (64 inputs) still fill every neuron's 20 exemplars; 16,384 cost a minute more.
# The model is asked for examples of 1,000 concept words, not the CPU default's 4,000 (about 20 s
# less): no slow test reads their breadth; the model's answers are tested in tests/site/test_concepts.py.
DEFAULT_BUILD = ["--max-tokens", 8192, "--clamp-budget", 64, "--label-examples", 1000, "--quiet"]


def corpus_file(folder: Path, n_words: int = 2400, name: str = "corpus.txt") -> Path:
    """A seeded random text of the tiny vocabulary's words."""
    rng = random.Random(0)
    path = Path(folder) / name
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)))
    return path


# -- the command line, in real processes ---------------------------------------------------------
def atlas(*args, env: dict | None = None, fsize: int | None = None, wait: bool = True, cwd=None,
          timeout: int = 600):
    """``python -m atlas ARGS`` in a real process; ``fsize`` caps any file it writes (RLIMIT_FSIZE).

    Returns the finished process, or with ``wait=False`` the running ``Popen``."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    cmd = [sys.executable, "-m", "atlas", *map(str, args)]
    full_env = dict(os.environ, **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=limit, cwd=cwd)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, preexec_fn=limit,
                          cwd=cwd)


# -- the command line, in this process -----------------------------------------------------------
# A `python -m atlas` process costs ~5 s on 2 cores, nearly all of it importing torch and
# transformers and loading a model; the same command here costs a fraction of a second once this
# process has imported them. Tests whose point is the message and the untouched store use this;
# kills, signals, file-size limits, `serve` and one bad input per command family keep real processes.
@dataclasses.dataclass
class Ran:
    """A finished in-process run, read like ``subprocess.CompletedProcess``."""
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


# What a fresh interpreter ignores (Python's default warning filters): anything else a run warns
# about is written to its stderr, where a real process would print it.
_FRESH_PROCESS_IGNORES = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def atlas_here(*args, env: dict | None = None, cwd=None) -> Ran:
    """``python -m atlas ARGS`` through the real entry point (``atlas.cli.main``) in this process.

    Exit code, stdout and stderr are the process's: the same prog name in usage errors, sys.argv
    for ``--debug``, Python's default warning filters, library log lines on stderr (through the
    handlers a fresh process would have) and a traceback for an exception that escapes. The state
    a command may change for the whole process is put back afterwards: os.environ, the working
    directory, SIGINT/SIGTERM handlers, torch's threads, grad mode, default dtype and denormal
    flushing, every logger's level and handlers, and transformers' progress bars. One run at a
    time, from the main thread: sys.stdout, sys.stderr and the loggers belong to the whole process."""
    from atlas.cli import main
    from transformers.utils import logging as hf_logging

    # transformers binds its log handler to the sys.stderr of the moment it first logs: let that
    # be this process's, not the StringIO of one run.
    hf_logging.get_logger("transformers")
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with _process_state_kept(), warnings.catch_warnings(record=True) as warned, \
            _logs_to(err), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("default")
        for category in _FRESH_PROCESS_IGNORES:
            warnings.simplefilter("ignore", category)
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["python -m atlas", *argv]
        try:
            main.main(argv, prog_name="python -m atlas")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:             # what a real process prints for an uncaught exception
            traceback.print_exc()
            code = 1
    stderr = err.getvalue() + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
                                      for w in warned)
    return Ran(argv, code, out.getvalue(), stderr)


@contextlib.contextmanager
def _logs_to(stream):
    """Library log lines to ``stream`` as in a fresh process: no root handlers (pytest's go away
    for the run, so Python's last-resort handler writes WARNING and above to sys.stderr), and the
    libraries' own stderr handlers (transformers') retargeted."""
    root = logging.getLogger()
    root_handlers, root.handlers = root.handlers, []
    retargeted = []
    for logger in [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]:
        for h in logger.handlers:
            if type(h) is logging.StreamHandler:
                retargeted.append((h, h.setStream(stream)))
    try:
        yield
    finally:
        for h, old in retargeted:
            h.setStream(old)
        root.handlers = root_handlers


def _flushes_denormals() -> bool:
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0        # 1e-39 is a float32 denormal


@contextlib.contextmanager
def _process_state_kept():
    """Puts back what an in-process command may change for the whole process (see atlas_here)."""
    from transformers.utils import logging as hf_logging

    argv, environ, cwd = sys.argv[:], dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads, grad, dtype, flush = torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(), \
        _flushes_denormals()
    loggers = {lg: (lg.level, lg.handlers[:], lg.propagate, lg.disabled)
               for lg in [logging.getLogger(), *logging.root.manager.loggerDict.values()]
               if isinstance(lg, logging.Logger)}
    disabled, bars = logging.root.manager.disable, hf_logging.is_progress_bar_enabled()
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.set_flush_denormal(flush)
        for lg, (level, hs, propagate, off) in loggers.items():
            lg.setLevel(level)
            lg.handlers[:] = hs
            lg.propagate, lg.disabled = propagate, off
        logging.disable(disabled)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def assert_one_line_error(proc, *needles) -> str:
    """Exit code 2 and one ``error:`` line holding every needle, no traceback; counted in FAULT_COUNTS.
    Returns the line."""
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    FAULT_COUNTS["bad inputs"].add(lines[0])
    return lines[0]


# -- stores and sites ------------------------------------------------------------------------------
def store_rows(path: Path, timings: bool = False) -> dict[str, str]:
    """Every table's rows in a canonical order (atlas_meta less its timings unless ``timings``), as text
    to compare."""
    with duckdb.connect(str(path), read_only=True) as con:
        tables = sorted(r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall())
        out = {}
        for t in tables:
            if t == "atlas_meta" and not timings:
                out[t] = repr(sorted((k, without_timings(json.loads(v)))
                                     for k, v in con.execute("SELECT key, value FROM atlas_meta").fetchall()))
            else:
                out[t] = repr(con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall())   # repr: NaN == NaN
    return out


class Links(HTMLParser):
    """The tags, attribute names and link targets of a page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.attrs_seen: set[str] = set()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            self.attrs_seen.add(name)
            if name in ("href", "src") and value is not None:
                self.hrefs.append(value)

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> Links:
    parser = Links()
    parser.feed(text)
    parser.close()
    return parser


def resolve(page: Path, href: str) -> Path | None:
    """The file a relative link from ``page`` opens on a static server; None for other sites."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc or href.startswith("#"):
        return None
    target = (page.parent / parts.path).resolve()
    return target / "index.html" if parts.path.endswith("/") or target.is_dir() else target


def assert_tokens_escaped(site: Path, tokens: list[str]) -> dict[str, int]:
    """No page holds a token with markup as it is, no page gains an event handler, and each such
    token that the site shows reads back as the same text. Returns how many pages show each."""
    markup = [t for t in tokens if set(t) & set("<>\"")]
    shown = dict.fromkeys(markup, 0)
    for page in sorted(site.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        parsed = parse(html)
        for t in markup:
            assert t not in html, (page.relative_to(site).as_posix(), t)
        assert not {a for a in parsed.attrs_seen if a.startswith("on")} - {"onsubmit"}, page
        text = "".join(parsed.text)
        for t in markup:
            shown[t] += t.replace(" ", "␣") in text or t in text
    return shown


# -- a static server and the browser ---------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def served(root: Path):
    """Serve ``root`` on a free port of 127.0.0.1 as any static file server would; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def watch_errors(page):
    """Collect the page's console errors and uncaught exceptions in ``page.errors``."""
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    return page


def search_page(browser, base: str, query: str):
    """Open search/?q=query and wait for the results; returns the page, whose .errors lists console errors."""
    page = watch_errors(browser.new_page())
    page.goto(base + "search/?q=" + urllib.parse.quote(query))
    page.wait_for_selector("#atlas-search-status[data-state=done]", timeout=60_000)
    return page


def result_links(page, list_id: str = "atlas-search-results") -> list[tuple[str, str]]:
    """(href as written, absolute URL) of every result link."""
    return page.evaluate(f"""Array.from(document.querySelectorAll('#{list_id} a'))
                             .map(a => [a.getAttribute('href'), a.href])""")


def check_concepts(browser, site: Path, queries: list[str], min_hits: int = 1) -> dict[str, int]:
    """In Chromium, each query lists the neurons `atlas search` ranks, in order, each page existing.

    Returns the hits per query. Used on a synthetic atlas and by the smoke test on the default one.
    """
    from atlas.site.search_query import search

    found = {}
    with served(site) as base:
        for query in queries:
            page = search_page(browser, base, query)
            links = result_links(page)
            want = search(site, query, limit=50)["hits"]
            assert [href for href, _ in links] == [f"../neurons/{h['layer']}/{h['neuron']}/" for h in want], query
            assert len(links) >= min_hits, (query, page.text_content("#atlas-search-status"))
            for href, url in links:
                rel = url.removeprefix(base)
                assert (site / rel / "index.html").is_file(), (query, href)
            scores = page.eval_on_selector_all(".atlas-search-strength", "els => els.map(e => e.textContent)")
            assert scores == [f"{h['score']:.2f}" for h in want], query
            pushed = page.eval_on_selector_all("#atlas-search-results li", """els => els.map(e => {
                const p = e.querySelector('.atlas-search-pushed'); return p ? p.textContent : null; })""")
            assert pushed == [None if h["faithfulness"] is None else f"pushed {h['faithfulness']:.2f}"
                              for h in want], query
            assert page.errors == [], (query, page.errors)
            found[query] = len(links)
            page.close()
    return found


def duplicate_windows(con) -> list[tuple]:
    """(layer, neuron, polarity, count) of every neuron showing one exemplar window (its tokens,
    clipped to the input as a page shows them) more than once; empty when all are distinct."""
    return con.execute("""
        SELECT layer, neuron, polarity, count(*) AS c FROM (
            SELECT e.layer, e.neuron, e.polarity,
                   list_slice(d.token_ids, greatest(e.window_start, 0) + 1, e.window_start + w.n) AS win
            FROM exemplars e JOIN corpus_docs d USING (doc_id),
                 (SELECT CAST(value->'window'->>'before' AS INT) + CAST(value->'window'->>'after' AS INT) + 1 AS n
                  FROM atlas_meta WHERE key = 'corpus') w)
        GROUP BY layer, neuron, polarity, win HAVING c > 1 ORDER BY ALL""").fetchall()


# -- a small store with neurons about known concepts ---------------------------------------------
# (layer, neuron): its top decoded `out` tokens, planted over a synthetic store's rows.
CONCEPT_NEURONS = {
    (1, 5): [" bird", " mammal", " monkey", " shark", " insect"],          # animals, none spelled "animal"
    (1, 9): [" red", " blue", " green", " pink", " yellow"],               # colours
    (0, 7): [" animal", " Animal", "animals"],                             # the word itself
    (1, 20): [" dog", " Dogs", "Dogs"],                                    # one word's variants
    (1, 30): [" eleph", "itarian", " veterin", " dolph", " mamm"],         # pieces of animal words, no words
    (1, 40): [" which", " might", " both", " would", " the"],              # function words
}


def concept_store(path: Path, corpus: bool = False) -> Path:
    """A 2 x 64 synthetic store whose CONCEPT_NEURONS decode to those tokens, strongest first
    (with ``corpus``, a synthetic corpus and exemplars of made-up words too)."""
    from atlas.bench.synthetic import make_synthetic_store

    store = make_synthetic_store(path, 2, 64, vocab_size=512, corpus=corpus)
    with duckdb.connect(str(store)) as con:
        next_id = con.execute("SELECT max(token_id) + 1 FROM vocab").fetchone()[0]
        ids = {}
        for tokens in CONCEPT_NEURONS.values():
            for token in tokens:
                if token not in ids:
                    ids[token] = next_id
                    con.execute("INSERT INTO vocab VALUES (?, ?, ?)", [next_id, token, token])
                    next_id += 1
        for (layer, neuron), tokens in CONCEPT_NEURONS.items():
            top = con.execute("SELECT max(logit) FROM decoded_tokens WHERE layer = ? AND neuron = ? AND side = 'out' "
                              "AND polarity = 'top'", [layer, neuron]).fetchone()[0]
            for rank, token in enumerate(tokens):
                con.execute("UPDATE decoded_tokens SET token = ?, token_id = ?, logit = ? WHERE layer = ? AND neuron = ? "
                            "AND side = 'out' AND polarity = 'top' AND rank = ?",
                            [token, ids[token], top + 4 - rank * 0.1, layer, neuron, rank])
    return store


def float_bits(t):
    """A float tensor's bit patterns, for equality bit for bit (NaN equals NaN, -0.0 is not 0.0)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}
    return t.view(ints[t.dtype]) if t.dtype in ints else t


# -- the search index's packed shards, written from rows the test chose ------------------------------
def packed_shards(folder: Path, n_shards: int = 4) -> tuple[Path, dict, dict]:
    """Shards written by ``search._write_shards`` from hand-made kept postings: hostile tokens and
    evidence words (spaces, commas, markup, controls, an empty word, a missing list), and ranges of
    an 80-layer, 128k-neuron model whose fields need more than one packed group.

    Returns (folder of the shards, the postings' layout, per term what a reader must decode:
    ``n``, ``d`` and its postings as (layer, neuron, strength, src, rank, check, token), best first)."""
    from atlas.site.index_format import CONCEPT, DESCRIPTION, EVIDENCED, FIRES, shard_of
    from atlas.site.search import _write_shards

    rng = random.Random(0)
    tokens = HOSTILE_TOKENS + ["dog", " dog", "Dog"]
    plain = ["bird", "mammal", "1,000", "", "caf\u00e9", "<b>"]         # no word with a space: joined by spaces
    hostile_words = [t for t in HOSTILE_TOKENS if ", " not in t] + plain + ["new york"]
    terms = ["dog", "<script>alert(1)</script>", "constructor", "__proto__", "a b", "\u202eevil", "caf\u00e9"]
    vocab, kept, expected = list(enumerate(tokens)), [], {}
    for t, term in enumerate(terms):
        rows = []
        for pos in range(1, 2 + 60 * (t % 3)):
            src = rng.choice([0, 1, 4, 5, 6, DESCRIPTION] + [CONCEPT, CONCEPT, FIRES] * (term != "constructor"))
            token_id = rng.randrange(len(tokens)) if src < CONCEPT else None
            evidence = None
            if src in EVIDENCED and rng.random() < 0.9:
                evidence = ", ".join(rng.sample(plain if t % 2 else hostile_words, rng.randint(1, 5)))
            rows.append(dict(term=term, pos=pos, layer=rng.choice([0, 79, rng.randrange(80)]),
                             neuron=rng.choice([0, 131_071, rng.randrange(131_072)]),
                             strength=rng.choice([-5, 0, 2**31 - 1, rng.randrange(20_000)]), src=src,
                             rank=rng.choice([0, 4095, rng.randrange(20)]), check=rng.choice([-1, 0, 100, rng.randrange(101)]),
                             token_id=token_id, evidence=evidence))
        n = len(rows) + rng.randrange(1000)
        d = [rng.randrange(n), rng.randrange(n), rng.randrange(n)]
        for r in rows:
            r.update(n_total=n, n_promotes=d[0], n_suppresses=d[1], n_reads=d[2])
        kept += rows
        expected[term] = {"n": n, "d": d, "postings": [
            (r["layer"], r["neuron"], r["strength"], r["src"], r["rank"], r["check"],
             (r["evidence"] if r["evidence"] is not None else term) if r["src"] in EVIDENCED
             else tokens[r["token_id"]] if r["token_id"] is not None else term) for r in rows]}
    con = duckdb.connect()
    con.execute("CREATE TABLE vocab (token_id INTEGER, token VARCHAR)")
    con.executemany("INSERT INTO vocab VALUES (?, ?)", vocab)
    columns = list(kept[0])
    con.execute("CREATE TEMP TABLE search_kept (term VARCHAR, pos BIGINT, layer SMALLINT, neuron INTEGER, strength INTEGER, "
                "src INTEGER, rank INTEGER, \"check\" INTEGER, token_id INTEGER, evidence VARCHAR, n_total BIGINT, "
                "n_promotes BIGINT, n_suppresses BIGINT, n_reads BIGINT)")
    con.executemany(f"INSERT INTO search_kept ({', '.join(map(json.dumps, columns))}) VALUES ({', '.join('?' * len(columns))})",
                    [[r[c] for c in columns] for r in kept])
    con.execute("CREATE TEMP TABLE search_buckets AS SELECT term, CAST(NULL AS INTEGER) AS bucket "
                "FROM (SELECT DISTINCT term FROM search_kept)")
    for term in terms:
        con.execute("UPDATE search_buckets SET bucket = ? WHERE term = ?", [shard_of(term, n_shards), term])
    # Two terms are words of another language the model read as a (hostile) English word.
    aliases = {"caf\u00e9": ["</script><b>x", "French"], "\u202eevil": ["a\u0000b \"q\"", "Latvian"]}
    con.execute("CREATE TEMP TABLE search_aliases (term VARCHAR, target VARCHAR, language VARCHAR)")
    con.executemany("INSERT INTO search_aliases VALUES (?, ?, ?)", [[t, *a] for t, a in aliases.items()])
    for term, alias in aliases.items():
        expected[term]["a"] = alias
    _, layout = _write_shards(con, folder, n_shards)
    return folder, layout, expected
