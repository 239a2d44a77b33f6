"""A local fake of OpenAI's Batch API and Anthropic's Message Batches, for the batch-mode tests.

``with FakeBatchProvider() as server:`` serves, on 127.0.0.1, enough of both providers for the
official SDKs (``openai.OpenAI(base_url=server.openai_base_url, api_key=...)``,
``anthropic.Anthropic(base_url=server.anthropic_base_url, api_key=API_KEY)``):

* OpenAI: ``POST /v1/files`` (multipart upload), ``GET /v1/files/{id}``, ``GET
  /v1/files/{id}/content`` (output and error files only, as on the API), ``POST /v1/batches``
  (endpoint ``/v1/chat/completions``, window ``24h``), ``GET /v1/batches/{id}``, ``POST
  /v1/batches/{id}/cancel``, ``GET /v1/batches`` (newest first, ``after``/``limit``), and the
  online ``POST /v1/chat/completions``. Any bearer key is accepted. Input lines are validated as
  OpenAI does (JSON, ``custom_id`` unique, ``method`` POST, ``url`` the batch's endpoint, a
  ``body`` with a ``model``, one model for all lines); a batch that breaks a rule is ``failed``
  with ``errors.data`` naming the line. Output lines are ``{id, custom_id, response: {status_code:
  200, request_id, body: <chat.completion>}, error: null}``; the error file holds lines that failed
  (``response.status_code`` 4xx/5xx with ``body: {"error": {...}}``) and lines a batch never ran
  (``response: null, error: {code: batch_expired | batch_cancelled, message}``). The batch's
  ``request_counts.failed`` counts both.
* Anthropic: ``POST /v1/messages/batches`` (``custom_id`` must match ``^[a-zA-Z0-9_-]{1,64}$``
  and be unique, else 400 ``invalid_request_error``), ``GET /v1/messages/batches/{id}``, ``GET
  .../results`` (JSON lines, one per request, newline-terminated, sent as
  ``application/x-jsonl``: the SDK's ``JSONLDecoder`` splits on newlines whatever the content
  type), ``POST .../cancel``,
  ``GET /v1/messages/batches`` (newest first, ``after_id``/``before_id``/``limit``), and the
  online ``POST /v1/messages``. The key (``x-api-key``, or a bearer token as SDK 2.x sends it)
  must equal ``anthropic_api_key`` (None: any non-empty key). A request's ``params`` are checked
  when it runs, as on the API: a bad one ends ``errored`` (``invalid_request_error``).

Answers come from an :class:`Answerer` (default :class:`Scripted`: a digest of the last user
message), which sees each request as an :class:`Ask` and returns one :class:`Choice` per sample
(OpenAI's ``n``; always one on Anthropic); the server wraps them into each API's shape and counts
usage. :func:`embedded_answerer` answers with synthpref's embedded model instead.

Usage and the simulated prompt cache (deterministic; a token is a whitespace word unless the
answerer tokenizes, see :meth:`Answerer.prompt_tokens`):

* OpenAI (automatic caching): a prompt of at least ``cache_min_tokens`` tokens reads from the
  cache the longest prefix, in whole blocks of ``cache_block`` tokens and at least
  ``cache_min_tokens`` long, that an earlier answered prompt of the same model had
  (``usage.prompt_tokens_details.cached_tokens``); then its own blocks are cached.
* Anthropic (``cache_control`` breakpoints, as in tests/fake_anthropic_server.py): the system and
  message text blocks up to each block marked ``cache_control`` form a prefix; the longest prefix
  already cached is read (``cache_read_input_tokens``), the longest marked prefix beyond it is
  written (``cache_creation_input_tokens``), the rest is ``input_tokens``. A prefix is counted by
  the answerer's ``tokenize`` over its blocks' text and is cached only when at least
  ``cache_min_tokens`` long (no block rounding).
* A batch's lines are answered in file order when the job ends, so a line reads what the lines
  before it wrote; online requests share the same cache.

Job progression: a created job is in progress (OpenAI's create response says ``validating``, as
the API's does) and, unless ``hold``, ends with every line answered on its ``polls_to_finish``-th
retrieve (0: at creation). ``finish(id)``, ``expire(id, keep=k)`` (the first k lines answered,
the rest expired) and ``fail_batch(id, message)`` (OpenAI only) end it from the test; a cancel
request shows ``cancelling``/``canceling`` and ends on the next retrieve with no line run
(``hold`` does not delay it). ``line_error(custom_id, body)`` may fail chosen lines with
``(status, error_type, message)`` (Anthropic has no status per line: it keeps the type and
message). Lines are answered lazily, when the job ends, which is when
the model runs; an answerer that raises leaves the job in progress and the poll gets a 500.

All state lives in this object, so a client in another process (``synthpref run`` killed and
rerun) polls and collects the same jobs. Introspection: ``jobs`` (id -> :class:`Job`),
``batch_creations`` (per provider), ``lines_answered`` ((job id, custom_id) per line the answerer
ran), ``online_requests`` ((path, body) per online request).

Not implemented: other batch endpoints (``/v1/responses``, embeddings...), file deletion and
listing, batch deletion and archiving, streaming, tools, images, logprobs, output expiry, real
timing (``expires_at`` is a day after creation but nothing expires on its own), rate limits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.policy
import hashlib
import itertools
import json
import re
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

Provider = Literal["openai", "anthropic"]
#: (HTTP status, error type, message) for a line ``line_error`` fails, or None to answer it
LineError = Callable[[str, dict[str, Any]], tuple[int, str, str] | None]

API_KEY = "sk-ant-test"
CHAT_ENDPOINT = "/v1/chat/completions"
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


# answerers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One request as an answerer sees it, whichever API it came through.

    ``messages`` are ``{"role", "content"}`` with text content only; Anthropic's ``system`` (and
    OpenAI's ``developer``) becomes a leading ``system`` message. ``body`` is the raw request.
    """

    provider: Provider
    model: str
    messages: list[dict[str, str]]
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    body: dict[str, Any] = field(default_factory=dict)

    def last(self, role: str = "user") -> str:
        """The content of the last message of ``role`` ("" if none)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == role), "")


@dataclass(frozen=True)
class Choice:
    """One sample: its text, why it ended (``stop`` or ``length``; ``stop_sequence`` names the
    stop string that cut it) and its tokens (None: counted by the answerer's ``tokenize``)."""

    text: str
    finish: str = "stop"
    tokens: int | None = None
    stop_sequence: str | None = None


class Answerer:
    """Answers asks. Subclasses implement :meth:`answer` (or :meth:`answer_many`, which sees every
    line of a job at once, to batch a model); :meth:`tokenize` and :meth:`prompt_tokens` say what
    a token is, for usage and the prompt cache."""

    def answer(self, ask: Ask) -> list[Choice]:
        raise NotImplementedError

    def answer_many(self, asks: Sequence[Ask]) -> list[list[Choice]]:
        return [self.answer(a) for a in asks]

    def tokenize(self, text: str) -> Sequence[Hashable]:
        """Default: whitespace-separated words."""
        return text.split()

    def prompt_tokens(self, ask: Ask) -> Sequence[Hashable]:
        """The prompt's tokens as the model reads them. Default: a ``<role>`` token, then the
        content's tokens, per message."""
        return [t for m in ask.messages for t in [f"<{m['role']}>", *self.tokenize(m["content"])]]


def digest_reply(ask: Ask, index: int) -> str:
    """The default scripted text: sample ``index``'s answer to a digest of the last user message."""
    digest = hashlib.sha256(ask.last("user").encode()).hexdigest()[:12]
    return f"answer {index} to {digest}"


class Scripted(Answerer):
    """``reply(ask, index) -> text`` for each of the ``n`` samples, then cut as the APIs cut: at the
    first stop string (excluded, ``finish="stop"``), then at ``max_tokens`` words
    (``finish="length"``)."""

    def __init__(self, reply: Callable[[Ask, int], str] = digest_reply) -> None:
        self.reply = reply

    def answer(self, ask: Ask) -> list[Choice]:
        return [self._cut(ask, self.reply(ask, i)) for i in range(ask.n)]

    def _cut(self, ask: Ask, text: str) -> Choice:
        hits = sorted((text.find(s), s) for s in ask.stop if s and s in text)
        stop_sequence = hits[0][1] if hits else None
        if hits:
            text = text[: hits[0][0]]
        words = text.split()
        if ask.max_tokens is not None and len(words) > ask.max_tokens:
            return Choice(" ".join(words[: ask.max_tokens]), "length", ask.max_tokens)
        return Choice(text, "stop", len(words), stop_sequence)


class EmbeddedAnswerer(Answerer):
    """Answers with synthpref's embedded model (the ``backend: embedded`` TransformersBackend): each
    ask becomes a :class:`~synthpref.backends.types.GenerationRequest` (messages, n, temperature,
    top_p, max_tokens, stop, seed; an Anthropic reply pre-filled by a trailing assistant message is
    continued), a job's lines are generated in one ``generate`` call on a fresh event loop, and
    tokens are the model's own (its chat template for the prompt)."""

    def __init__(self, backend: Any = None) -> None:
        self._backend = backend

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from synthpref.backends.builtin import EmbeddedSpec

            self._backend = EmbeddedSpec().build()
        return self._backend

    def request(self, ask: Ask) -> Any:
        from synthpref.backends.types import GenerationRequest, SamplingParams

        params = {
            "n": ask.n,
            "temperature": 1.0 if ask.temperature is None else ask.temperature,
            "top_p": 1.0 if ask.top_p is None else ask.top_p,
            "max_tokens": ask.max_tokens or 256,
            "seed": 0 if ask.seed is None else ask.seed,
            "stop": ask.stop,
        }
        prefill = ask.provider == "anthropic" and ask.messages[-1]["role"] == "assistant"
        return GenerationRequest(
            messages=ask.messages,
            params=SamplingParams(**params),
            continue_final_message=prefill,
        )

    def tokenize(self, text: str) -> Sequence[Hashable]:
        return self.backend.tokenizer.encode(text, add_special_tokens=False)

    def prompt_tokens(self, ask: Ask) -> Sequence[Hashable]:
        rendered = self.backend.render_prompt(self.request(ask))
        return self.backend.tokenizer(rendered, add_special_tokens=False).input_ids

    def answer_many(self, asks: Sequence[Ask]) -> list[list[Choice]]:
        if not asks:
            return []
        requests = [self.request(a) for a in asks]
        # a fresh loop in its own thread: the caller may be a server thread or a test's running loop
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            results = pool.submit(asyncio.run, self.backend.generate(requests)).result()
        return [
            [Choice(c.text, c.finish_reason, c.completion_tokens) for c in r.completions]
            for r in results
        ]

    def answer(self, ask: Ask) -> list[Choice]:
        return self.answer_many([ask])[0]


def embedded_answerer(backend: Any = None) -> EmbeddedAnswerer:
    """An answerer on synthpref's embedded model (built on first use unless ``backend`` is given)."""
    return EmbeddedAnswerer(backend)


# asks from request bodies -------------------------------------------------------------------------


def _text(content: Any) -> str:
    """A message's text: a string, or the text of its text blocks/parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")


def _text_blocks(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if b.get("type") == "text"]


def _stops(stop: Any) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def openai_ask(body: dict[str, Any]) -> Ask:
    roles = {"developer": "system"}
    return Ask(
        provider="openai",
        model=body["model"],
        messages=[
            {"role": roles.get(m["role"], m["role"]), "content": _text(m.get("content"))}
            for m in body["messages"]
        ],
        n=body.get("n") or 1,
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        stop=_stops(body.get("stop")),
        seed=body.get("seed"),
        body=body,
    )


def anthropic_ask(body: dict[str, Any]) -> Ask:
    system = _text(body.get("system"))
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": m["role"], "content": _text(m["content"])} for m in body["messages"]]
    return Ask(
        provider="anthropic",
        model=body["model"],
        messages=messages,
        max_tokens=body["max_tokens"],
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        stop=_stops(body.get("stop_sequences")),
        body=body,
    )


def openai_refusal(body: Any) -> str | None:
    """Why the API would answer this chat request with a 400 (a few of its checks), or None."""
    if not isinstance(body, dict) or not body.get("model"):
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    if any(not isinstance(m, dict) or "role" not in m for m in messages):
        return "each message needs a 'role'"
    if body.get("stream"):
        return "streaming is not supported by this fake"
    if not isinstance(body.get("n", 1), int) or body.get("n", 1) < 1:
        return "'n' must be a positive integer"
    return None


def anthropic_refusal(body: Any) -> str | None:
    """What the Messages API would refuse in ``body`` (a few of its checks), or None."""
    if not isinstance(body, dict):
        return "params: must be an object"
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            return f"{name}: Field required"
    if not body["messages"]:
        return "messages: at least one message is required"
    if any(m.get("role") not in ("user", "assistant") for m in body["messages"]):
        return "messages: roles must be user or assistant"
    if not 0 <= body.get("temperature", 1) <= 1:
        return "temperature: range: 0..1"
    last = body["messages"][-1]
    if last["role"] == "assistant" and _text(last["content"]) != _text(last["content"]).rstrip():
        return "messages: final assistant content cannot end with trailing whitespace"
    return None


# jobs ---------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One line's fate once its job has ended."""

    kind: Literal["succeeded", "errored", "expired", "canceled"]
    response: dict[str, Any] | None = None  # the API-shaped answer (succeeded)
    error: tuple[int, str, str] | None = None  # (status, type, message) (errored)


@dataclass
class Job:
    """A batch job: ``status`` is the provider's (OpenAI's batch status; Anthropic's
    ``processing_status``). ``results`` is filled when it ends."""

    id: str
    provider: Provider
    order: int
    custom_ids: list[str]
    bodies: list[dict[str, Any]]
    status: str
    created_at: float = field(default_factory=time.time)
    polls: int = 0
    model: str | None = None
    input_file_id: str | None = None
    metadata: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Line] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)  # in_progress, ended, cancelling, ...
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in ("completed", "failed", "expired", "cancelled", "ended")

    @property
    def cancelling(self) -> bool:
        return self.status in ("cancelling", "canceling")


