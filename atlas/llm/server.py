"""``atlas serve-model``: a transformers model behind the OpenAI chat API, on the standard library's HTTP server.

``POST /v1/chat/completions`` answers a conversation (greedy, ``max_tokens`` new tokens at
most; with ``logprobs: true`` each answer token carries its log-probability and its
``top_logprobs`` (at most 20) likeliest alternatives, in OpenAI's format), ``GET /v1/models`` names the one model served, ``GET /stats`` counts requests and
batches. Requests that arrive together are answered as one batch: each handler thread
queues its conversation and waits, and one worker thread takes up to ``batch`` queued
conversations (waiting ``gather_s`` for more after the first) through one ``generate``.
``rate_limit`` (requests a second, 0: none) answers the excess with 429 and ``Retry-After``,
as hosted APIs do; it protects a shared server, and it is how the tests meet a real 429.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from atlas.llm.generate import Generator

MAX_BODY = 1 << 20          # bytes of one request body


class Batcher:
    """The worker thread that turns queued conversations into batched ``generate`` calls."""

    def __init__(self, gen: Generator, batch: int = 8, gather_s: float = 0.02):
        self.gen, self.batch, self.gather_s = gen, batch, gather_s
        self.queue: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "rate_limited": 0}
        threading.Thread(target=self._work, daemon=True, name="atlas-batcher").start()

    def submit(self, messages: list[dict], max_tokens: int, seed: int, top_logprobs: int = 0) -> Future:
        fut: Future = Future()
        self.queue.put((messages, (max_tokens, seed, top_logprobs), fut))
        return fut

    def _work(self) -> None:
        while True:
            items = [self.queue.get()]
            deadline = time.monotonic() + self.gather_s
            while len(items) < self.batch:
                try:
                    items.append(self.queue.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            # One generate per (max_tokens, seed, top_logprobs): a batch shares its settings.
            groups: dict[tuple[int, int, int], list] = {}
            for item in items:
                groups.setdefault(item[1], []).append(item)
            for settings, group in groups.items():
                try:
                    answers = self.gen.generate([g[0] for g in group], *settings)
                except Exception as e:      # a bad conversation fails its batch, never the server
                    for g in group:
                        g[2].set_exception(e)
                    continue
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
                for g, answer in zip(group, answers):
                    g[2].set_result(answer)


class RateLimit:
    """A token bucket of ``rate`` requests a second (burst: one second's worth)."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.at = rate, max(rate, 1.0), time.monotonic()
        self.lock = threading.Lock()

    def wait_needed(self) -> float:
        """0 if the request may go now (and takes its token), else the seconds until one would."""
        if self.rate <= 0:
            return 0.0
        with self.lock:
            now = time.monotonic()
            self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


def _with_bytes(entry: dict) -> dict:
    """An OpenAI logprobs entry with the ``bytes`` of each token (UTF-8), as the API gives them."""
    out = {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode())}
    if "top_logprobs" in entry:
        out["top_logprobs"] = [_with_bytes(t) for t in entry["top_logprobs"]]
    return out


def make_server(gen: Generator, host: str = "127.0.0.1", port: int = 0, batch: int = 8,
                rate_limit: float = 0.0, max_tokens_cap: int = 512) -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``) answering for ``gen`` under the name ``gen.name``."""
    batcher = Batcher(gen, batch)
    limit = RateLimit(rate_limit)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):      # quiet: a busy server would flood the terminal
            pass

        def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str, kind: str, headers: dict | None = None) -> None:
            self._send(code, {"error": {"message": message, "type": kind, "code": code}}, headers)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": gen.name, "object": "model", "owned_by": "atlas"}]})
            elif self.path.rstrip("/") == "/stats":
                self._send(200, batcher.stats)
            else:
                self._error(404, f"no such path {self.path!r}", "not_found")

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.rfile.read(min(length, MAX_BODY))
                return self._error(404, f"no such path {self.path!r}", "not_found")
            if length > MAX_BODY:
                self.close_connection = True
                return self._error(413, f"request body over {MAX_BODY} bytes", "invalid_request_error")
            try:
                body = json.loads(self.rfile.read(length))
                messages = body["messages"]
                if not isinstance(messages, list) or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                    raise TypeError("messages must be a list of {role, content} objects")
                max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
                seed = int(body.get("seed") or 0)
                top = min(max(int(body.get("top_logprobs") or 0), 1), 20) if body.get("logprobs") else 0
            except (ValueError, KeyError, TypeError) as e:
                return self._error(400, f"bad request: {e}", "invalid_request_error")
            if body.get("model") not in (None, gen.name):
                return self._error(404, f"The model `{body.get('model')}` does not exist; this server serves "
                                        f"`{gen.name}`", "model_not_found")
            wait = limit.wait_needed()
            if wait:
                batcher.stats["rate_limited"] += 1
                return self._error(429, f"rate limit of {rate_limit:g} requests/s reached", "rate_limit_exceeded",
                                   {"Retry-After": f"{wait:.3f}"})
            batcher.stats["requests"] += 1
            try:
                answer = batcher.submit(messages, min(max(max_tokens, 1), max_tokens_cap), seed, top).result()
            except Exception as e:
                return self._error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                      "finish_reason": "length" if answer.completion_tokens >= max_tokens else "stop"}
            if top:
                choice["logprobs"] = {"content": [_with_bytes(t) for t in answer.tokens or []]}
            self._send(200, {
                "id": f"chatcmpl-{batcher.stats['requests']}", "object": "chat.completion", "created": int(time.time()),
                "model": gen.name, "choices": [choice],
                "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                          "total_tokens": answer.prompt_tokens + answer.completion_tokens}})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
