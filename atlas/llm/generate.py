"""Chat answers from a transformers model in this process, a batch of conversations at a time.

What both local backends share: the in-process explainer (``--explainer-url local``) and
the server (``atlas serve-model``), which batches the requests that arrive together.
"""

from __future__ import annotations

import threading

import torch

from atlas.llm.client import Answer
from atlas.model.load import LoadedModel, load_model


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The conversation as the model reads it: its chat template, or plain ``role: text`` lines without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


class Generator:
    """Greedy answers from one loaded model; one batch runs at a time (a lock guards the model)."""

    def __init__(self, lm: LoadedModel, name: str | None = None):
        self.lm = lm
        self.name = name or lm.model_id
        self.lock = threading.Lock()
        tok = lm.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eos = tok.eos_token_id
        # A model with learned positions reads at most that many tokens: keep the prompt's end.
        self.positions = lm.limits()["positions"]

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: str = "auto") -> "Generator":
        return cls(load_model(spec, device, dtype))

    def prompt_ids(self, messages: list[dict], max_tokens: int) -> list[int]:
        ids = self.lm.tokenizer(prompt_text(self.lm.tokenizer, messages), add_special_tokens=False)["input_ids"]
        if self.positions is not None:
            ids = ids[-max(self.positions - max_tokens, 1):]
        return ids or [self.pad]

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.prompt_ids(messages, 0))

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], max_tokens: int, seed: int = 0) -> list[Answer]:
        """One answer per conversation, generated as one left-padded batch."""
        if not conversations:
            return []
        prompts = [self.prompt_ids(m, max_tokens) for m in conversations]
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])        # [B, width]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with self.lock:
            torch.manual_seed(seed)
            out = self.lm.model.generate(input_ids=ids.to(self.lm.device), attention_mask=mask.to(self.lm.device),
                                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.pad,
                                         eos_token_id=self.eos)
        answers = []
        for row, p in zip(out[:, width:].tolist(), prompts):
            if self.eos is not None and self.eos in row:
                row = row[:row.index(self.eos)]
            text = self.lm.tokenizer.decode(row, skip_special_tokens=True)
            answers.append(Answer(text.strip(), len(p), len(row)))
        return answers


class LocalClient:
    """The in-process explainer: ``chat`` like ``ChatClient``'s, and ``chat_many`` for a whole batch."""

    def __init__(self, generator: Generator):
        self.gen = generator
        self.retried = 0

    @property
    def name(self) -> str:
        return self.gen.name

    def chat(self, messages: list[dict], max_tokens: int, seed: int = 0) -> Answer:
        return self.gen.generate([messages], max_tokens, seed)[0]

    def chat_many(self, conversations: list[list[dict]], max_tokens: int, seed: int = 0) -> list[Answer]:
        return self.gen.generate(conversations, max_tokens, seed)
