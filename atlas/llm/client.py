"""A client of OpenAI-compatible chat endpoints (``POST {url}/chat/completions``), stdlib only.

vLLM, llama.cpp's server, Ollama, hosted APIs and ``atlas serve-model`` all answer this
one request shape. The client sends conversations concurrently (at most ``concurrency``
at a time: the server batches what arrives together), retries what can succeed later
(429 rate limits, 5xx, timeouts, dropped connections) with exponential backoff that
honours ``Retry-After``, and turns what cannot (nothing listening, a model the server does
not serve, a refused key, an answer that is not a chat completion) into an ``LLMError``
whose message is one line. The API key is read from the environment variable named by
``key_env`` (``ATLAS_API_KEY`` by default) and sent as a bearer token when it is set.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from atlas.errors import AtlasError

KEY_ENV = "ATLAS_API_KEY"


class LLMError(AtlasError):
    """An endpoint failed in a way a retry cannot mend; the message is one line."""


class _Retry(Exception):
    """A failure that may pass: wait ``after`` seconds (None: the backoff's own) and send again."""

    def __init__(self, reason: str, after: float | None = None):
        super().__init__(reason)
        self.after = after


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # With logprobs asked for: per answer token, OpenAI's entry {"token", "logprob", "top_logprobs": [...]}.
    tokens: list[dict] | None = None


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ChatClient:
    """One endpoint and model; ``chat`` sends a conversation, retrying what may pass."""

    def __init__(self, url: str, model: str, timeout: float = 60.0, retries: int = 4, key_env: str = KEY_ENV,
                 backoff: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.url = url.rstrip("/")
        self.model = model
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.key = os.environ.get(key_env) or None
        self.sleep = sleep              # injected so that a test can count the waits instead of sleeping them
        self.retried = 0                # requests sent again, over the client's life

    @property
    def name(self) -> str:
        """How the answers are attributed: the model as the endpoint names it."""
        return self.model

    def chat(self, messages: list[dict], max_tokens: int, seed: int = 0, top_logprobs: int = 0) -> Answer:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0, "seed": seed}
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._parse(self._post("/chat/completions", body), top_logprobs > 0)
            except _Retry as e:
                last = str(e)
                if attempt == self.retries:
                    break
                self.retried += 1
                self.sleep(e.after if e.after is not None else self.backoff * 2 ** attempt)
        raise LLMError(f"{self.url} kept failing after {self.retries + 1} tries ({last}); "
                       "answers already stored are kept: rerun to resume")

    def first_tokens(self, conversations: list[list[dict]], seed: int = 0) -> list[Answer]:
        """Each conversation's one-token answer with its 20 likeliest alternatives (``Answer.tokens[0]``)."""
        return [self.chat(m, 1, seed, top_logprobs=20) for m in conversations]

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except (socket.timeout, TimeoutError):
            raise _Retry(f"no answer within {self.timeout:g} s") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Retry(f"no answer within {self.timeout:g} s") from None
            if isinstance(reason, (ConnectionRefusedError, socket.gaierror)) or "refused" in str(reason):
                raise LLMError(f"cannot reach {self.url} ({_one_line(getattr(reason, 'strerror', None) or reason)}); "
                               "is the server running? (--explainer-url)") from None
            raise _Retry(_one_line(reason)) from None
        except (ConnectionError, OSError) as e:       # reset or closed mid-answer: the server may be restarting
            raise _Retry(_one_line(e)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise LLMError(f"{self.url} answered with something that is not JSON ({_one_line(raw[:120])!r}); "
                           "is it an OpenAI-compatible /v1 endpoint?") from None

    def _http_error(self, e: urllib.error.HTTPError) -> Exception:
        try:
            detail = json.loads(e.read() or b"{}")
            detail = detail.get("error", detail) if isinstance(detail, dict) else detail
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except (ValueError, OSError):
            detail = e.reason
        detail = _one_line(detail)
        if e.code == 429:
            after = e.headers.get("Retry-After")
            try:
                wait = float(after) if after is not None else None
            except ValueError:
                wait = None
            return _Retry(f"rate limited: {detail}", wait)
        if e.code >= 500 or e.code == 408:
            return _Retry(f"HTTP {e.code}: {detail}")
        if e.code in (401, 403):
            return LLMError(f"{self.url} refused the key (HTTP {e.code}: {detail}); set {KEY_ENV} "
                            "(or the variable --api-key-env names)")
        if e.code == 404 and "model" in detail.lower():
            return LLMError(f"{self.url} does not serve the model {self.model!r} ({detail})")
        if e.code == 404:
            return LLMError(f"{self.url}/chat/completions does not exist (HTTP 404); give the base URL "
                            "that ends in /v1")
        return LLMError(f"{self.url} refused the request (HTTP {e.code}: {detail})")

    def _parse(self, data: dict, logprobs: bool = False) -> Answer:
        try:
            text = data["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError) as e:
            raise LLMError(f"{self.url} gave a malformed chat completion (no choices[0].message.content: "
                           f"{_one_line(e)}); answers already stored are kept") from None
        usage = data.get("usage") or {}
        tokens = None
        if logprobs:
            tokens = (data["choices"][0].get("logprobs") or {}).get("content")
            if not (isinstance(tokens, list) and tokens and isinstance(tokens[0], dict)
                    and isinstance(tokens[0].get("top_logprobs"), list)):
                raise LLMError(f"{self.url} gave no logprobs for {self.model!r}, which --score-method logprob "
                               "reads; use --score-method list with this endpoint")
        return Answer(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), tokens)
