"""A scripted Anthropic Messages API on 127.0.0.1, enough of it for the official ``anthropic`` SDK.

``POST /v1/messages`` takes ``model``, ``max_tokens``, ``messages``, ``system`` (a string or text
blocks), ``temperature``, ``top_p``, ``stop_sequences`` and ``metadata``; a ``policy`` decides each
answer from the request body. Whatever the policy writes, the server then behaves as the API does
around it: it refuses what the API refuses (no key, a temperature outside 0..1, a pre-filled reply
that ends in whitespace), cuts the text at the first stop sequence or at ``max_tokens`` (a token
here is a whitespace-separated word) with the matching ``stop_reason``, and reports ``usage`` with a
prompt cache: the text up to each ``cache_control`` breakpoint (a block counts a token per four
characters) is written on first sight (``cache_creation_input_tokens``) and read afterwards
(``cache_read_input_tokens``), once the request that wrote it has been answered (``latency``
seconds after it arrived); no minimum length.

Errors come back in the API's shape (``{"type": "error", "error": {"type", "message"}}``) with any
headers the policy adds, such as ``retry-after``. The lifetime (``with ... as server``, the
``requests`` list, swapping ``policy`` while it runs) is :class:`tests.fake_openai_server.FakeServer`'s.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fake_openai_server import FakeServer

#: (HTTP status, JSON body, extra headers)
Reply = tuple[int, dict[str, Any], dict[str, str]]
Policy = Callable[[dict[str, Any]], Reply]

API_KEY = "sk-ant-test"


def text(reply: str) -> Reply:
    """A successful answer whose whole text is ``reply`` (the server cuts it and counts usage)."""
    return 200, {"content": [{"type": "text", "text": reply}], "stop_reason": "end_turn"}, {}


def failure(status: int, kind: str, message: str, **headers: str) -> Reply:
    """An error in the API's shape: ``failure(429, "rate_limit_error", "slow down",
    **{"retry-after": "1"})``."""
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return status, body, headers


def last_text(body: dict[str, Any], role: str = "user") -> str:
    """The text of the last message of ``role`` (string or text blocks)."""
    for m in reversed(body["messages"]):
        if m["role"] == role:
            return _joined(m["content"])
    return ""


def echo(body: dict[str, Any]) -> Reply:
    """The default policy: continues a pre-filled reply with " continued.", else repeats the
    user's last message."""
    if body["messages"][-1]["role"] == "assistant":
        return text(" continued.")
    return text(f"You said: {last_text(body)}")


class FakeAnthropicServer(FakeServer):
    """``with FakeAnthropicServer(policy) as server:`` -> ``server.base_url`` (no ``/v1``: the SDK
    adds it). ``requests`` lists every (path, body) received, refused ones included; ``cached``
    is the set of prefixes the prompt cache holds."""

    def __init__(self, policy: Policy = echo, api_key: str = API_KEY, latency: float = 0.0) -> None:
        self.policy = policy
        self.api_key = api_key
        self.latency = latency
        self.cached: set[str] = set()
        super().__init__()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def answer(self, path: str, key: str | None, body: dict[str, Any]) -> Reply:
        if path.rstrip("/") != "/v1/messages":
            return failure(404, "not_found_error", f"no route {path}")
        if key != self.api_key:
            return failure(401, "authentication_error", "invalid API key")
        refused = _invalid(body)
        if refused:
            return failure(400, "invalid_request_error", refused)
        status, reply, headers = self.policy(body)
        if status != 200:
            return status, reply, headers
        usage, breakpoints = self._prompt_usage(body)
        time.sleep(self.latency)
        with self._lock:  # as on the API, a prefix can be read once its first request is answered
            self.cached.update(breakpoints)
        return status, self._finished(body, reply, usage), headers

    def _finished(
        self, body: dict[str, Any], reply: dict[str, Any], usage: dict[str, int]
    ) -> dict[str, Any]:
        words = "".join(b["text"] for b in reply["content"] if b["type"] == "text")
        stop_reason, stop_sequence = reply.get("stop_reason", "end_turn"), None
        hits = [(words.find(s), s) for s in body.get("stop_sequences") or [] if s in words]
        if hits:
            at, stop_sequence = min(hits)
            words, stop_reason = words[:at], "stop_sequence"
        if len(words.split()) > body["max_tokens"]:
            words = " ".join(words.split()[: body["max_tokens"]])
            stop_reason, stop_sequence = "max_tokens", None
        return {
            "id": f"msg_fake_{len(self.requests)}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": words}] if words else [],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {**usage, "output_tokens": len(words.split())},
        }

    def _prompt_usage(self, body: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
        """Input tokens split the way the API splits them: read from the cache, written to it, and
        the rest after the last breakpoint; and the prefixes this request writes."""
        blocks = _blocks(body.get("system")) + [
            b for m in body["messages"] for b in _blocks(m["content"])
        ]
        seen, total, breakpoints = "", 0, {}
        for block in blocks:
            seen += block["text"]
            total += _tokens(block["text"])
            if block.get("cache_control"):
                breakpoints[seen] = total
        with self._lock:
            read = max((n for p, n in breakpoints.items() if p in self.cached), default=0)
        created = max(breakpoints.values(), default=0) - read
        usage = {
            "input_tokens": total - read - created,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
        }
        return usage, list(breakpoints)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size) or b"{}")
                with server._lock:
                    server.requests.append((self.path, body))
                # older SDKs send the key as x-api-key, 2.x as a bearer token
                bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                key = self.headers.get("x-api-key") or bearer or None
                status, reply, headers = server.answer(self.path, key, body)
                payload = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client cancelled this request

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def _invalid(body: dict[str, Any]) -> str | None:
    """What the API would refuse in ``body`` (a few of its checks), or None."""
    for field in ("model", "max_tokens", "messages"):
        if field not in body:
            return f"{field}: Field required"
    if not body["messages"]:
        return "messages: at least one message is required"
    if not 0 <= body.get("temperature", 1) <= 1:
        return "temperature: range: 0..1"
    last = body["messages"][-1]
    if (
        last["role"] == "assistant"
        and _joined(last["content"]) != _joined(last["content"]).rstrip()
    ):
        return "messages: final assistant content cannot end with trailing whitespace"
    if any(m["role"] not in ("user", "assistant") for m in body["messages"]):
        return "messages: roles must be user or assistant"
    return None


def _blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if b.get("type") == "text"]


def _joined(content: Any) -> str:
    return "".join(b["text"] for b in _blocks(content))


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)
