"""The steps of `scripts/gpu-check` that need torch and atlas, each run in a process of its own.

    python scripts/gpu_steps.py tokenizer DEST [--from DIR]
    python scripts/gpu_steps.py random-model DEST --shape llama-3.2-1b --tokenizer DIR
    python scripts/gpu_steps.py build OUT --model PATH --json FILE [--max-tokens N] [--clamp-budget N]
    python scripts/gpu_steps.py build OUT --random-shape SHAPE --tokenizer DIR [--tokenizer-from DIR] --json FILE

With --random-shape, `build` first saves a random model of that shape (and the tokenizer,
when DIR does not hold one yet) in the same process, to spare a start of torch.

`build` runs the stages of `atlas build` one at a time through the Python API, so that each
stage's wall time and GPU memory peak can be read; the results are those of `atlas build`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def tokenizer(dest: Path, source: Path | None) -> str:
    """The bundle's SmolLM2 tokenizer when there is one; else a byte-level BPE trained here, in a second."""
    if source is not None and (source / "tokenizer.json").is_file():
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return f"copied from {source}"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from atlas.stages.corpus import read_default
    text, size = [], 0
    for _, doc in read_default():
        text.append(doc)
        size += len(doc)
        if size > 400_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(dest)
    return "trained here: byte-level BPE of 1,024 tokens on the default corpus"


def random_model(dest: Path, shape: str, tok_dir: Path, layers: int | None) -> dict:
    from transformers import AutoTokenizer
    from atlas.model.shapes import save_random_model
    spec = tuple(json.loads(shape)) if shape.startswith("[") else shape
    tok = AutoTokenizer.from_pretrained(tok_dir)
    start = time.perf_counter()
    save_random_model(spec, dest, tok, n_layers=layers)
    params = sum(p.stat().st_size for p in dest.glob("*.safetensors"))
    return {"shape": spec, "tokenizer_tokens": len(tok), "weights_bytes": params,
            "seconds": round(time.perf_counter() - start, 1)}


def build(out: Path, model: str, device: str, max_tokens: int, context: int, clamp_budget: int,
          attribution_rows: int, save=lambda result: None, label_examples: int = -1,
          label_translations: int = -1, skip: tuple[str, ...] = ()) -> dict:
    """Every stage in order; ``save`` gets the figures so far after each one, so a killed build keeps them.

    The labels stage runs last, after render (``atlas build`` runs it before): the model's
    examples and readings it times are the newest work, and a build that runs out of time there
    has kept every other stage's figures."""
    import torch
    from atlas.config import ClampConfig, ClusterConfig, DecodeConfig, ExemplarConfig, LabelsConfig, RenderConfig
    from atlas.pipeline import Build
    from atlas.stages.exemplars import check_corpus
    cuda = torch.cuda.is_available() and device.startswith("cuda")
    ex = ExemplarConfig(max_tokens=max_tokens, context=context, attribution_rows=attribution_rows)
    cfgs = {"decode": DecodeConfig(), "exemplars": ex, "cluster": ClusterConfig(),
            "clamp": ClampConfig(clamp_budget=clamp_budget), "render": RenderConfig(),
            "labels": LabelsConfig(label_examples=label_examples, label_translations=label_translations)}
    cfgs = {name: cfg for name, cfg in cfgs.items() if name not in skip}
    for cfg in cfgs.values():
        cfg.validate()
    check_corpus(ex)
    result = {"model": model, "device": device, "stages": {}}
    start = time.perf_counter()
    b = Build(out, model, device, progress=False, force=True)
    load = time.perf_counter()
    _ = b.lm
    result["load_s"] = round(time.perf_counter() - load, 2)
    result["model_described"] = {k: v for k, v in b.lm.describe().items() if k != "config"}
    for name, cfg in cfgs.items():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = getattr(b, name)(cfg)
        if cuda:
            torch.cuda.synchronize()
        entry = {"wall_s": round(time.perf_counter() - t, 2), "result": r}
        if cuda:
            entry["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["stages"][name] = entry
        save(result)
        print(f"{name}: {entry['wall_s']} s", flush=True)
    result["total_s"] = round(time.perf_counter() - start, 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer")
    t.add_argument("dest", type=Path)
    t.add_argument("--from", dest="source", type=Path)
    m = sub.add_parser("random-model")
    m.add_argument("dest", type=Path)
    m.add_argument("--shape", required=True, help="a SHAPES name, or a JSON list laid out like one")
    m.add_argument("--tokenizer", type=Path, required=True)
    m.add_argument("--layers", type=int)
    m.add_argument("--tokenizer-from", type=Path, help="a saved tokenizer to copy when --tokenizer has none")
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--model")
    b.add_argument("--random-shape", help="save a random model of this shape first and build from it")
    b.add_argument("--tokenizer", type=Path, help="with --random-shape: the tokenizer folder (made if missing)")
    b.add_argument("--tokenizer-from", type=Path, help="a saved tokenizer to copy instead of training one")
    b.add_argument("--device", default="auto")
    b.add_argument("--json", type=Path, required=True)
    b.add_argument("--max-tokens", type=int, default=65536)
    b.add_argument("--context", type=int, default=128)
    b.add_argument("--clamp-budget", type=int, default=-1)
    b.add_argument("--attribution-rows", type=int, default=64)
    b.add_argument("--label-examples", type=int, default=-1)
    b.add_argument("--label-translations", type=int, default=-1)
    b.add_argument("--skip", action="append", default=[], choices=["render"],
                   help="leave this stage out (the check's default build: render is timed elsewhere)")
    a = ap.parse_args()
    if a.cmd == "tokenizer":
        print(json.dumps({"tokenizer": tokenizer(a.dest, a.source)}))
    elif a.cmd == "random-model":
        made = {}
        if not (a.tokenizer / "tokenizer.json").is_file():
            made["tokenizer"] = tokenizer(a.tokenizer, a.tokenizer_from)
        print(json.dumps({**made, **random_model(a.dest, a.shape, a.tokenizer, a.layers)}))
    else:
        made = {}
        if a.random_shape:
            if not (a.tokenizer / "tokenizer.json").is_file():
                made["tokenizer"] = tokenizer(a.tokenizer, a.tokenizer_from)
            a.model = str(a.out.parent / f"{a.out.name}-model")
            made["random_model"] = random_model(Path(a.model), a.random_shape, a.tokenizer, None)
            print(json.dumps(made), flush=True)
        def save(r: dict) -> None:
            tmp = a.json.with_suffix(".partial")
            tmp.write_text(json.dumps({**made, **r}, indent=2, default=str))
            tmp.replace(a.json)
        save(build(a.out, a.model, a.device, a.max_tokens, a.context, a.clamp_budget, a.attribution_rows, save,
                   a.label_examples, a.label_translations, tuple(a.skip)))


if __name__ == "__main__":
    main()
