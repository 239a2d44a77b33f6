"""OpenAI-compatible HTTP backend: the OpenAI API itself, ``vllm serve``, SGLang, llama.cpp's server...

One module (over 400 lines) because every call path (chat, completions scoring, reward) goes through
the same client lifetime, retry policy, error typing and in-flight window, which must stay one
implementation; what is specific to reward models is in ``openai_reward.py``.

Remote servers batch on their side, so the backend's job is to keep many requests in flight, to retry
only what can succeed on a second try (timeouts, dropped connections, 429, 5xx), and to fail at once,
naming the request and quoting the server, on everything else. A failure is raised as the type that
says whose fault it is (:func:`typed_error`): transient (a rerun retries it), this request's input, or
the configuration's. How many are in flight is an adaptive window (:mod:`synthpref.backends.window`):
it starts at ``max_concurrency`` and halves on timeouts, dropped connections, 5xx, 429 or a latency far
above its running baseline (a saturated ``vllm serve`` queues rather than refuses, so latency is its
only overload signal), then grows back additively.

Generation uses chat completions. Scoring needs the log-probabilities of given text, which chat
completions cannot return, so it uses the legacy ``/v1/completions`` endpoint with ``echo`` and a
prompt of token ids rendered locally by :func:`segments.render_segment`: the server then scores exactly
the tokens the transformers and vLLM backends score. That requires a local copy of the served model's
tokenizer (``tokenizer:``); without one the backend cannot score, as with the OpenAI API itself.
Raw-text completion (capability ``complete``, :mod:`openai_complete`) uses the same endpoint and the
same local tokenizer, for the same reason: it sends the text's own token ids.

An ``AsyncOpenAI`` client is opened per ``generate``/``score`` call rather than once per backend: its
connection pool belongs to the event loop that created it, and callers may run each stage in a fresh
loop.

Hosted APIs differ from OpenAI in ways a run must survive without configuration: a 429 or 503 may carry
``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``, which the retry waits at least and which
holds every request not yet sent (:mod:`synthpref.backends.rate_limit`); optional
``requests_per_minute``/``tokens_per_minute`` caps space the sends so the provider's limits are not hit
in the first place; and a server that rejects ``n > 1`` (Anthropic's OpenAI-compatible endpoint and
several hosts) gets each such request as ``n`` single requests, seeds ``seed + k``, once it has said so.

Each generation result carries what the server billed (``GenerationResult.usage``, from the response's
``usage``: cached prompt tokens apart, see :func:`_billed`); on the OpenAI API itself a model's price
comes from the shipped table unless its spec names one (:meth:`OpenAISpec.effective_price`), and a
self-hosted server costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import Field, model_validator

from synthpref.backends.base import (
    Backend,
    BackendError,
    Capability,
    CapabilityError,
    OnGenerated,
    OnRewarded,
    OnScored,
    RequestError,
    TransientBackendError,
)
from synthpref.backends.pricing import Price, shipped_price
from synthpref.backends.rate_limit import RateLimiter, retry_after
from synthpref.backends.segments import SegmentError, render_segment
from synthpref.backends.specs import VOLATILE, ModelSpec, batch_mode_field, missing_api_key
from synthpref.backends.types import (
    Completion,
    CompletionRequest,
    GenerationRequest,
    GenerationResult,
    RewardRequest,
    RewardResult,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    Usage,
)
from synthpref.backends.window import AIMDWindow, AsyncWindow, Signal

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from synthpref.records import Message

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", GenerationRequest, CompletionRequest)
#: one call for one request: ``send(client, i, request)`` (chat, or raw-text completions)
Send = Callable[["AsyncOpenAI", int, R], Awaitable[GenerationResult]]

#: what a server without authentication is sent; vLLM and most local servers accept any key
NO_KEY = "EMPTY"

#: the OpenAI API's own address (the SDK's default base_url)
API_URL = "https://api.openai.com/v1"


class OpenAISpec(ModelSpec):
    """A model behind an OpenAI-compatible API: the OpenAI API (``base_url`` unset) or a local server.

    Scoring is available only with ``tokenizer`` (a local directory holding the served model's
    tokenizer) and a server that implements ``/v1/completions`` with ``echo`` and prompt logprobs,
    which ``vllm serve`` does and the OpenAI API does not.
    """

    backend_name: ClassVar[str] = "openai"
    backend: Literal["openai"] = "openai"
    model: str = Field(description="the served model name, as the server's /v1/models lists it")
    task: Literal["generate", "reward"] = Field(
        "generate",
        description="reward: the model is a sequence-classification reward model "
        "(AutoModelForSequenceClassification); it scores conversations and does not generate "
        "(served by vllm serve <dir> --runner pooling, see backends/openai_reward.py)",
    )
    base_url: str | None = Field(
        None, description="e.g. http://127.0.0.1:8000/v1 for vllm serve; unset: the OpenAI API"
    )
    tokenizer: str | None = Field(
        None,
        description="local tokenizer directory of the served model; enables scoring (teacher forcing)",
    )
    max_context: int | None = Field(
        None,
        ge=2,
        description="the server's context window in tokens, for scoring; unset: asked from the "
        "server's /v1/models (vLLM reports max_model_len), else unchecked",
    )
    strict_json_schema: bool = Field(
        True,
        description="send json_schema with strict: true (OpenAI then enforces it, but accepts only "
        "its schema subset); false lets any schema through as a hint",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="environment variable holding the API key; with base_url set it may be unset",
        json_schema_extra=VOLATILE,
    )
    max_concurrency: int = Field(
        256,
        ge=1,
        description="most requests in flight; the adaptive window starts here and shrinks on overload",
        json_schema_extra=VOLATILE,
    )
    adaptive_concurrency: bool = Field(
        True,
        description="shrink the in-flight window on timeouts, 5xx, 429 and rising latency, and grow "
        "it back when healthy; false: a fixed max_concurrency",
        json_schema_extra=VOLATILE,
    )
    timeout: float = Field(
        600.0, gt=0, description="seconds per HTTP request", json_schema_extra=VOLATILE
    )
    max_retries: int = Field(
        5,
        ge=0,
        json_schema_extra=VOLATILE,
        description="retries of a rate-limited, failed or timed-out call (exponential back-off, "
        "at least the server's Retry-After) before the shard stops",
    )
    requests_per_minute: float | None = Field(
        None,
        gt=0,
        description="client-side cap on requests sent per minute (sends evenly spaced, no burst); "
        "unset: none",
        json_schema_extra=VOLATILE,
    )
    tokens_per_minute: float | None = Field(
        None,
        gt=0,
        description="client-side cap on tokens per minute, counted before sending as the prompt's "
        "tokens (by tokenizer: when set, else characters / 4) plus max_tokens times n; unset: none",
        json_schema_extra=VOLATILE,
    )
    mode: Literal["online", "batch"] = batch_mode_field()
    supports_n: bool | None = Field(
        None,
        description="whether the server accepts n > 1 in one request; unset: yes where /v1/models "
        "says vLLM serves the model, else try, and if it answers "
        "400 about n, send each such request as n single requests with seeds seed, seed+1, ... "
        "(remembered per backend); false: always split",
    )

    @model_validator(mode="after")
    def _reward_needs_a_server(self) -> OpenAISpec:
        if self.task == "reward" and self.base_url is None:
            raise ValueError("task: reward needs base_url: a vllm serve --runner pooling server")
        return self

    def missing_key(self) -> str | None:
        return missing_key(self.api_key_env, self.base_url)

    def effective_price(self) -> Price | None:
        """``price``, else the shipped table's price of ``model`` on the OpenAI API itself
        (``base_url`` unset or the API's own address); a self-hosted server costs nothing unless
        its spec names a price. None also for a hosted model the table does not list."""
        if self.price is not None:
            return self.price
        if self.base_url is None or self.base_url.rstrip("/") == API_URL:
            return shipped_price("openai", self.model)
        return None

    def build(self) -> Backend:
        return OpenAIBackend(
            self.model,
            task=self.task,
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            tokenizer=self.tokenizer,
            max_context=self.max_context,
            strict_json_schema=self.strict_json_schema,
            max_concurrency=self.max_concurrency,
            adaptive_concurrency=self.adaptive_concurrency,
            timeout=self.timeout,
            max_retries=self.max_retries,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
            supports_n=self.supports_n,
        )

    def capabilities(self) -> frozenset[str]:
        if self.task == "reward":
            return frozenset({"reward"})
        caps = {"generate", "json_schema", "top_logprobs"}
        return frozenset(caps | {"score", "complete"} if self.tokenizer else caps)

    def display_name(self) -> str:
        return self.model

    def result_fields(self) -> dict[str, Any]:
        """``task`` enters only when it is reward and ``supports_n`` only when set: specs that use
        neither keep their fingerprints. A forced split (``supports_n: false``) on a server that
        accepts ``n`` draws other samples than one request would, so a set value is result-affecting."""
        out = super().result_fields()
        if out.get("task") == "generate":
            del out["task"]
        if out.get("supports_n") is None:
            out.pop("supports_n", None)
        return out

    def weights_identity(self) -> str | None:
        """Only the local tokenizer can be seen: a server's weights are out of reach (see
        ``OpenAIBackend.identity``)."""
        if not self.tokenizer:
            return None
        from synthpref.backends.identity import model_identity

        return f"tokenizer={model_identity(self.tokenizer)}"


@lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """Load a tokenizer once per process; scoring renders every request with it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def missing_key(env: str, base_url: str | None) -> str | None:
    """Only the OpenAI API itself (no ``base_url``) requires a key; a self-hosted server usually
    needs none (see :func:`~synthpref.backends.specs.missing_api_key`)."""
    return missing_api_key("OpenAI", env, base_url, "a local server")


