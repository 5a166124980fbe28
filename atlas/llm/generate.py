"""Chat answers from a transformers model in this process, a batch of conversations at a time.

What both local backends share: the in-process explainer (``--explainer-url local``) and
the server (``atlas serve-model``), which batches the requests that arrive together.
"""

from __future__ import annotations

import threading

import torch

from atlas.llm.client import Answer
from atlas.llm.judge import NO, YES
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

    def _batch(self, conversations: list[list[dict]], max_tokens: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """The prompts' ids, and them left-padded into one batch with its attention mask (both [B, width])."""
        prompts = [self.prompt_ids(m, max_tokens) for m in conversations]
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return prompts, ids.to(self.lm.device), mask.to(self.lm.device)

    def _top(self, logprobs: torch.Tensor, k: int) -> list[list[dict]]:
        """Each row's ``k`` likeliest tokens as OpenAI's ``top_logprobs`` entries: [B, V] -> B lists."""
        values, index = logprobs.float().topk(k, dim=-1)
        decode = self.lm.tokenizer.decode
        return [[{"token": decode([i]), "logprob": v} for v, i in zip(vs, ix)]
                for vs, ix in zip(values.tolist(), index.tolist())]

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]], max_tokens: int, seed: int = 0,
                 top_logprobs: int = 0) -> list[Answer]:
        """One answer per conversation, generated as one left-padded batch; with ``top_logprobs`` each answer
        token comes with its log-probability and its ``top_logprobs`` likeliest alternatives (``Answer.tokens``)."""
        if not conversations:
            return []
        prompts, ids, mask = self._batch(conversations, max_tokens)
        width = ids.shape[1]
        with self.lock:
            torch.manual_seed(seed)
            out = self.lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                         do_sample=False, pad_token_id=self.pad, eos_token_id=self.eos,
                                         return_dict_in_generate=True, output_logits=bool(top_logprobs))
        steps = []          # per answer token: (chosen logprob [B], alternatives: B lists)
        if top_logprobs:
            for t, logits in enumerate(out.logits):                                    # logits: [B, V]
                logp = torch.log_softmax(logits.float(), dim=-1)
                chosen = logp.gather(1, out.sequences[:, width + t, None].to(logp.device))[:, 0]
                steps.append((chosen.tolist(), self._top(logp, top_logprobs)))
        answers = []
        decode = self.lm.tokenizer.decode
        for b, (row, p) in enumerate(zip(out.sequences[:, width:].tolist(), prompts)):
            if self.eos is not None and self.eos in row:
                row = row[:row.index(self.eos)]
            tokens = [{"token": decode([tok]), "logprob": steps[t][0][b], "top_logprobs": steps[t][1][b]}
                      for t, tok in enumerate(row)] if top_logprobs else None
            answers.append(Answer(decode(row, skip_special_tokens=True).strip(), len(p), len(row), tokens))
        return answers

    @torch.no_grad()
    def first_tokens(self, conversations: list[list[dict]], words: tuple[str, ...] = YES + NO) -> list[Answer]:
        """The answer's first token without generating: one forward pass over the batch.

        ``Answer.tokens[0]["top_logprobs"]`` holds the exact log-probability of every word in
        ``words`` that is one token for this tokenizer, read from the full distribution (an
        endpoint gives its top 20 only).
        """
        if not conversations:
            return []
        vocab, unk = {}, self.lm.tokenizer.unk_token_id
        for w in words:
            ids = self.lm.tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] != unk and ids[0] not in vocab.values():
                vocab[w] = ids[0]
        prompts, ids, mask = self._batch(conversations, 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)        # left padding: each prompt starts at position 0
        with self.lock:
            logits = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                   logits_to_keep=1).logits[:, -1]                      # [B, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        best = logp.argmax(-1).tolist()
        picked = logp[:, list(vocab.values())].tolist() if vocab else [[] for _ in prompts]
        decode = self.lm.tokenizer.decode
        return [Answer(decode([b]), len(p), 1,
                       [{"token": decode([b]), "logprob": float(row.max()),
                         "top_logprobs": [{"token": w, "logprob": lp} for w, lp in zip(vocab, lps)]}])
                for b, p, row, lps in zip(best, prompts, logp, picked)]


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

    def first_tokens(self, conversations: list[list[dict]], seed: int = 0) -> list[Answer]:
        return self.gen.first_tokens(conversations)
