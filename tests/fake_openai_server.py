"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for failure paths a real server shows only
under load or misconfiguration (429, 503, a 400 naming a field).

Requests go through real sockets, the ``openai`` SDK and :class:`OpenAIBackend` exactly as they would
against ``vllm serve``; only the answers are scripted. ``behaviour`` may be swapped while the server
runs, which is how a test makes the server "recover" between two runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, Any]]
#: a reply with extra response headers, e.g. ``Retry-After`` (a behaviour may return either shape)
ReplyWithHeaders = tuple[int, dict[str, Any], dict[str, str]]
Behaviour = Callable[[str, dict[str, Any]], Reply | ReplyWithHeaders]


def token_logprob(token_id: int) -> float:
    """A fixed, token-dependent log-probability, so different texts score differently."""
    return -((token_id % 13) + 1) / 10


def ok(path: str, body: dict[str, Any]) -> Reply:
    """What a healthy server answers: echoed prompt logprobs for scoring, a rating for chat."""
    if path.endswith("/completions") and "/chat/" not in path:
        ids = body["prompt"]
        logprobs = [None] + [token_logprob(t) for t in ids[1:]]
        choice = {
            "index": 0,
            "text": "x",
            "finish_reason": "length",
            "logprobs": {
                "tokens": [str(t) for t in ids],
                "token_logprobs": logprobs,
                "top_logprobs": None,
                "text_offset": list(range(len(ids))),
            },
        }
        usage = {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
        return 200, _completion("text_completion", [choice], usage)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "Rating: 4\nRationale: scripted."},
        "finish_reason": "stop",
    }
    usage = {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
    return 200, _completion("chat.completion", [choice], usage)


def reasoning_reply(
    reasoning: str,
    content: str | None,
    field: str = "reasoning_content",
    finish_reason: str = "stop",
) -> Behaviour:
    """A reasoning model's chat answer, its reasoning apart from its content as vLLM's reasoning
    parsers and DeepSeek send it (``field="reasoning"``: OpenRouter's and newer vLLM's name;
    ``content`` None: cut while still reasoning). Other paths answer as :func:`ok`."""

    def behaviour(path: str, body: dict[str, Any]) -> Reply:
        if not path.endswith("/chat/completions"):
            return ok(path, body)
        message = {"role": "assistant", "content": content, field: reasoning}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason}
        usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
        return 200, _completion("chat.completion", [choice], usage)

    return behaviour


def error(status: int, message: str, param: str | None = None, code: Any = None) -> Reply:
    """An error body in the shape OpenAI and vLLM send: ``{"error": {message, type, param, code}}``."""
    return status, {
        "error": {"message": message, "type": "Error", "param": param, "code": code or status}
    }


def with_headers(reply: Reply, **headers: str) -> ReplyWithHeaders:
    """``reply`` sent with extra headers; ``retry_after_ms="500"`` becomes ``retry-after-ms: 500``."""
    return reply[0], reply[1], {k.replace("_", "-"): v for k, v in headers.items()}


def chat_reply(
    texts: list[str],
    prompt_tokens: int = 10,
    cached_tokens: int | None = None,
    completion_tokens: int | None = None,
    usage: bool = True,
) -> Reply:
    """A chat completion with one choice per text, in order. Its ``usage`` says ``prompt_tokens``,
    ``completion_tokens`` (unset: one per text) and, when ``cached_tokens`` is given, OpenAI's
    ``prompt_tokens_details.cached_tokens`` (those of the prompt read from its cache); ``usage``
    false leaves the field out, as some servers do."""
    choices = [
        {"index": k, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
        for k, t in enumerate(texts)
    ]
    completion = len(texts) if completion_tokens is None else completion_tokens
    counts: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    if cached_tokens is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return 200, _completion("chat.completion", choices, counts if usage else None)


def _completion(obj: str, choices: list, usage: dict | None) -> dict[str, Any]:
    body = {"id": "fake", "object": obj, "created": 0, "model": "fake", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


class FakeServer:
    """``with FakeServer(behaviour) as server:`` serves on ``server.base_url`` until the block ends.

    ``requests`` lists every (path, body) received, failed ones included; ``received`` the
    ``time.monotonic()`` at which each arrived, in the same order. ``models``: what GET /v1/models
    lists (unset: it answers 404, like every other GET); ``gets`` the paths of the GETs received.
    """

    def __init__(
        self, behaviour: Behaviour = ok, models: list[dict[str, Any]] | None = None
    ) -> None:
        self.behaviour = behaviour
        self.models = models
        self.gets: list[str] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.received: list[float] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append((self.path, body))
                    server.received.append(time.monotonic())
                status, reply, *headers = server.behaviour(self.path, body)
                self._send(status, reply, headers[0] if headers else None)

            def do_GET(self) -> None:
                with server._lock:
                    server.gets.append(self.path)
                if self.path == "/v1/models" and server.models is not None:
                    self._send(200, {"object": "list", "data": server.models})
                else:
                    self._send(*error(404, f"no route {self.path}"))

            def _send(
                self, status: int, reply: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request (a sibling failed and it cancelled)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
