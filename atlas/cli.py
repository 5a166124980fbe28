"""The `atlas` command: a thin layer over the Python API, with options taken from the stage configs."""

from __future__ import annotations

import dataclasses
import errno
import json
import signal
import sys
import threading
import traceback
from pathlib import Path

import click
import duckdb

from atlas import __version__
# Settings only: the stages, which import torch (a second or more), load when a command runs.
from atlas.config import (SHAPES, ClampConfig, ClusterConfig, DecodeConfig, DescribeConfig, ExemplarConfig,
                          LabelsConfig, RenderConfig,
                          check_device)
from atlas.errors import AtlasError


class IntOrAll(click.ParamType):
    """A positive count, or 'all' for no limit (None in the config)."""

    name = "integer|all"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "all":
            return None
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'all'", param, ctx)


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "int | None": IntOrAll()}


def config_options(cls):
    """Add one click option per field of a config dataclass, so flags and configs cannot drift."""
    def decorate(f):
        have = {p.name for p in getattr(f, "__click_params__", [])}
        for fld in reversed(dataclasses.fields(cls)):
            if fld.name in have:        # a setting two stages share (--ray): one flag sets both
                continue
            flag = "--" + fld.name.replace("_", "-")
            help_ = fld.metadata.get("help", "")
            if _TYPES[str(fld.type)] is bool:
                f = click.option(f"{flag}/--no-{flag[2:]}", fld.name, default=fld.default, help=help_)(f)
            else:
                f = click.option(flag, fld.name, type=_TYPES[str(fld.type)], default=fld.default,
                                 show_default=True, help=help_)(f)
        return f
    return decorate


