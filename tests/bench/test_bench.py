"""`atlas bench`: random models of known shapes and the stage benchmarks, run for real (small)."""

import json

import pytest
import torch
from click.testing import CliRunner

from atlas.cli import main
from atlas.config import SHAPES
from atlas.model.shapes import random_model, shape_config


@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_configs_match_the_published_sizes(name):
    kind, layers, d_model, d_mlp, *_ = SHAPES[name]
    cfg = shape_config(name)
    assert cfg.model_type == kind
    assert getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)) == layers
    assert getattr(cfg, "intermediate_size", getattr(cfg, "n_inner", None)) == d_mlp
    assert shape_config(name, 1).to_dict().get("num_hidden_layers", shape_config(name, 1).to_dict().get("n_layer")) == 1


def test_random_model_runs_like_one_built_the_usual_way():
    """Meta-device construction must not leave rotary frequencies (or masks) uninitialised."""
    from transformers import AutoModelForCausalLM
    lm = random_model("smollm2-135m", "cpu", "float32", n_layers=1)
    ref = AutoModelForCausalLM.from_config(shape_config("smollm2-135m", 1))
    for (name, got), (_, want) in zip(lm.model.named_buffers(), ref.named_buffers()):
        assert torch.equal(got, want), name
    assert lm.adapter.d_mlp(lm.model) == 1536 and lm.adapter.n_layers(lm.model) == 1
    ids = torch.randint(0, 49152, (2, 8))
    assert lm.model(input_ids=ids).logits.isfinite().all()
    again = random_model("smollm2-135m", "cpu", "float32", n_layers=1)
    assert torch.equal(next(again.model.parameters()), next(lm.model.parameters()))   # seeded


def test_bench_all_on_a_random_shape_prints_and_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    # 256 neurons a side (decode) and 256 pages (render) keep the run short; the estimate still
    # scales to every direction of the real shape.
    r = CliRunner().invoke(main, ["bench", "all", "--shape", "smollm2-135m", "--layers", "1", "--batches", "1",
                                  "--repeats", "1", "--decode-neurons", "256", "--neurons", "256",
                                  "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "ratio" in r.output and "throughput ratio" in r.output
    got = json.loads(out.read_text())
    dec, cor = got["decode"], got["corpus"]
    assert dec["directions_timed"] == 3 * 256 and dec["ratio"] > 0 and dec["peak_rss_mb"] > 0
    # The estimate is for every direction of the real 30-layer shape, not the ones timed.
    assert dec["full_model_estimate_s"] == pytest.approx(dec["decode_s"] * 30 * 1536 / 256, rel=1e-6)
    assert got["render"]["neurons"] == 256
    assert cor["tokens"] == 16 * 128 and 0 < cor["ratio"] and cor["state_mb"] > 0


def test_unknown_shape_is_a_one_line_error():
    r = CliRunner().invoke(main, ["bench", "decode", "--shape", "gpt-9"])
    assert r.exit_code == 2 and "gpt-9" in r.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_matches_the_cpu_in_bfloat16():
    """The GPU path (bf16, device top-k, pinned copies) gives the same top tokens as float32 on the CPU."""
    from atlas.stages.decode_kernel import Unembedding, decode_directions
    gpu = random_model("smollm2-135m", "cuda", "bfloat16", n_layers=1)
    a, m = gpu.adapter, gpu.model
    V = a.direction(m, 0, "out")[:64]
    U = Unembedding.build(a.W_U(m), a.final_gain(m), "cuda", torch.bfloat16)
    got = decode_directions(V, U, 5, 5, 16)
    Uc = Unembedding.build(a.W_U(m).float().cpu(), a.final_gain(m).float().cpu(), "cpu", torch.float32)
    want = decode_directions(V.float().cpu(), Uc, 5, 5, 16)
    assert (got.top_ids[:, 0] == want.top_ids[:, 0]).float().mean() > 0.9


def test_negative_decode_neurons_is_a_one_line_error():
    r = CliRunner().invoke(main, ["bench", "decode", "--shape", "smollm2-135m", "--decode-neurons", "-1"])
    assert r.exit_code != 0 and "--decode-neurons" in r.output and "Traceback" not in r.output


def test_the_concept_benchmarks_other_languages_ask_its_own_categories():
    """Each foreign query is judged by an English query of the benchmark: a typo there would judge nothing."""
    from atlas.bench.concepts import categories, other_languages
    queries = {q for cats in categories().values() for q, _, _ in cats}
    rows = other_languages()
    assert len(rows) >= 20 and len({w for w, _, _ in rows}) == len(rows)
    assert {lang for _, lang, _ in rows} == {"fr", "es", "de", "it"}
    assert {q for _, _, q in rows} <= queries


def test_the_concept_benchmark_says_which_foreign_queries_the_model_read_as_english():
    from atlas.bench.concepts import OTHER, report

    scored = {"precision": 0.1, "recall": 0.5}
    rows = [{"part": "tune", "query": "animal", "judged": 8, "before": scored, "after": scored},
            {"part": OTHER, "query": "ciudad", "lang": "es", "category": "city", "judged": 5, "whole_word": False,
             "read_as": "city", "before": scored, "after": scored},
            {"part": OTHER, "query": "tier", "lang": "de", "category": "animal", "judged": 8, "whole_word": True,
             "read_as": None, "before": scored, "after": scored}]
    summary = {"tune": {"queries": 1, "precision_before": 0.1, "recall_before": 0.5, "precision_after": 0.1,
                        "recall_after": 0.5}}
    either = {"tune": {"queries": 3, "precision_before": 0.05, "recall_before": 0.25, "precision_after": 0.4,
                       "recall_after": 0.75}}
    text = report({"rows": rows, "summary": summary, "summary_either": either, "coherence": {}, "translations": 1234})
    assert "those it fires on" in text and "| tune | 3 | 0.05 | 0.25 | 0.40 | 0.75 |" in text
    assert "| ciudad (es, city; not a word-vector word; read as city) |" in text
    assert "| tier (de, animal) |" in text
    assert text.endswith("other languages: 1 of 2 queries read by the model as an English word (1,234 readings in the "
                         "index, from the labels stage's concept_translations)")