@dataclass
class StoredFile:
    id: str
    purpose: str
    filename: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class Raw:
    """A non-JSON reply body."""

    data: bytes
    content_type: str


Reply = tuple[int, "dict[str, Any] | Raw"]


def _oai_error(
    status: int, message: str, kind: str = "invalid_request_error", **more: Any
) -> Reply:
    return status, {
        "error": {"message": message, "type": kind, "param": None, "code": None, **more}
    }


def _ant_error(status: int, kind: str, message: str) -> Reply:
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def _rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


# the server ---------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """A listen backlog for a client that opens a few hundred connections at once (the openai
    backend's in-flight window starts at 256); the default of 5 refuses most of them."""

    request_queue_size = 1024


class FakeBatchProvider:
    """Both providers' batch APIs on one local port; see the module docstring."""

    def __init__(
        self,
        answerer: Answerer | Callable[[Ask, int], str] | None = None,
        *,
        polls_to_finish: int = 1,
        hold: bool = False,
        line_error: LineError | None = None,
        cache_block: int = 128,
        cache_min_tokens: int = 1024,
        anthropic_api_key: str | None = API_KEY,
    ) -> None:
        if answerer is None:
            answerer = Scripted()
        elif not isinstance(answerer, Answerer):
            answerer = Scripted(answerer)
        self.answerer: Answerer = answerer
        self.polls_to_finish = polls_to_finish
        self.hold = hold
        self.line_error = line_error
        self.cache_block = cache_block
        self.cache_min_tokens = cache_min_tokens
        self.anthropic_api_key = anthropic_api_key
        self.jobs: dict[str, Job] = {}
        self.files: dict[str, StoredFile] = {}
        self.batch_creations: Counter[str] = Counter()
        self.lines_answered: list[tuple[str, str]] = []
        self.online_requests: list[tuple[str, dict[str, Any]]] = []
        self._cached: set[tuple[str, str, str]] = set()  # (provider, model, prefix digest)
        self._order = itertools.count()
        self._lock = threading.RLock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    # lifetime and addresses

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.root}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.root

    def __enter__(self) -> FakeBatchProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # control from tests

    def finish(self, job_id: str) -> None:
        """End the job now, every line answered (``hold`` or not)."""
        with self._lock:
            self._end(self._running(job_id), "completed")

    def expire(self, job_id: str, keep: int = 0) -> None:
        """End the job as expired: its first ``keep`` lines answered, the rest expired."""
        with self._lock:
            self._end(self._running(job_id), "expired", keep)

    def fail_batch(self, job_id: str, message: str) -> None:
        """Fail an OpenAI batch as if its input had not validated (``errors.data``, no files)."""
        with self._lock:
            job = self._running(job_id)
            if job.provider != "openai":
                raise ValueError("only OpenAI batches fail; Anthropic refuses bad input at create")
            job.errors.append({"code": "invalid_request", "line": None, "message": message})
            job.status, job.times["failed"] = "failed", time.time()

    def _running(self, job_id: str) -> Job:
        job = self.jobs[job_id]
        if job.ended:
            raise ValueError(f"job {job_id} has already ended ({job.status})")
        return job

    # progression

    def _created(self, job: Job) -> None:
        self.jobs[job.id] = job
        self.batch_creations[job.provider] += 1
        if job.ended:  # failed validation
            return
        job.times["in_progress"] = job.created_at
        if not self.hold and self.polls_to_finish <= 0:
            self._end(job, "completed")

    def _polled(self, job: Job) -> None:
        job.polls += 1
        if job.ended:
            return
        if job.cancelling:
            self._end(job, "cancelled")
        elif not self.hold and job.polls >= self.polls_to_finish:
            self._end(job, "completed")

    def _end(self, job: Job, how: str, keep: int | None = None) -> None:
        """Run the job's first ``keep`` lines (all when completed, none when cancelled) and end it."""
        run = {"completed": len(job.bodies), "expired": keep or 0, "cancelled": 0}[how]
        results: dict[str, Line] = {}
        asks: list[tuple[str, Ask]] = []
        for cid, body in list(zip(job.custom_ids, job.bodies, strict=True))[:run]:
            failed = self.line_error(cid, body) if self.line_error else None
            refusal = openai_refusal(body) if job.provider == "openai" else anthropic_refusal(body)
            if failed is None and refusal:
                failed = (400, "invalid_request_error", refusal)
            if failed:
                results[cid] = Line("errored", error=failed)
            else:
                asks.append(
                    (cid, openai_ask(body) if job.provider == "openai" else anthropic_ask(body))
                )
        answers = self.answerer.answer_many([a for _, a in asks])  # may raise: the job stays as is
        for (cid, ask), choices in zip(asks, answers, strict=True):
            results[cid] = Line("succeeded", response=self._wrap(ask, choices, batch=True))
            self.lines_answered.append((job.id, cid))
        unrun = "canceled" if how == "cancelled" else "expired"
        job.results = {cid: results.get(cid) or Line(unrun) for cid in job.custom_ids}
        job.times["ended"] = time.time()
        if job.provider == "anthropic":
            job.status = "ended"
        else:
            job.status = how
            self._write_openai_files(job)

    def _write_openai_files(self, job: Job) -> None:
        out, err = [], []
        for cid, line in job.results.items():
            row: dict[str, Any] = {"id": _new_id("batch_req_"), "custom_id": cid}
            if line.kind == "succeeded":
                out.append({**row, "response": _oai_response(200, line.response), "error": None})
            elif line.kind == "errored":
                status, kind, message = line.error
                body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
                err.append({**row, "response": _oai_response(status, body), "error": None})
            else:
                code = "batch_expired" if line.kind == "expired" else "batch_cancelled"
                why = "expired" if line.kind == "expired" else "was cancelled"
                message = f"This request could not be executed before the batch {why}."
                err.append({**row, "response": None, "error": {"code": code, "message": message}})
        for rows, attr, name in (
            (out, "output_file_id", "output"),
            (err, "error_file_id", "error"),
        ):
            if rows:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                stored = StoredFile(_new_id("file-"), "batch_output", f"batch_{name}.jsonl", data)
                self.files[stored.id] = stored
                setattr(job, attr, stored.id)

    # answers, usage and the prompt cache

    def _wrap(self, ask: Ask, choices: list[Choice], batch: bool) -> dict[str, Any]:
        """The API's response to ``ask``, with usage (and the prompt cache updated)."""
        out = sum(
            c.tokens if c.tokens is not None else len(self.answerer.tokenize(c.text))
            for c in choices
        )
        if ask.provider == "openai":
            prompt = self.answerer.prompt_tokens(ask)
            cached = self._openai_cached(ask.model, prompt)
            return {
                "id": _new_id("chatcmpl-"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": ask.model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "length" if c.finish == "length" else "stop",
                    }
                    for i, c in enumerate(choices)
                ],
                "usage": {
                    "prompt_tokens": len(prompt),
                    "completion_tokens": out,
                    "total_tokens": len(prompt) + out,
                    "prompt_tokens_details": {"cached_tokens": cached},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
                "system_fingerprint": None,
                "service_tier": "default",
            }
        choice = choices[0]
        if choice.finish == "length":
            stop_reason = "max_tokens"
        elif choice.stop_sequence:
            stop_reason = "stop_sequence"
        else:
            stop_reason = "end_turn"
        return {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": ask.model,
            "content": [{"type": "text", "text": choice.text}] if choice.text else [],
            "stop_reason": stop_reason,
            "stop_sequence": choice.stop_sequence if stop_reason == "stop_sequence" else None,
            "usage": {
                **self._anthropic_prompt_usage(ask),
                "output_tokens": out,
                "service_tier": "batch" if batch else "standard",
            },
        }

    def _openai_cached(self, model: str, prompt: Sequence[Hashable]) -> int:
        """Cached tokens of ``prompt``: the longest whole-block prefix an earlier prompt cached."""
        if len(prompt) < self.cache_min_tokens:
            return 0
        cached, digest, hit = 0, b"", True
        with self._lock:
            for end in range(self.cache_block, len(prompt) + 1, self.cache_block):
                block = json.dumps(list(prompt[end - self.cache_block : end]), default=str)
                digest = hashlib.sha256(digest + block.encode()).digest()  # chained: a prefix
                key = ("openai", model, digest.hex())
                hit = hit and key in self._cached
                cached = end if hit else cached
                self._cached.add(key)
        return cached if cached >= self.cache_min_tokens else 0

    def _anthropic_prompt_usage(self, ask: Ask) -> dict[str, int]:
        body = ask.body
        blocks = _text_blocks(body.get("system")) + [
            b for m in body["messages"] for b in _text_blocks(m["content"])
        ]
        digest, count, marks = b"", 0, {}  # prefix digest -> its tokens, at each breakpoint
        for block in blocks:
            digest = hashlib.sha256(digest + block["text"].encode()).digest()
            count += len(self.answerer.tokenize(block["text"]))
            if block.get("cache_control") and count >= self.cache_min_tokens:
                marks[("anthropic", ask.model, digest.hex())] = count
        with self._lock:
            read = max((n for k, n in marks.items() if k in self._cached), default=0)
            self._cached.update(marks)
        created = max(marks.values(), default=0) - read
        total = max(len(self.answerer.prompt_tokens(ask)), count)
        return {
            "input_tokens": total - read - created,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
        }

    # HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    status, reply = server._route(method, self.path, self.headers, data)
                except BadRequest as exc:
                    status, reply = server._error(self.path, 400, str(exc))
                except Exception:  # a bug here or in the answerer: say so, change nothing
                    status, reply = server._error(self.path, 500, traceback.format_exc())
                if isinstance(reply, Raw):
                    payload, content_type = reply.data, reply.content_type
                else:
                    payload, content_type = json.dumps(reply).encode(), "application/json"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (a killed subprocess, a cancelled request)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def _error(self, path: str, status: int, message: str) -> Reply:
        """An error in the shape of the API ``path`` belongs to."""
        kind = "invalid_request_error" if status == 400 else "api_error"
        if path.startswith("/v1/messages"):
            return _ant_error(status, kind, message)
        return _oai_error(status, message, kind if status == 400 else "server_error")

    def _route(self, method: str, target: str, headers: Any, data: bytes) -> Reply:
        url = urlsplit(target)
        parts = [p for p in url.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        bearer = (headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        if parts[:2] == ["v1", "messages"]:
            key = headers.get("x-api-key") or bearer
            if not key or self.anthropic_api_key not in (None, key):
                return _ant_error(401, "authentication_error", "invalid x-api-key")
            return self._anthropic(method, parts[2:], query, data)
        if parts[:1] != ["v1"]:
            return _oai_error(404, f"no route {method} {url.path}")
        if not bearer:
            return _oai_error(401, "You didn't provide an API key.")
        return self._openai(method, parts[1:], query, headers.get("Content-Type") or "", data)

    # OpenAI

    def _openai(
        self, method: str, parts: list[str], query: dict[str, str], content_type: str, data: bytes
    ) -> Reply:
        match method, parts:
            case "POST", ["chat", "completions"]:
                body = _json(data)
                refusal = openai_refusal(body)
                if refusal:
                    return _oai_error(400, refusal)
                with self._lock:
                    self.online_requests.append((CHAT_ENDPOINT, body))
                ask = openai_ask(body)
                return 200, self._wrap(ask, self.answerer.answer(ask), batch=False)
            case "POST", ["files"]:
                return self._upload(content_type, data)
            case "GET", ["files", file_id, *rest] if rest in ([], ["content"]):
                stored = self.files.get(file_id)
                if stored is None:
                    return _oai_error(404, f"No such File object: {file_id}")
                if not rest:
                    return 200, stored.obj()
                if stored.purpose == "batch":
                    return _oai_error(400, "Not allowed to download files of purpose: batch")
                return 200, Raw(stored.data, "application/octet-stream")
            case "POST", ["batches"]:
                return self._create_openai_batch(_json(data))
            case "GET", ["batches"]:
                return 200, self._page("openai", query, "after", self._openai_batch)
            case ("GET", ["batches", job_id]) | ("POST", ["batches", job_id, "cancel"]):
                with self._lock:
                    job = self.jobs.get(job_id)
                    if job is None or job.provider != "openai":
                        return _oai_error(404, f"No batch found with id '{job_id}'.")
                    if method == "GET":
                        self._polled(job)
                    elif not job.ended:
                        job.status, job.times["cancelling"] = "cancelling", time.time()
                    return 200, self._openai_batch(job)
        return _oai_error(404, f"no route {method} /v1/{'/'.join(parts)}")

    def _upload(self, content_type: str, data: bytes) -> Reply:
        form = _multipart(content_type, data)
        if "file" not in form or "purpose" not in form:
            return _oai_error(400, "a multipart form with 'file' and 'purpose' is required")
        filename, content = form["file"]
        stored = StoredFile(_new_id("file-"), form["purpose"][1].decode(), filename or "", content)
        with self._lock:
            self.files[stored.id] = stored
        return 200, stored.obj()

    def _create_openai_batch(self, body: dict[str, Any]) -> Reply:
        stored = self.files.get(body.get("input_file_id") or "")
        if stored is None:
            return _oai_error(404, f"No such File object: {body.get('input_file_id')}")
        if stored.purpose != "batch":
            return _oai_error(400, "The input file must be uploaded with purpose 'batch'.")
        if body.get("endpoint") != CHAT_ENDPOINT:
            return _oai_error(400, f"this fake runs only {CHAT_ENDPOINT} batches")
        if body.get("completion_window") != "24h":
            return _oai_error(400, "completion_window: only '24h' is supported")
        with self._lock:
            job = Job(_new_id("batch_"), "openai", next(self._order), [], [], "in_progress")
            job.input_file_id, job.metadata = stored.id, body.get("metadata")
            job.errors = _read_openai_lines(stored.data, job)
            if job.errors:
                job.status, job.times["failed"] = "failed", job.created_at
            self._created(job)
            obj = self._openai_batch(job)
        if job.status in ("in_progress", "failed"):  # what the API's create answers
            obj.update(status="validating", errors=None, in_progress_at=None, failed_at=None)
        return 200, obj

    def _openai_batch(self, job: Job) -> dict[str, Any]:
        kinds = Counter(line.kind for line in job.results.values())
        usages = [line.response["usage"] for line in job.results.values() if line.response]
        prompt = sum(u["prompt_tokens"] for u in usages)
        cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        output = sum(u["completion_tokens"] for u in usages)
        t = {k: int(v) for k, v in job.times.items()}
        ended = t.get("ended")
        return {
            "id": job.id,
            "object": "batch",
            "endpoint": CHAT_ENDPOINT,
            "model": job.model,
            "errors": {"object": "list", "data": job.errors} if job.errors else None,
            "input_file_id": job.input_file_id,
            "completion_window": "24h",
            "status": job.status,
            "output_file_id": job.output_file_id,
            "error_file_id": job.error_file_id,
            "created_at": int(job.created_at),
            "in_progress_at": t.get("in_progress"),
            "expires_at": int(job.created_at) + 86400,
            "finalizing_at": ended,
            "completed_at": ended if job.status == "completed" else None,
            "failed_at": t.get("failed"),
            "expired_at": ended if job.status == "expired" else None,
            "cancelling_at": t.get("cancelling"),
            "cancelled_at": ended if job.status == "cancelled" else None,
            "request_counts": {
                "total": len(job.custom_ids),
                "completed": kinds["succeeded"],
                "failed": len(job.results) - kinds["succeeded"],
            },
            "metadata": job.metadata,
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + output,
            },
        }

    # Anthropic

    def _anthropic(
        self, method: str, parts: list[str], query: dict[str, str], data: bytes
    ) -> Reply:
        match method, parts:
            case "POST", []:
                body = _json(data)
                refusal = anthropic_refusal(body)
                if refusal:
                    return _ant_error(400, "invalid_request_error", refusal)
                with self._lock:
                    self.online_requests.append(("/v1/messages", body))
                ask = anthropic_ask(body)
                return 200, self._wrap(ask, self.answerer.answer(ask), batch=False)
            case "POST", ["batches"]:
                return self._create_anthropic_batch(_json(data))
            case "GET", ["batches"]:
                return 200, self._page("anthropic", query, "after_id", self._anthropic_batch)
            case "GET" | "POST", ["batches", job_id, *rest] if (
                method,
                rest,
            ) in _ANTHROPIC_JOB_ROUTES:
                with self._lock:
                    job = self.jobs.get(job_id)
                    if job is None or job.provider != "anthropic":
                        return _ant_error(404, "not_found_error", f"no message batch {job_id}")
                    if rest == ["results"]:
                        return self._anthropic_results(job)
                    if method == "GET":
                        self._polled(job)
                    elif not job.ended:
                        job.status, job.times["cancelling"] = "canceling", time.time()
                    return 200, self._anthropic_batch(job)
        return _ant_error(
            404, "not_found_error", f"no route {method} /v1/messages/{'/'.join(parts)}"
        )

    def _create_anthropic_batch(self, body: dict[str, Any]) -> Reply:
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return _ant_error(400, "invalid_request_error", "requests: at least one is required")
        seen: set[str] = set()
        for i, request in enumerate(requests):
            cid = request.get("custom_id") if isinstance(request, dict) else None
            if not isinstance(cid, str) or not _CUSTOM_ID.fullmatch(cid):
                return _ant_error(
                    400,
                    "invalid_request_error",
                    f"requests.{i}.custom_id: String should match pattern '{_CUSTOM_ID.pattern}'",
                )
            if cid in seen:
                return _ant_error(
                    400, "invalid_request_error", f"requests.{i}.custom_id: duplicate {cid!r}"
                )
            if not isinstance(request.get("params"), dict):
                return _ant_error(400, "invalid_request_error", f"requests.{i}.params: required")
            seen.add(cid)
        with self._lock:
            job = Job(
                _new_id("msgbatch_"),
                "anthropic",
                next(self._order),
                [r["custom_id"] for r in requests],
                [r["params"] for r in requests],
                "in_progress",
            )
            self._created(job)
            return 200, self._anthropic_batch(job)

    def _anthropic_batch(self, job: Job) -> dict[str, Any]:
        kinds = Counter(line.kind for line in job.results.values())
        return {
            "id": job.id,
            "type": "message_batch",
            "processing_status": job.status,
            "request_counts": {
                "processing": len(job.custom_ids) - len(job.results),
                "succeeded": kinds["succeeded"],
                "errored": kinds["errored"],
                "canceled": kinds["canceled"],
                "expired": kinds["expired"],
            },
            "created_at": _rfc3339(job.created_at),
            "expires_at": _rfc3339(job.created_at + 86400),
            "ended_at": _rfc3339(job.times.get("ended")),
            "cancel_initiated_at": _rfc3339(job.times.get("cancelling")),
            "archived_at": None,
            "results_url": f"{self.root}/v1/messages/batches/{job.id}/results"
            if job.ended
            else None,
        }

    def _anthropic_results(self, job: Job) -> Reply:
        if not job.ended:
            return _ant_error(404, "not_found_error", f"message batch {job.id} has not ended")
        rows = []
        for cid, line in job.results.items():
            result: dict[str, Any] = {"type": line.kind}
            if line.kind == "succeeded":
                result["message"] = line.response
            elif line.kind == "errored":
                _, kind, message = line.error
                result["error"] = {"type": "error", "error": {"type": kind, "message": message}}
            rows.append(json.dumps({"custom_id": cid, "result": result}) + "\n")
        return 200, Raw("".join(rows).encode(), "application/x-jsonl")

    # both

    def _page(
        self, provider: Provider, query: dict[str, str], cursor: str, render: Callable[[Job], Any]
    ) -> dict[str, Any]:
        """A list page, newest first, after the job named by ``cursor`` (``before_id`` too)."""
        with self._lock:
            jobs = sorted(
                (j for j in self.jobs.values() if j.provider == provider),
                key=lambda j: -j.order,
            )
            ids = [j.id for j in jobs]
            start, stop = 0, len(jobs)
            if query.get(cursor) in ids:
                start = ids.index(query[cursor]) + 1
            if query.get("before_id") in ids:
                stop = ids.index(query["before_id"])
            limit = int(query.get("limit") or 20)
            if "before_id" in query:
                start = max(start, stop - limit)
            page = jobs[start : min(stop, start + limit)]
            has_more = (start + len(page) < stop) if "before_id" not in query else start > 0
            return {
                "object": "list",
                "data": [render(j) for j in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": has_more,
            }


_ANTHROPIC_JOB_ROUTES = [("GET", []), ("GET", ["results"]), ("POST", ["cancel"])]


def _oai_response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": _new_id("req_"), "body": body}


class BadRequest(Exception):
    """A request body the fake cannot read (answered 400)."""


def _json(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data or b"{}")
    except ValueError as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body is not a JSON object")
    return body


def _multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, content)."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + data)
    if not message.is_multipart():
        return {}
    return {
        part.get_param("name", header="content-disposition"): (
            part.get_filename(),
            part.get_payload(decode=True) or b"",
        )
        for part in message.iter_parts()
    }


def _read_openai_lines(data: bytes, job: Job) -> list[dict[str, Any]]:
    """Read a batch input file into ``job`` (custom ids, bodies, model); the validation errors
    OpenAI would report, by line number."""
    errors: list[dict[str, Any]] = []

    def error(code: str, number: int, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "line": number, "message": message, "param": param})

    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not isinstance(line, dict):
            error("invalid_json_line", number, "This line is not parseable as valid JSON.")
            continue
        cid, body = line.get("custom_id"), line.get("body")
        if not isinstance(cid, str) or not cid:
            error("missing_required_parameter", number, "custom_id is required.", "custom_id")
        elif cid in job.custom_ids:
            error(
                "duplicate_custom_id",
                number,
                "The custom_id for this request is a duplicate of another request. The custom_id "
                "parameter must be unique for each request in a batch.",
                "custom_id",
            )
        if line.get("method") != "POST":
            error("invalid_method", number, "The method must be POST.", "method")
        if line.get("url") != CHAT_ENDPOINT:
            error(
                "invalid_url",
                number,
                f"The url must match the batch's endpoint {CHAT_ENDPOINT}.",
                "url",
            )
        if not isinstance(body, dict) or not body.get("model"):
            error("missing_required_parameter", number, "body.model is required.", "body.model")
        elif job.model is None:
            job.model = body["model"]
        elif body["model"] != job.model:
            error(
                "mismatched_model",
                number,
                f"The provided model {body['model']!r} does not match the model {job.model!r} "
                "of the other requests in this batch.",
                "body.model",
            )
        job.custom_ids.append(cid if isinstance(cid, str) else f"<line {number}>")
        job.bodies.append(body if isinstance(body, dict) else {})
    if not job.custom_ids and not errors:
        error("empty_file", 0, "The batch input file is empty.")
    return errors