def config_from(cls, kwargs: dict):
    """Take a config's fields out of click's kwargs and build the config (shared fields stay for the next)."""
    return cls(**{f.name: kwargs[f.name] for f in dataclasses.fields(cls)})


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that cleanup runs
    (transactions roll back, render stops its page workers and removes its half-built site)."""


def _on_sigterm(signum, frame):
    raise Terminated()


class AtlasGroup(click.Group):
    """Turns AtlasError and OS errors into one line and exit code 2; tracebacks only with --debug."""

    def invoke(self, ctx):
        debug = "--debug" in sys.argv
        main_thread = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        try:
            return self._invoke(ctx, debug)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, old_term)

    def _invoke(self, ctx, debug: bool):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:      # one line too, like every other bad input
            where = e.ctx.command_path if e.ctx else "atlas"
            _fail(f"error: {e.format_message()} (see {where} --help)", 2, debug)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except AtlasError as e:
            _fail(f"error: {e}", 2, debug)
        except KeyboardInterrupt:
            _fail("interrupted: rerun the same command to resume where it stopped", 130, debug)
        except Terminated:
            _fail("terminated (SIGTERM): rerun the same command to resume where it stopped", 143, debug)
        except OSError as e:
            # shutil names the source first and the file it was writing second.
            path = getattr(e, "filename2", None) or getattr(e, "filename", None)
            where = f": {path}" if path else ""
            if e.errno in _NO_SPACE:
                _fail(f"error: out of disk space ({e.strerror}){where}; free some space and rerun to resume",
                      2, debug)
            _fail(f"error: {e.strerror or e}{where}", 2, debug)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            # The store could not be written (a failed commit says so too): the disk, not a bug.
            if isinstance(e, duckdb.Error) and any(s in msg for s in _DAMAGED_TEXT):
                _fail(f"error: the store is damaged ({msg}); a rerun cannot resume it: rebuild the atlas "
                      "(`atlas build --force` on the same --out, or another --out)", 2, debug)
            if isinstance(e, duckdb.Error) and (isinstance(e, duckdb.IOException) or "Could not write" in msg):
                if any(s in msg for s in _NO_SPACE_TEXT):
                    _fail(f"error: out of disk space writing the store ({msg}); rerun to resume once fixed", 2, debug)
                _fail(f"error: the store could not be read or written ({msg})", 2, debug)
            # Anything else is a bug: say so in one line, keep the traceback for --debug.
            _fail(f"internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", 1, debug)


_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NO_SPACE_TEXT = ("No space left", "File too large", "quota exceeded")
# DuckDB's words for a file whose blocks are cut short or do not match their checksums.
_DAMAGED_TEXT = ("Corrupt database", "checksum", "Could not read enough bytes", "not a valid DuckDB database")


def _fail(message: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    click.echo(message, err=True)
    sys.exit(code)


model_option = click.option("--model", default="default", show_default=True,
                            help="local HF model directory, .gguf file, hub id, or 'default' (embedded SmolLM2-135M-Instruct)")
device_option = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1 … (auto: cuda if present)")
dtype_option = click.option("--dtype", default="auto", show_default=True,
                            help="float32, bfloat16 or float16 (auto: bfloat16 on CUDA, float32 on CPU)")
out_option = click.option("--out", "out", required=True, type=click.Path(path_type=Path),
                          help="output directory: holds atlas.duckdb and site/")
quiet_option = click.option("--quiet", is_flag=True, help="no progress bars")


@click.group(cls=AtlasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="atlas")
@click.option("--debug", is_flag=True, help="show full tracebacks")
def main(debug: bool) -> None:
    """Build a static, searchable, citable website with one page per MLP neuron."""


def _print_summary(result: dict) -> None:
    click.echo(json.dumps(result, indent=2, default=str, sort_keys=True))


@main.command()
@out_option
@model_option
@device_option
@dtype_option
@click.option("--force", is_flag=True, help="start from scratch, replacing a store of another model")
@config_options(DecodeConfig)
@config_options(ExemplarConfig)
@config_options(ClusterConfig)
@config_options(LabelsConfig)
@config_options(ClampConfig)
@config_options(DescribeConfig)
@config_options(RenderConfig)
@quiet_option
def build(out, model, device, dtype, force, quiet, **kw):
    """Run every stage: decode, exemplars (corpus pass and attribution), cluster, labels, clamp, render.

    Reruns skip finished work, and an interrupted build resumes where it stopped.

    \b
    Example:
      atlas build --out out/smollm2
      atlas build --out out/smollm2 --corpus my_texts/ --max-tokens all
      atlas build --model ./Llama-3.1-8B --out out/llama --device cuda
      atlas build --model ./Llama-3.1-8B --out out/llama --ray auto   # every GPU of a local Ray cluster
    """
    decode, render = config_from(DecodeConfig, kw), config_from(RenderConfig, kw)
    exemplar_cfg, cluster_cfg, labels_cfg, clamp_cfg, describe_cfg = (config_from(c, kw) for c in (
        ExemplarConfig, ClusterConfig, LabelsConfig, ClampConfig, DescribeConfig))
    check_device(device)
    for cfg in (decode, exemplar_cfg, cluster_cfg, labels_cfg, clamp_cfg, describe_cfg, render):
        cfg.validate()              # in a fraction of a second: before the pipeline imports torch
    from atlas.pipeline import build as run_build
    _print_summary(run_build(out, model, decode, render, exemplar_cfg, device=device, dtype=dtype, force=force,
                             progress=not quiet, cluster=cluster_cfg, clamp=clamp_cfg, describe=describe_cfg,
                             configs={"labels": labels_cfg}))


@main.command()
@out_option
@model_option
@device_option
@dtype_option
@config_options(DecodeConfig)
@quiet_option
def decode(out, model, device, dtype, quiet, **kw):
    """Decode every neuron's weights through the LM head into the store.

    \b
    Example:
      atlas decode --out out/smollm2 --top-k 50
    """
    from atlas.pipeline import Build
    cfg = config_from(DecodeConfig, kw)
    cfg.validate()                  # before the output directory or the store is touched
    _print_summary(Build(out, model, device, dtype, progress=not quiet).decode(cfg))


@main.command()
@out_option
@model_option
@device_option
@dtype_option
@config_options(ExemplarConfig)
@quiet_option
def exemplars(out, model, device, dtype, quiet, **kw):
    """Run the model over a corpus: exemplars, activation quantiles, histograms, attribution.

    \b
    Example:
      atlas exemplars --out out/smollm2 --corpus my_texts/ --max-tokens 1000000
      atlas exemplars --out out/smollm2 --ray ray://head:10001 --max-tokens all
    """
    from atlas.pipeline import Build
    cfg = config_from(ExemplarConfig, kw)
    cfg.validate()                  # before the output directory or the store is touched
    _print_summary(Build(out, model, device, dtype, progress=not quiet).exemplars(cfg))


@main.command()
@out_option
@model_option
@device_option
@dtype_option
@config_options(ClusterConfig)
@quiet_option
def cluster(out, model, device, dtype, quiet, **kw):
    """Cluster neurons by what they write to the vocabulary; lay them out on a map; find neighbours.

    \b
    Example:
      atlas cluster --out out/smollm2
      atlas cluster --out out/smollm2 --n-clusters 300 --neighbours 20
    """
    from atlas.pipeline import Build
    cfg = config_from(ClusterConfig, kw)
    cfg.validate()                  # before the output directory or the store is touched
    _print_summary(Build(out, model, device, dtype, progress=not quiet).cluster(cfg))


@main.command()
@out_option
@model_option
@device_option
@dtype_option
@config_options(LabelsConfig)
@quiet_option
def labels(out, model, device, dtype, quiet, **kw):
    """Label each neuron's concept from its decoded tokens, or else from the tokens it fires on in the
    corpus (word vectors), and name clusters by them;
    the model's own examples of each concept word ("The most common kinds of metal are") count as
    evidence for search and cluster names, and its readings of words of other languages ('The
    French word "couleur" means "') let search find them.

    \b
    Example:
      atlas labels --out out/smollm2
      atlas labels --out out/smollm2 --label-min-evidence 4
      atlas labels --out out/smollm2 --label-examples 0     # word vectors only, no model run
      atlas labels --out out/smollm2 --label-translations 5000 --label-languages fr,es
    """
    from atlas.pipeline import Build
    cfg = config_from(LabelsConfig, kw)
    cfg.validate()
    _print_summary(Build(out, model, device, dtype, progress=not quiet).run_stage("labels", cfg))


@main.command()
@out_option
@model_option
@device_option
@dtype_option
@config_options(ClampConfig)
@quiet_option
def clamp(out, model, device, dtype, quiet, **kw):
    """Clamp neurons to a multiple of their normaliser on probe prompts; store how the next token moves.

    \b
    Example:
      atlas clamp --out out/smollm2
      atlas clamp --out out/smollm2 --clamp-budget 0      # skip: no neuron measured
      atlas clamp --out out/smollm2 --clamp-multiple 4 --clamp-budget 512
      atlas clamp --out out/llama --ray auto                # every neuron, one model copy per GPU
    """
    from atlas.pipeline import Build
    cfg = config_from(ClampConfig, kw)
    cfg.validate()                  # before the output directory or the store is touched
    _print_summary(Build(out, model, device, dtype, progress=not quiet).clamp(cfg))


@main.command()
@out_option
@model_option
@device_option
@dtype_option
@config_options(DescribeConfig)
@click.option("--dry-run", is_flag=True, help="print the requests and tokens the run would send, and send none")
@click.option("--check-shuffled", is_flag=True,
              help="after describing, score each neuron's contexts with another neuron's description too "
                   "(one request per scored neuron) and print own versus shuffled mean scores")
@quiet_option
def describe(out, model, device, dtype, dry_run, check_shuffled, quiet, **kw):
    """Ask an explainer model for one description per neuron, and a scorer for its detection score.

    Any OpenAI-compatible endpoint works; the API key, if it needs one, is read from
    $ATLAS_API_KEY (or the variable --api-key-env names). Answers are stored as they
    arrive: a rerun resumes and never asks twice.

    \b
    Example:
      atlas describe --out out/smollm2 --explainer-url http://localhost:8000/v1 \\
          --explainer-model Qwen/Qwen2.5-7B-Instruct --describe-budget 1000 --dry-run
      atlas describe --out out/smollm2 --explainer-url local --explainer-model default --describe-budget 20
    """
    cfg = config_from(DescribeConfig, kw)
    cfg.validate()                  # before the output directory or the store is touched
    if dry_run:
        from atlas.pipeline import describe_dry_run
        _print_summary(describe_dry_run(out, cfg))
        return
    from atlas.pipeline import Build, describe_check
    result = Build(out, model, device, dtype, progress=not quiet).describe(cfg)
    if check_shuffled:
        result = {"describe": result, "shuffled_check": describe_check(out, cfg, device)}
    _print_summary(result)


@main.command("serve-model")
@click.option("--model", default="default", show_default=True,
              help="local HF model directory, .gguf file, hub id, or 'default' (embedded SmolLM2-135M-Instruct)")
@click.option("--name", default=None, help="the model's name in requests and /v1/models (default: its id)")
@device_option
@dtype_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port, 1 to 65535 (0: any free port)")
@click.option("--batch", default=8, show_default=True, type=int, help="requests answered together in one generate")
@click.option("--rate-limit", default=0.0, show_default=True, type=float,
              help="requests a second before answering 429 with Retry-After (0: no limit)")
def serve_model(model, name, device, dtype, host, port, batch, rate_limit):
    """Serve a transformers model with the OpenAI chat API (/v1/chat/completions, logprobs included), batching concurrent requests.

    \b
    Example:
      atlas serve-model --port 8001 &
      atlas describe --out out/smollm2 --explainer-url http://127.0.0.1:8001/v1 \\
          --explainer-model HuggingFaceTB/SmolLM2-135M-Instruct --describe-budget 20
    """
    check_device(device)
    if batch < 1 or not 0 <= port <= 65535 or rate_limit < 0:
        raise AtlasError("--batch must be at least 1, --port 0 to 65535 and --rate-limit not negative")
    from atlas.llm.generate import Generator
    from atlas.llm.server import make_server
    from atlas.model.load import load_model
    gen = Generator(load_model(model, device, dtype), name)
    try:
        server = make_server(gen, host, port, batch, rate_limit)
    except OSError as e:
        raise AtlasError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    click.echo(f"serving {gen.name} at http://{host}:{server.server_address[1]}/v1", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


@main.command()
@click.argument("prompt")
@click.option("--neuron", "neurons", multiple=True, required=True, help="layer/neuron to clamp, e.g. 13/777; repeatable")
@click.option("--value", "values", multiple=True, required=True,
              help="activation to set (negative suppresses), or a multiple of the normaliser like 4x "
                   "(needs --atlas); one for all neurons or one per --neuron")
@click.option("--tokens", default=40, show_default=True, type=int, help="tokens to generate")
@click.option("--atlas", "atlas_dir", type=click.Path(path_type=Path),
              help="an atlas output directory: its model is used and 4x values read its normalisers")
@click.option("--model", default=None, help="model to load (default: the atlas's model, else the embedded one)")
@device_option
@dtype_option
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def steer(prompt, neurons, values, tokens, atlas_dir, model, device, dtype, as_json):
    """Generate from PROMPT with and without neurons clamped at every position, side by side.

    \b
    Example:
      atlas steer --neuron 13/777 --value 8 "My favourite animal is"
      atlas steer --atlas out/smollm2 --neuron 13/777 --value 6x --neuron 20/5 --value -4 "Today"
    """
    from atlas.steer import steer_cli
    result = steer_cli(prompt, neurons, values, tokens, atlas_dir, model, device, dtype)
    if as_json:
        _print_summary(result)
        return
    for iv in result["interventions"]:
        click.echo(f"clamp {iv['layer']}/{iv['neuron']} = {iv['value']:.4g}")
    click.echo(f"prompt:   {result['prompt']!r}")
    click.echo(f"baseline: {result['baseline']!r}")
    click.echo(f"steered:  {result['steered']!r}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@config_options(RenderConfig)
@click.option("--force", is_flag=True, help="render even if the site is up to date")
@quiet_option
def render(out, force, quiet, **kw):
    """Render DIR/site from DIR/atlas.duckdb.

    \b
    Example:
      atlas render out/smollm2
    """
    from atlas.pipeline import render_site
    _print_summary(render_site(out, config_from(RenderConfig, kw), not quiet, force))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--check", "check_host", metavar="HOST", help="only check the site against HOST's limits")
@click.option("--to", "to_host", metavar="HOST", help="check, then publish the site to HOST")
@click.option("--remote", default="", help="git hosts: the repository to push to (URL or path); object storage: "
              "s3://, r2:// or gs://BUCKET/PREFIX; cloudflare-pages: the project name")
@click.option("--branch", default="", help="git hosts: the branch to push (default: gh-pages, main or pages by host)")
@quiet_option
def publish(path, check_host, to_host, remote, branch, quiet):
    """Check a rendered atlas (DIR or DIR/site) against a host's limits, then publish it.

    Every limit the site breaks is named with the file or folder that breaks it, and
    nothing is uploaded (exit code 2). Hosts: github-pages, huggingface, gitlab-pages,
    cloudflare-pages, cloudflare-pages-paid, object-storage. Git hosts get a commit on a
    branch, pushed (a rerun pushes only what changed); the others get the exact upload command.

    \b
    Example:
      atlas publish out/smollm2 --check github-pages
      atlas publish out/smollm2 --to github-pages --remote git@github.com:me/atlas.git
      atlas publish out/smollm2 --to object-storage --remote s3://my-bucket/atlas
    """
    from atlas.publish import check, publish as run_publish
    from atlas.publish.hosts import HOSTS

    if bool(check_host) == bool(to_host):
        raise AtlasError("give one of --check HOST or --to HOST (hosts: " + ", ".join(HOSTS) + ")")
    if check_host:
        stats, broken = check(path, check_host)
        click.echo(f"{stats['bytes']:,} bytes in {stats['files']:,} files; fullest folder "
                   f"{stats['fullest_folder']}/ ({stats['fullest_entries']:,} entries); largest file "
                   f"{stats['largest_file']} ({stats['largest_bytes']:,} bytes)")
        if broken:
            from atlas.publish import SiteTooBig
            raise SiteTooBig(HOSTS[check_host], broken)
        click.echo(f"fits {check_host}: {HOSTS[check_host].note}")
        return
    result = run_publish(path, to_host, remote, branch, progress=not quiet)
    result.pop("stats", None)
    if "command" in result:
        click.echo(result["command"])
    else:
        _print_summary(result)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port, 1 to 65535 (0: any free port)")
def serve(path, host, port):
    """Serve a rendered atlas (DIR or DIR/site) on localhost.

    \b
    Example:
      atlas serve out/smollm2 --port 8000
    """
    from atlas.site.serve import serve as run_serve
    run_serve(path, host=host, port=port)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("query")
@click.option("--limit", default=20, show_default=True, type=int, help="neurons listed (at least 1)")
@click.option("--direction", type=click.Choice(["promotes", "suppresses", "reads"]), default=None,
              help="only matches of this direction (as the search page's filter)")
@click.option("--json", "as_json", is_flag=True, help="print the terms, counts and hits as JSON")
def search(path, query, limit, direction, as_json):
    """Concept search on a rendered atlas (DIR or DIR/site), ranked as its search page ranks.

    \b
    Example:
      atlas search out/smollm2 dog
      atlas search out/smollm2 "new york" --limit 50 --json
      atlas search out/smollm2 money --direction suppresses
    """
    from atlas.site.search_query import format_hits, search as run_search
    result = run_search(path, query, limit, direction)
    if as_json:
        _print_summary(result)
    else:
        click.echo("\n".join(format_hits(result)))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the whole atlas_meta as JSON")
@click.option("--neuron", help="show one neuron instead: LAYER/NEURON, e.g. 13/777 or L13/N777")
def info(out, as_json, neuron):
    """Say what an atlas holds: model, provenance, stages, row counts; or one neuron.

    \b
    Example:
      atlas info out/smollm2
      atlas info out/smollm2 --neuron L13/N777
    """
    from atlas.pipeline import SITE_NAME, store_path
    from atlas.site.render import site_status
    from atlas.stages import STAGES
    from atlas.stages.contract import stale_stages
    from atlas.store import Store
    with Store(store_path(out), read_only=True) as store:
        if neuron is not None:
            _print_neuron(store, neuron, as_json)
            return
        meta = store.all_meta()
        counts = {t: store.count(t) for t in ("neurons", "decoded_tokens", "vocab", "clusters",
                                              "corpus_docs", "exemplars", "attributions")}
        stale = stale_stages(store.con, STAGES)
    site = site_status(Path(out) / SITE_NAME, meta)
    if as_json:
        _print_summary({"meta": meta, "counts": counts, "stale": stale, "site": site})
        return
    model = meta.get("model", {})
    click.echo(f"atlas of {model.get('id', '?')} ({model.get('architecture', '?')}, "
               f"{model.get('n_layers', '?')} layers x {model.get('d_mlp', '?')} neurons)")
    for key in ("weights_hash", "tool_version", "created_at", "hook_point"):
        click.echo(f"  {key}: {meta.get(key)}")
    for key, value in meta.items():
        if key.startswith("stage."):
            name = key[6:]
            why = f"; stale: {stale[name]}, `atlas build` reruns it" if name in stale else ""
            click.echo(f"  stage {name}: {value.get('status')} (fingerprint {value.get('fingerprint')}{why})")
    for table, n in counts.items():
        click.echo(f"  {table}: {n:,} rows")
    click.echo(f"  site: {_site_line(site, out)}")


def _site_line(site: dict, out) -> str:
    state = site["state"]
    if state == "behind":
        return (f"behind the store ({', '.join(site['changed'])} changed since it was rendered); "
                f"`atlas render {out}` or `atlas build` renders it again")
    if state == "current":
        return "rendered from the store's current stages"
    return state + (f": {site['why']}" if site.get("why") else "")


def _print_neuron(store, address: str, as_json: bool) -> None:
    from atlas.address import resolve_neuron
    from atlas.site.text import visible       # labels are corpus-derived: no raw control characters on a terminal
    layer, neuron = resolve_neuron(store.con, address)
    cur = store.con.execute("SELECT * FROM neurons WHERE layer = ? AND neuron = ?", [layer, neuron])
    row = dict(zip([d[0] for d in cur.description], cur.fetchone()))
    tokens = [t for (t,) in store.con.execute(
        "SELECT token FROM decoded_tokens WHERE layer = ? AND neuron = ? AND side = 'out' AND polarity = 'top' "
        "ORDER BY rank LIMIT 10", [layer, neuron]).fetchall()]
    if as_json:
        _print_summary({"neuron": row, "top_out_tokens": tokens, "page": f"neurons/{layer}/{neuron}/"})
        return
    click.echo(f"L{layer}/N{neuron}: {visible(row.get('label')) or '(no label)'}  (page neurons/{layer}/{neuron}/)")
    click.echo(f"  top out tokens: {' · '.join(repr(t) for t in tokens)}")
    for key in ("cluster_id", "normaliser", "act_max", "act_min"):
        if row.get(key) is not None:
            click.echo(f"  {key}: {row[key]}")


def _worker_counts(spec: str) -> list[int]:
    try:
        counts = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise AtlasError(f"--ray {spec!r}: give worker counts such as 1,2")
    return sorted(set(counts))


@main.command()
@click.argument("what", type=click.Choice(["decode", "corpus", "render", "concepts", "all"]), default="decode")
@model_option
@device_option
@dtype_option
@click.option("--shape", type=click.Choice(list(SHAPES)), default=None,
              help="time a randomly initialised model of this shape instead of --model (no weights needed); "
                   "render: the synthetic store's shape (default llama-3.1-8b, 458,752 neurons)")
@click.option("--layers", default=None, type=int,
              help="layers to time: decode spreads them over the model (default 6, 0 for all); with "
                   "--shape the random model is built with only this many (default: all on a GPU, 2 on a CPU); "
                   "render: layers of the synthetic store")
@click.option("--repeats", default=3, show_default=True, type=int, help="decode: timed repeats; the fastest counts")
@click.option("--batches", default=32, show_default=True, type=int,
              help="corpus: batches of 16 x 128 tokens timed (32 = the default build's whole pass)")
@click.option("--neurons", default=0, type=int, help="render: neurons per layer, for a quick run (default: from the shape)")
@click.option("--decode-neurons", default=0, type=int,
              help="decode: time only the first N neurons of each side of each layer, for a quick run "
                   "(the whole-model estimate scales up; default: all)")
@click.option("--store", type=click.Path(path_type=Path),
              help="render: synthetic store to reuse, or to create and keep at this path; "
                   "concepts: the atlas.duckdb to judge (required)")
@click.option("--ray", "ray_workers", default="",
              help="corpus: run the pass on Ray with each of these worker counts (one thread or GPU each), "
                   "e.g. 1,2, and print the scaling efficiency")
@click.option("--wordnet", default="/usr/share/wordnet", show_default=True,
              help="concepts: folder of WordNet 3.0's files (Debian's wordnet-base), the benchmark's judge")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="also write the results here")
def bench(what, model, device, dtype, shape, layers, repeats, batches, neurons, decode_neurons, store, ray_workers,
          wordnet, json_path):
    """Time stages against their lower bounds measured in the same run.

    \b
    Example:
      atlas bench decode
      atlas bench all --json bench.json
      atlas bench all --shape llama-3.1-8b          # on a GPU: the whole 8B shape
      atlas bench decode --shape llama-3.1-8b --layers 2
      atlas bench render                            # 458,752 neuron pages
      atlas bench render --layers 2 --neurons 2048
      atlas bench corpus --ray 1,2                  # Ray workers of one thread: tokens/s and scaling
      atlas bench concepts --store out/atlas.duckdb  # concept search P/R@20, cluster coherence
    """
    if what == "concepts":
        from atlas.bench import concepts
        if store is None:
            raise AtlasError("atlas bench concepts needs --store (the atlas.duckdb to judge)")
        result = concepts.run(str(store), wordnet)
        click.echo(concepts.report(result))
        if json_path:
            from atlas.files import write_json_atomic
            write_json_atomic(json_path, result)
        return
    from atlas.bench import stages as b
    from atlas.model.load import pick_device
    results = {}
    if what in ("render", "all"):
        from atlas.bench.render import bench_render, print_render_table
        _, n_layers, _, d_mlp, *_ = SHAPES[shape or "llama-3.1-8b"]
        results["render"] = bench_render(f"{n_layers}x{d_mlp}", layers or 0, neurons, store)
        print_render_table(results["render"])
    if shape and layers is None:
        layers = 0 if pick_device(device).type == "cuda" else 2
    if what in ("decode", "all"):
        if results:
            click.echo()
        dec_layers = 6 if layers is None else layers
        if decode_neurons < 0:
            raise AtlasError(f"--decode-neurons must be 0 (all) or more, not {decode_neurons}")
        results["decode"] = b.bench_decode(model, device, dtype, dec_layers, repeats, shape=shape,
                                           neurons=decode_neurons or None)
        b.print_table(results["decode"])
    if ray_workers:
        counts = _worker_counts(ray_workers)
        if what != "corpus" or shape:
            raise AtlasError("--ray times the corpus pass of a model: use `atlas bench corpus --ray 1,2`")
        from atlas.bench.scaling import bench_corpus_ray, print_scaling_table
        results["corpus"] = bench_corpus_ray(counts, model, device, dtype, batches=batches, repeats=repeats)
        print_scaling_table(results["corpus"])
    elif what in ("corpus", "all"):
        if results:
            click.echo()
        results["corpus"] = b.bench_corpus(model, device, dtype, batches=batches, shape=shape, layers=layers)
        b.print_corpus_table(results["corpus"])
    if json_path:
        from atlas.files import write_json_atomic
        write_json_atomic(json_path, results if what == "all" else results[what])


if __name__ == "__main__":
    main()