class OpenAIBackend(Backend):
    """Chat completions for generation, ``/v1/completions`` with ``echo`` for scoring.

    ``peak_in_flight`` and ``retries`` count what happened on this object (the most requests that
    were awaiting the server at once, and the retried attempts): progress reports and tests read them.
    ``window`` is the in-flight controller (its ``size`` now, its ``shrinks`` by reason), ``limiter``
    the rate caps and server-requested pauses (its ``waited`` seconds), ``supports_n`` whether the
    server takes ``n > 1`` (None until the first such request finds out, unless configured).
    """

    #: what every instance can do; ``supports`` adds "score" and "complete" when a tokenizer is
    #: configured
    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {"generate", "json_schema", "top_logprobs"}
    )

    def __init__(
        self,
        model: str,
        *,
        task: Literal["generate", "reward"] = "generate",
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        tokenizer: str | None = None,
        max_context: int | None = None,
        strict_json_schema: bool = True,
        max_concurrency: int = 256,
        adaptive_concurrency: bool = True,
        timeout: float = 600.0,
        max_retries: int = 5,
        retry_initial_wait: float = 1.0,
        retry_max_wait: float = 60.0,
        retry_after_max: float = 600.0,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        supports_n: bool | None = None,
    ) -> None:
        self.model = model
        self.task = task
        self.base_url = base_url.rstrip("/") if base_url else None
        self.tokenizer_path = tokenizer
        self._identity: str | None = None
        self.max_context = max_context
        self.strict_json_schema = strict_json_schema
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_initial_wait = retry_initial_wait
        self.retry_max_wait = retry_max_wait
        #: a server's Retry-After longer than this is not waited: the call fails as transient (the
        #: shard stops, a rerun retries) rather than hold a stage for longer
        self.retry_after_max = retry_after_max
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self.supports_n = supports_n
        self.api_key_env = api_key_env
        self._api_key = api_key if api_key is not None else self._key_from_env(api_key_env)
        #: this model's entry in the server's /v1/models, once asked (``_card_asked``)
        self._card: Any = None
        self._card_asked = False
        self.window = AIMDWindow(
            maximum=max_concurrency,
            # a fixed window: never shrinks (minimum = maximum), so it is a plain semaphore
            minimum=1 if adaptive_concurrency else max_concurrency,
        )
        self._gate = AsyncWindow(self.window, classify=overload_signal, on_change=self._resized)
        self.retries = 0

    @property
    def max_concurrency(self) -> int:
        return self.window.maximum

    @property
    def peak_in_flight(self) -> int:
        return self._gate.peak_in_flight

    def _resized(self, old: int, new: int, signal: str) -> None:
        if new < old:
            reason = "an error" if signal == "overload" else "rising latency"
            log.info("%s: in-flight window %d -> %d after %s", self.where, old, new, reason)

    def _key_from_env(self, env: str) -> str:
        key = os.environ.get(env)
        if key:
            return key
        problem = missing_key(env, self.base_url)
        if problem:
            raise BackendError(problem)
        return NO_KEY

    @property
    def where(self) -> str:
        return self.base_url or "the OpenAI API"

    @property
    def identity(self) -> str:
        """The server's address and the served model's name, and the local tokenizer's content.

        A server's weights cannot be seen from here: if the model behind ``base_url`` and ``model``
        is replaced (a redeployed ``vllm serve``, a provider updating a model name), cached results
        are still served. Pin a dated model name (``gpt-4o-2024-08-06``) or serve a new model under
        a new name. ``/v1/models`` is not consulted: it reports at most a name and, on vLLM, the
        path served from (not its content), and the identity must be fixed before the first request
        without a network call. The tokenizer decides which tokens a score covers, so its files'
        content is part of the identity, fixed when first asked for.
        """
        if self._identity is None:
            from synthpref.backends.identity import model_identity

            tok = (
                f":tokenizer={self.tokenizer_path}={model_identity(self.tokenizer_path)}"
                if self.tokenizer_path
                else ""
            )
            self._identity = f"openai:{self.base_url or 'api.openai.com'}:{self.model}{tok}"
        return self._identity

    def supports(self, capability: Capability) -> bool:
        if self.task == "reward":
            return capability == "reward"
        if capability in ("score", "complete"):
            return self.tokenizer_path is not None
        return capability in self.capabilities

    @property
    def tokenizer(self):
        return self.local_tokenizer(
            "scoring", "and use a server with /v1/completions echo support, such as vllm serve"
        )

    def local_tokenizer(self, what: str, server: str = ""):
        """The local copy of the served model's tokenizer, which ``what`` needs (CapabilityError
        without one; ``server`` adds what the server must offer)."""
        if self.tokenizer_path is None:
            raise CapabilityError(
                f"{what} through {self.where} needs the served model's tokenizer: set "
                f"tokenizer: <local directory> in the model spec{f' ({server})' if server else ''}"
            )
        return load_tokenizer(self.tokenizer_path)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The served model's chat template, from the local tokenizer (as the server applies it
        to chat requests when it serves that tokenizer's template)."""
        return self.local_tokenizer("rendering the chat template").apply_chat_template(
            [m.model_dump() for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    async def complete(
        self, requests: Sequence[CompletionRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        """Raw text through ``/v1/completions``: :mod:`openai_complete`."""
        from synthpref.backends.openai_complete import complete

        return await complete(self, requests, on_result)

    def _client(self) -> AsyncOpenAI:
        from openai import AsyncOpenAI

        # The SDK's own retries are off: tenacity retries below, with the request index in the logs.
        return AsyncOpenAI(
            api_key=self._api_key, base_url=self.base_url, timeout=self.timeout, max_retries=0
        )

    # generation -------------------------------------------------------------------------------

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        self._not_a_reward_model("generate")
        for i, r in enumerate(requests):
            if r.continue_final_message:
                raise CapabilityError(
                    f"request {i} asks to continue a final assistant message (prefill), which the "
                    "OpenAI chat API cannot do; use the transformers, embedded or vllm backend"
                )
        if not requests:
            return []
        async with self._client() as client:
            probe = asyncio.Lock()
            return await self._run_all(
                len(requests),
                lambda i: self._sampled(client, i, requests[i], self._chat, probe),
                on_result,
            )

    async def _sampled(
        self, client: AsyncOpenAI, i: int, req: R, send: Send[R], probe: asyncio.Lock
    ) -> GenerationResult:
        """Request ``i`` through ``send`` (one chat or completions call), or as ``n`` single
        requests on a server that takes no ``n > 1``. While that is unknown (and /v1/models does not
        say that vLLM serves the model), the first such request
        of a call sends a one-token copy of itself under ``probe`` and the others wait for that
        answer, so a server that rejects n answers 400 once per call, not once per request in
        flight, and a server that takes n holds the others back for one prefill, not for a whole
        reply."""
        probed = None
        if req.params.n > 1 and self.supports_n is None:
            async with probe:
                if self.supports_n is None and await self._served_by_vllm(client):
                    self.supports_n = True
                if self.supports_n is None:
                    probed = await self._probe_n(client, i, req, send)
        if req.params.n > 1 and self.supports_n is False:
            return await self._split(client, i, req, send)
        result = await send(client, i, req)
        if probed is not None and probed.usage is not None:  # the probe was billed too
            result = result.model_copy(
                update={"usage": _sum_usage([result.billed(), probed.usage])}
            )
        return result

    async def _chat(self, client: AsyncOpenAI, i: int, req: GenerationRequest) -> GenerationResult:
        """Request ``i`` as one chat completion call."""
        kwargs = self._chat_kwargs(req)
        resp = await self._call(
            i,
            lambda: client.chat.completions.create(**kwargs),
            # latency is judged against requests of the same size
            kind=f"chat:n={req.params.n}:max_tokens={req.params.max_tokens}",
            tokens=self._token_estimate(req),
        )
        return self._parse_chat(i, req, resp)

    async def _served_by_vllm(self, client: AsyncOpenAI) -> bool:
        """Whether /v1/models says vLLM serves this model: vLLM takes ``n > 1``, so no probe is
        sent (a probe is a request the server counts, and one prefill every other waits for)."""
        return getattr(await self._model_card(client), "owned_by", None) == "vllm"

    async def _probe_n(
        self, client: AsyncOpenAI, i: int, req: R, send: Send[R]
    ) -> GenerationResult | None:
        """Ask with ``n > 1`` and ``max_tokens: 1`` once and set ``supports_n`` from the answer: a
        400 about ``n`` marks this backend as splitting from now on. Returns the probe's result when
        the server took it (its usage is billed), None when it refused."""
        one = req.model_copy(update={"params": req.params.model_copy(update={"max_tokens": 1})})
        try:
            result = await send(client, i, one)
        except BackendError as err:
            if not rejects_n(err.__cause__):
                raise
            log.warning(
                "%s rejects n > 1 (%s); each request for n samples is sent as n single requests "
                "from now on, seeds seed, seed+1, ... (set supports_n: false to skip this probe)",
                self.where,
                _server_message(err.__cause__),
            )
            self.supports_n = False
            return None
        self.supports_n = True
        return result

    async def _split(self, client: AsyncOpenAI, i: int, req: R, send: Send[R]) -> GenerationResult:
        """Request ``i``'s ``n`` samples as ``n`` single requests, sample ``k`` with seed
        ``seed + k`` (no seed stays no seed), their completions in sample order.

        ``seed + k`` is this backend's own rule: the transformers backend derives a sample's seed
        by hashing (``row_sampling.row_seed``), which a server cannot reproduce anyway. So a split
        request for seed ``s`` shares its samples with requests for seeds ``s+1``, ``s+2`` ...,
        as ``n`` separate requests of a generate stage with consecutive seeds would.
        ``prompt_tokens`` is the prompt's length, once, as for an unsplit request, though the
        server was sent (and bills) the prompt ``n`` times: ``usage`` is the parts' usage summed,
        what was billed (None when no part reported any).
        """
        p = req.params
        singles = [
            req.model_copy(
                update={
                    "params": p.model_copy(
                        update={"n": 1, "seed": None if p.seed is None else p.seed + k}
                    )
                }
            )
            for k in range(p.n)
        ]
        parts = await self._run_all(len(singles), lambda k: send(client, i, singles[k]), None)
        usage = None
        if any(part.usage is not None for part in parts):
            usage = _sum_usage([part.billed() for part in parts])
        return GenerationResult(
            completions=[part.completions[0] for part in parts],
            prompt_tokens=parts[0].prompt_tokens,
            usage=usage,
        )

    def _token_estimate(self, req: GenerationRequest) -> int:
        """What a request counts against ``tokens_per_minute`` before it is sent: its prompt's
        tokens (by the local tokenizer when one is configured, else characters / 4, rounded up; the
        chat template's few tokens per message are not counted) plus ``max_tokens`` for each of its
        ``n`` samples, as providers count it. 0 when no token cap is set (nothing is tokenized)."""
        if self.limiter.tokens_per_minute is None:
            return 0
        if self.tokenizer_path is not None:
            tok = self.tokenizer
            prompt = sum(
                len(tok(m.content, add_special_tokens=False).input_ids) for m in req.messages
            )
        else:
            prompt = -(-sum(len(m.content) for m in req.messages) // 4)
        return prompt + req.params.max_tokens * req.params.n

    def _chat_kwargs(self, req: GenerationRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [m.model_dump() for m in req.messages],
            # max_completion_tokens, not the deprecated max_tokens: OpenAI's reasoning models reject
            # the latter, and vLLM accepts both.
            **sampling_kwargs(req.params, "max_completion_tokens"),
        }
        if req.top_logprobs:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = req.top_logprobs
        if req.json_schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    # OpenAI accepts only [A-Za-z0-9_-]{1,64} here
                    "name": re.sub(
                        r"[^A-Za-z0-9_-]", "_", str(req.json_schema.get("title") or "response")
                    )[:64],
                    "schema": req.json_schema,
                    "strict": self.strict_json_schema,
                },
            }
        return kwargs

    def _parse_chat(self, i: int, req: GenerationRequest, resp: Any) -> GenerationResult:
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise BackendError(
                f"request {i}: {self.where} answered without choices; got {_preview(resp)}"
            )
        if len(choices) != req.params.n:
            raise BackendError(
                f"request {i}: asked {self.where} for n={req.params.n} completions, got "
                f"{len(choices)}; the server may not support n > 1: set supports_n: false in the "
                "model spec to send n single requests"
            )
        usage = getattr(resp, "usage", None)
        total_completion = getattr(usage, "completion_tokens", None)
        completions = []
        for k, choice in enumerate(sorted(choices, key=lambda c: getattr(c, "index", 0))):
            message = getattr(choice, "message", None)
            text = getattr(message, "content", None)
            if text is None:
                text = getattr(message, "refusal", None)  # a refusal is an answer, not a failure
            # A reasoning model's reasoning, apart from its answer: vLLM's and DeepSeek's field, or
            # OpenRouter's and newer vLLM's; an answer cut while still reasoning has no content.
            reasoning = getattr(message, "reasoning_content", None)
            if not isinstance(reasoning, str):
                reasoning = getattr(message, "reasoning", None)
            if not isinstance(reasoning, str):
                reasoning = None
            elif text is None:
                text = ""
            if not isinstance(text, str):
                raise BackendError(
                    f"request {i}: choice {k} from {self.where} has no text content; "
                    f"got {_preview(choice)}"
                )
            top = None
            n_tokens: int | None = None
            content_lp = getattr(getattr(choice, "logprobs", None), "content", None)
            if req.top_logprobs:
                if content_lp is None:
                    raise BackendError(
                        f"request {i}: asked {self.where} for top_logprobs={req.top_logprobs} but "
                        "the answer has none; the server or model does not return logprobs"
                    )
                top = [{t.token: float(t.logprob) for t in tok.top_logprobs} for tok in content_lp]
            if content_lp is not None:
                n_tokens = len(content_lp)
            elif total_completion is not None and req.params.n == 1:
                n_tokens = int(total_completion)
            elif self.tokenizer_path is not None:
                n_tokens = len(self.tokenizer(text, add_special_tokens=False).input_ids)
            elif total_completion is not None:
                # Only the total is known: share it out (an estimate used for progress reporting).
                base, extra = divmod(int(total_completion), req.params.n)
                n_tokens = base + (1 if k < extra else 0)
            else:
                n_tokens = 0
            completions.append(
                Completion(
                    text=text,
                    finish_reason=choice.finish_reason or "stop",
                    completion_tokens=n_tokens,
                    top_logprobs=top,
                    reasoning=reasoning,
                )
            )
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        return GenerationResult(
            completions=completions,
            prompt_tokens=int(prompt_tokens or 0),
            usage=_billed(usage, completions),
        )

    # batch mode -------------------------------------------------------------------------------

    def batch_provider(self):
        """The OpenAI Batch API (``mode: batch``, :mod:`synthpref.backends.openai_batch`)."""
        self._not_a_reward_model("generate")
        from synthpref.backends.openai_batch import OpenAIBatches

        return OpenAIBatches(self)

    # scoring ----------------------------------------------------------------------------------

    async def score(
        self, requests: Sequence[ScoreRequest], on_result: OnScored | None = None
    ) -> list[ScoreResult]:
        self._not_a_reward_model("score text")
        tok = self.tokenizer  # raises CapabilityError without one
        if not requests:
            return []
        async with self._client() as client:
            limit = await self._context_limit(client)
            rendered = []
            for i, r in enumerate(requests):
                try:
                    rendered.append(render_segment(tok, r, limit))
                except SegmentError as exc:
                    raise RequestError(f"score request {i}: {exc}", index=i) from exc

            async def one(i: int) -> ScoreResult:
                seg = rendered[i]
                resp = await self._call(
                    i,
                    lambda: client.completions.create(
                        model=self.model,
                        prompt=seg.token_ids,
                        echo=True,
                        logprobs=1,
                        max_tokens=1,
                        temperature=0.0,
                    ),
                    kind="score",
                    tokens=len(seg.token_ids) + 1,
                )
                return ScoreResult(
                    token_logprobs=self._prompt_logprobs(
                        i, resp, seg.token_ids, seg.start, seg.end
                    ),
                    tokens=tok.convert_ids_to_tokens(seg.token_ids[seg.start : seg.end]),
                    truncated_tokens=seg.truncated_tokens,
                )

            return await self._run_all(len(requests), one, on_result)

    async def reward(
        self, requests: Sequence[RewardRequest], on_result: OnRewarded | None = None
    ) -> list[RewardResult]:
        """Raw reward-head outputs per conversation (task: reward): :mod:`openai_reward`."""
        from synthpref.backends.openai_reward import reward

        return await reward(self, requests, on_result)

    def _not_a_reward_model(self, what: str) -> None:
        if self.task == "reward":
            raise CapabilityError(f"{self.model!r} is a reward model (task: reward): cannot {what}")

    async def _context_limit(self, client: AsyncOpenAI) -> int | None:
        """The longest prompt a score request may send: the context minus the one generated token."""
        window = await self._context_window(client)
        return window - 1 if window else None

    async def _context_window(self, client: AsyncOpenAI) -> int | None:
        """The server's context window: ``max_context``, else asked once from /v1/models."""
        if self.max_context is None:
            card = await self._model_card(client)
            if getattr(card, "max_model_len", None):
                self.max_context = int(card.max_model_len)  # type: ignore[union-attr]
        return self.max_context

    async def _model_card(self, client: AsyncOpenAI) -> Any:
        """This model's entry in the server's /v1/models (vLLM adds ``max_model_len`` and
        ``owned_by: vllm``), asked once; None when the server lists no such model or answers no
        model list (a failure only logged: what it would tell is asked another way)."""
        if not self._card_asked:
            self._card_asked = True
            try:
                models = await client.models.list()
                self._card = next((m for m in models.data if m.id == self.model), None)
            except Exception as exc:
                log.info("could not read %s/models: %s", self.where, exc)
        return self._card

    def _prompt_logprobs(
        self, i: int, resp: Any, ids: list[int], start: int, end: int
    ) -> list[float]:
        choices = getattr(resp, "choices", None)
        lp = (
            getattr(choices[0], "logprobs", None) if isinstance(choices, list) and choices else None
        )
        values = getattr(lp, "token_logprobs", None)
        if not isinstance(values, list) or len(values) < len(ids):
            raise BackendError(
                f"score request {i}: {self.where} did not echo the prompt's {len(ids)} token "
                f"logprobs (needs /v1/completions with echo=true and logprobs, as vllm serve "
                f"has); got {_preview(resp)}"
            )
        out = values[start:end]
        if any(not isinstance(v, int | float) for v in out):
            raise BackendError(
                f"score request {i}: {self.where} returned non-numeric logprobs for the scored "
                f"tokens: {_preview(out)}"
            )
        return [float(v) for v in out]

    # plumbing ---------------------------------------------------------------------------------

    async def _run_all(
        self,
        n: int,
        worker: Callable[[int], Awaitable[T]],
        on_result: Callable[[int, T], None] | None,
    ) -> list[T]:
        """Run ``worker(i)`` for every index (each HTTP attempt holds a place in the in-flight
        window, see :meth:`_call`); report each result as it lands and return them in order. On the
        first failure cancel the rest (results already reported stay cached).
        """
        results: list[T | None] = [None] * n

        async def one(i: int) -> None:
            result = await worker(i)
            results[i] = result
            if on_result:
                on_result(i, result)

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results  # type: ignore[return-value]

    async def _call(
        self, i: int, fn: Callable[[], Awaitable[T]], kind: str = "", tokens: int = 0
    ) -> T:
        """One HTTP call with retries on transient failures; anything else becomes a BackendError.

        Each attempt holds a place in the in-flight window, then waits for the rate caps (``tokens``:
        its estimate, see :meth:`_token_estimate`) and for any pause a server asked for. A retry
        waits the exponential back-off, or the server's ``Retry-After`` plus jitter when that is
        longer; a ``Retry-After`` over ``retry_after_max`` is not waited: the call fails at once.
        """
        from tenacity import (
            AsyncRetrying,
            RetryCallState,
            retry_if_exception,
            wait_exponential,
            wait_random,
        )

        def asked(state: RetryCallState) -> float | None:
            return retry_after(state.outcome.exception()) if state.outcome else None

        # initial * 2**k plus up to `initial` of jitter, so concurrent retries spread out
        backoff = wait_exponential(
            multiplier=self.retry_initial_wait, max=self.retry_max_wait
        ) + wait_random(0, self.retry_initial_wait)

        def wait(state: RetryCallState) -> float:
            base = backoff(state)
            told = asked(state)
            if told is None:
                return base
            # at least what the server asked, plus jitter so the requests it told do not return
            # together
            return max(base, told + random.uniform(0, self.retry_initial_wait))

        def stop(state: RetryCallState) -> bool:
            told = asked(state)
            return state.attempt_number > self.max_retries or (
                told is not None and told > self.retry_after_max
            )

        def before_sleep(state: RetryCallState) -> None:
            self.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            told = asked(state)
            if told:
                # the server asked this client to wait: hold the requests not yet sent too
                self.limiter.pause(told)
            log.warning(
                "request %d to %s failed (%s), retry %d of %d in %.1fs%s",
                i,
                self.where,
                _describe(exc),
                state.attempt_number,
                self.max_retries,
                wait,
                f" (the server asked for {told:.1f}s)" if told is not None else "",
            )

        retrying = AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    # one place in the window per attempt: backoff sleeps do not hold one
                    async with self._gate.slot(kind, ready=lambda: self.limiter.acquire(tokens)):
                        return await fn()
        except BackendError:
            raise
        except Exception as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise typed_error(exc, i, self._explain(i, exc, attempts)) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _explain(self, i: int, exc: Exception, attempts: int) -> str:
        from openai import APIConnectionError, APIStatusError, APITimeoutError

        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(exc, APITimeoutError):
            return (
                f"request {i} to {self.where} timed out{tries} (timeout: {self.timeout}s); raise "
                "timeout: in the model spec, or lower max_concurrency if the server is overloaded"
            )
        if isinstance(exc, APIConnectionError):
            return (
                f"request {i}: could not connect to {self.where}{tries} ({_describe(exc)}); is the "
                "server running and is base_url right (e.g. http://127.0.0.1:8000/v1)?"
            )
        if isinstance(exc, APIStatusError):
            status = exc.status_code
            said = _server_message(exc).rstrip(". ")
            msg = f"request {i} failed{tries}: {self.where} answered HTTP {status}: {said}"
            if status == 401:
                msg += (
                    f"; the server wants a key: set it in ${self.api_key_env}"
                    if self._api_key == NO_KEY
                    else f"; check the API key in ${self.api_key_env}"
                )
            elif status == 404:
                msg += (
                    f"; is {self.model!r} the name the server serves? (vllm serve names a model "
                    "after its path unless --served-model-name is given; see GET /v1/models)"
                )
            elif status == 429:
                msg += (
                    "; lower max_concurrency, set requests_per_minute or tokens_per_minute, or "
                    "raise max_retries"
                )
            told = retry_after(exc)
            if told is not None and told > self.retry_after_max:
                msg += (
                    f"; it asked to wait {told:.0f}s, longer than this backend waits "
                    f"({self.retry_after_max:.0f}s): run again later"
                )
            return msg
        return f"request {i} to {self.where} failed{tries}: {_describe(exc)}"


def _sum_usage(parts: list[Usage]) -> Usage:
    return Usage(
        input_tokens=sum(u.input_tokens for u in parts),
        cached_input_tokens=sum(u.cached_input_tokens for u in parts),
        cache_write_tokens=sum(u.cache_write_tokens for u in parts),
        output_tokens=sum(u.output_tokens for u in parts),
    )


def _billed(usage: Any, completions: list[Completion]) -> Usage | None:
    """What a chat completion's ``usage`` says was billed: ``prompt_tokens_details.cached_tokens``
    read from the prompt cache (absent: none), the rest of ``prompt_tokens`` at the input rate, and
    ``completion_tokens`` (reasoning tokens included, on OpenAI) as output. None when the server
    reported no usage (the client then counts the token counts as uncached input and output)."""
    if usage is None:
        return None
    prompt = int(getattr(usage, "prompt_tokens", None) or 0)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = min(int(getattr(details, "cached_tokens", None) or 0), prompt)
    output = getattr(usage, "completion_tokens", None)
    if output is None:
        output = sum(c.completion_tokens for c in completions)
    return Usage(
        input_tokens=prompt - cached, cached_input_tokens=cached, output_tokens=int(output)
    )


def sampling_kwargs(p: SamplingParams, max_tokens_key: str) -> dict[str, Any]:
    """A request's sampling parameters as the chat and completions endpoints take them (the
    length limit under ``max_tokens_key``); seed and stop only when set."""
    kwargs: dict[str, Any] = {
        "n": p.n,
        "temperature": p.temperature,
        "top_p": p.top_p,
        max_tokens_key: p.max_tokens,
    }
    if p.seed is not None:
        kwargs["seed"] = p.seed
    if p.stop:
        kwargs["stop"] = list(p.stop)
    return kwargs


#: request fields whose value is the input itself: a 4xx naming one (``param``) is about this request
INPUT_PARAMS = frozenset({"prompt", "messages", "input", "input_tokens", "input_text"})


def typed_error(exc: BaseException, i: int, message: str) -> BackendError:
    """The error type a failed call becomes, from the SDK's exception and the server's structured
    error fields (status, ``param``, ``code``), never from its wording.

    Transient: what :func:`is_transient` retries. Request-specific: 413 (this body is too large), or a
    400/422 whose ``param`` names the input or whose ``code`` is ``context_length_exceeded`` (vLLM sets
    ``param: input_tokens`` on an over-long prompt, OpenAI that code). Any other failure (401, 404, a
    400 about a parameter every request carries) is the configuration's: plain BackendError.
    """
    from openai import APIStatusError

    if is_transient(exc):
        return TransientBackendError(message)
    if isinstance(exc, APIStatusError):
        about_input = exc.param in INPUT_PARAMS or exc.code == "context_length_exceeded"
        if exc.status_code == 413 or (exc.status_code in (400, 422) and about_input):
            return RequestError(message, index=i)
    return BackendError(message)


def is_transient(exc: BaseException) -> bool:
    """Worth another try: timeouts, connection failures, rate limits (429) and server errors (5xx)."""
    from openai import APIConnectionError, APIStatusError

    if isinstance(exc, APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return False


#: a standalone ``n`` in an error message: "n: must be exactly 1", "'n' must be 1", "only n=1"
_N_IN_MESSAGE = re.compile(r"(?<![\w.\[])[`'\"]?n[`'\"]?(?![\w.\[])")


def rejects_n(exc: BaseException | None) -> bool:
    """Whether a failed chat call was the server refusing ``n > 1``: HTTP 400 naming ``param: n``.

    Only when the server names no ``param`` at all is the message read, for a standalone ``n``
    (Anthropic's OpenAI-compatible endpoint documents "n must be exactly 1" and several hosts answer
    likewise without a param). Reading wording is a last resort: a structured ``param`` always
    decides. A wrong guess costs little: the request is sent as ``n`` single ones, which fail again
    with the server's own error if it was about something else.
    """
    from openai import APIStatusError

    if not isinstance(exc, APIStatusError) or exc.status_code != 400:
        return False
    if exc.param is not None:
        return exc.param == "n"
    return bool(_N_IN_MESSAGE.search(_server_message(exc)))


def overload_signal(exc: BaseException) -> Signal:
    """What a failed attempt says about the server's load: the transient failures mean overload
    (a 429 included); any other failure (400, 404, a reply that does not parse) says nothing."""
    return "overload" if is_transient(exc) else "neutral"


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "message", None) or exc)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    cause = exc.__cause__ or exc.__context__
    text = f"{type(exc).__name__}: {exc}"
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text


def _preview(obj: Any, limit: int = 300) -> str:
    dump = getattr(obj, "model_dump_json", None)
    text = dump() if callable(dump) else repr(obj)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
