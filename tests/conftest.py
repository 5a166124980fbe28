"""Shared fixtures: seeds, and tiny randomly initialised models built from a config, nothing downloaded."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

# Token strings a tokenizer may hold and a page must never run: the site escapes them all.
HOSTILE_TOKENS = ["<script>alert(1)</script>", '" onmouseover="alert(1)', "javascript:alert(1)",
                  "\u202eevil", "<img src=x onerror=alert(1)>", "&amp;", "{{ 7*7 }}"]


# What the fault-injection tests tried (tests/test_faults.py, test_bad_input.py, test_hostile.py,
# and every one-line-error check): printed at the end of the run, quoted in the README.
FAULT_COUNTS: dict[str, set] = {"kill points": set(), "bad inputs": set(), "hostile strings": set()}


def pytest_terminal_summary(terminalreporter):
    if any(FAULT_COUNTS.values()):
        terminalreporter.write_sep("-", "fault injection")
        terminalreporter.write_line(", ".join(f"{len(tried)} {what}" for what, tried in FAULT_COUNTS.items())
                                    + " tried")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox"]


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
    """A word-level tokenizer whose vocabulary includes hostile strings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + HOSTILE_TOKENS + [" dog", "dog", " cat", " Paris"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    """Save a tiny model of an architecture with its tokenizer; returns the directory."""
    def make(arch: str = "llama", vocab: int = 64):
        path = tmp_path_factory.mktemp(f"model-{arch}")
        tiny_model(arch, vocab).save_pretrained(path)
        tiny_tokenizer(vocab).save_pretrained(path)
        return path
    return make
