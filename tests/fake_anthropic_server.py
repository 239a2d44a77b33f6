"""A scripted Anthropic Messages API on 127.0.0.1, enough of it for the official ``anthropic`` SDK.

``POST /v1/messages`` takes ``model``, ``max_tokens``, ``messages``, ``system`` (a string or text
blocks), ``temperature``, ``top_p``, ``stop_sequences``, ``metadata`` and ``thinking``; a ``policy``
decides each answer from the request body. Whatever the policy writes, the server then behaves as the
API does around it: it refuses what the API refuses (no key, a temperature outside 0..1, a pre-filled
reply that ends in whitespace; with ``thinking`` enabled, a budget under 1024 or not below
``max_tokens``, a temperature other than 1, a top_p under 0.95 and a pre-filled reply), returns the
policy's ``thinking``/``redacted_thinking`` blocks (see :func:`thinking`) only when thinking is
enabled, counts thinking words first against ``max_tokens`` (a token here is a whitespace-separated
word) and in ``output_tokens``, cuts the text at the first stop sequence or at what is left of
``max_tokens`` with the matching ``stop_reason``, and reports ``usage`` with a prompt cache: the text up to each ``cache_control`` breakpoint (a block counts a token per four
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


def thinking(reasoning: str, reply: str, redacted: bool = False) -> Reply:
    """An answer from a model that thinks: a ``thinking`` block holding ``reasoning`` (with
    ``redacted``, a ``redacted_thinking`` block after it too), then ``reply`` as the text. The
    server drops the thinking blocks when the request did not enable thinking, as the API sends
    none then."""
    blocks: list[dict[str, Any]] = [
        {"type": "thinking", "thinking": reasoning, "signature": "fake-signature"}
    ]
    if redacted:
        blocks.append({"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"})
    blocks.append({"type": "text", "text": reply})
    return 200, {"content": blocks, "stop_reason": "end_turn"}, {}


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
        thought, left = _thought(body, reply["content"])
        hits = [(words.find(s), s) for s in body.get("stop_sequences") or [] if s in words]
        if hits:
            at, stop_sequence = min(hits)
            words, stop_reason = words[:at], "stop_sequence"
        if left is None or len(words.split()) > left:
            words = " ".join(words.split()[: left or 0])
            stop_reason, stop_sequence = "max_tokens", None
        thought_tokens = sum(len(b.get("thinking", "").split()) for b in thought)
        return {
            "id": f"msg_fake_{len(self.requests)}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": thought + ([{"type": "text", "text": words}] if words else []),
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {**usage, "output_tokens": thought_tokens + len(words.split())},
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


def _thinks(body: dict[str, Any]) -> bool:
    return (body.get("thinking") or {}).get("type") == "enabled"


def _thought(
    body: dict[str, Any], content: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int | None]:
    """The thinking blocks of a policy's reply as sent (none unless the request enabled
    thinking; cut at ``max_tokens`` words), and the tokens left for the text (None: none, the
    thinking used them all)."""
    if not _thinks(body):
        return [], body["max_tokens"]
    left = body["max_tokens"]
    out: list[dict[str, Any]] = []
    for block in content:
        if block["type"] == "redacted_thinking":
            out.append(block)
        elif block["type"] == "thinking":
            words = block["thinking"].split()
            if len(words) >= left:
                out.append({**block, "thinking": " ".join(words[:left])})
                return out, None
            left -= len(words)
            out.append(block)
    return out, left


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
    if body.get("thinking") is not None:
        refused = _invalid_thinking(body, last)
        if refused:
            return refused
    if (
        last["role"] == "assistant"
        and _joined(last["content"]) != _joined(last["content"]).rstrip()
    ):
        return "messages: final assistant content cannot end with trailing whitespace"
    if any(m["role"] not in ("user", "assistant") for m in body["messages"]):
        return "messages: roles must be user or assistant"
    return None


def _invalid_thinking(body: dict[str, Any], last: dict[str, Any]) -> str | None:
    """The API's checks of the ``thinking`` parameter and of what it cannot go with."""
    config = body["thinking"]
    if config.get("type") == "disabled":
        return None
    if config.get("type") != "enabled":
        return f"thinking.type: Input should be 'enabled' or 'disabled', got {config.get('type')!r}"
    budget = config.get("budget_tokens")
    if not isinstance(budget, int) or budget < 1024:
        return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
    if body["max_tokens"] <= budget:
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    if body.get("temperature", 1) != 1:
        return "`temperature` may only be set to 1 when thinking is enabled"
    if not 0.95 <= body.get("top_p", 1) <= 1:
        return "`top_p` must be between 0.95 and 1 when thinking is enabled"
    if last["role"] == "assistant":
        return (
            "messages: when `thinking` is enabled, a final `assistant` message must start with a "
            "thinking block"
        )
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
