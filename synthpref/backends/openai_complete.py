"""Raw-text completion on an OpenAI-compatible server: ``/v1/completions`` (capability ``complete``).

The text is tokenized by the local copy of the served model's tokenizer (``tokenizer:``) as it stands
(``add_special_tokens=False``: a rendered chat template already carries its special tokens) and sent
as token ids, as scoring sends its prompts: the server adds no BOS and cannot tokenize the text
differently. The sampling parameters are chat generation's (``n``, ``temperature``, ``top_p``,
``seed``, ``stop``, ``max_tokens``), and each call goes through the backend's retries, error typing,
in-flight window and rate caps (``OpenAIBackend._call``); a server that refuses ``n > 1`` gets ``n``
single requests, as for chat. The server stops at its model's EOS ids (vLLM: the tokenizer's and the
generation config's), as it does for chat; the text comes back as generated, reasoning not split off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from synthpref.backends.base import BackendError, OnGenerated, RequestError
from synthpref.backends.openai_backend import OpenAIBackend, _billed, _preview, sampling_kwargs
from synthpref.backends.types import Completion, CompletionRequest, GenerationResult

if TYPE_CHECKING:
    from openai import AsyncOpenAI


async def complete(
    backend: OpenAIBackend,
    requests: Sequence[CompletionRequest],
    on_result: OnGenerated | None = None,
) -> list[GenerationResult]:
    """Each request's text continued by the server, reported through ``on_result`` as it lands."""
    backend._not_a_reward_model("continue raw text")
    tok = backend.local_tokenizer(
        "raw-text completion", "and a server with /v1/completions, such as vllm serve"
    )
    if not requests:
        return []
    ids = [list(tok(r.prompt, add_special_tokens=False).input_ids) for r in requests]
    async with backend._client() as client:
        window = await backend._context_window(client)
        for i, prompt in enumerate(ids):
            if window is not None and len(prompt) >= window:
                raise RequestError(
                    f"request {i}: the prompt is {len(prompt)} tokens, which leaves no room to "
                    f"generate within the server's context of {window}; shorten it",
                    index=i,
                )

        async def send(client: AsyncOpenAI, i: int, req: CompletionRequest) -> GenerationResult:
            p = req.params
            kwargs: dict[str, Any] = {
                "model": backend.model,
                "prompt": ids[i],
                **sampling_kwargs(p, "max_tokens"),
            }
            capped = backend.limiter.tokens_per_minute is not None
            resp = await backend._call(
                i,
                lambda: client.completions.create(**kwargs),
                kind=f"complete:n={p.n}:max_tokens={p.max_tokens}",
                tokens=len(ids[i]) + p.max_tokens * p.n if capped else 0,
            )
            return parse(backend, i, req, resp, len(ids[i]))

        probe = asyncio.Lock()
        return await backend._run_all(
            len(requests),
            lambda i: backend._sampled(client, i, requests[i], send, probe),
            on_result,
        )


def parse(
    backend: OpenAIBackend,
    i: int,
    req: CompletionRequest,
    resp: Any,
    prompt_tokens: int,
) -> GenerationResult:
    """A completions answer as a result: one completion per choice, in index order, and ``usage``
    as the chat path reads it (a choice's token count: the usage's for one sample, else its text
    re-tokenized by the local tokenizer)."""
    where = backend.where
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise BackendError(f"request {i}: {where} answered without choices; got {_preview(resp)}")
    if len(choices) != req.params.n:
        raise BackendError(
            f"request {i}: asked {where} for n={req.params.n} completions, got {len(choices)}; "
            "the server may not support n > 1: set supports_n: false in the model spec"
        )
    usage = getattr(resp, "usage", None)
    total = getattr(usage, "completion_tokens", None)
    completions = []
    for k, choice in enumerate(sorted(choices, key=lambda c: getattr(c, "index", 0))):
        text = getattr(choice, "text", None)
        if not isinstance(text, str):
            raise BackendError(
                f"request {i}: choice {k} from {where} has no text; got {_preview(choice)}"
            )
        if total is not None and req.params.n == 1:
            n_tokens = int(total)
        else:
            n_tokens = len(backend.tokenizer(text, add_special_tokens=False).input_ids)
        completions.append(
            Completion(
                text=text,
                finish_reason=getattr(choice, "finish_reason", None) or "stop",
                completion_tokens=n_tokens,
            )
        )
    served = getattr(usage, "prompt_tokens", None)
    return GenerationResult(
        completions=completions,
        prompt_tokens=int(served or prompt_tokens),
        usage=_billed(usage, completions),
    )
