"""Reward models behind an OpenAI-compatible server: an ``openai`` spec with ``task: reward``.

The server is ``vllm serve <reward model dir> --runner pooling`` (vLLM picks the pooling runner by
itself for a ``...ForSequenceClassification`` checkpoint). Such a server has no chat endpoint; it
exposes ``POST /classify`` (and ``/pooling``) at its root, beside ``/v1``. Each conversation is

1. rendered to token ids with the model's chat template, no generation prompt, exactly as
   ``tokenizer.apply_chat_template(messages, tokenize=True)``: locally when the spec names the
   served model's ``tokenizer``, else by the server's ``POST /tokenize`` (``messages``,
   ``add_generation_prompt: false``), which renders with the template the model is served with;
2. fitted to the context window by :func:`synthpref.backends.turns.fit_turns` (the window is the
   spec's ``max_context``, else the ``max_model_len`` of ``/v1/models``), counting those ids;
3. sent as ``{"input": [ids], "use_activation": false}`` to ``/classify``: ``use_activation: false``
   turns off the sigmoid/softmax vLLM applies by default, so ``data[0].probs`` holds the head's raw
   outputs, in ``id2label`` order. (A server started with a score calibration, ``--pooler-config``
   ``logit_mean``/``logit_sigma``, still applies that affine map; none is set by default.)

Sending ids rather than messages means the server reads exactly the tokens that were counted.

Labels (``id2label``) are not in vLLM's answer (it names only the argmax), so they are read from a
``config.json`` beside the spec's ``tokenizer``, else in the directory ``/v1/models`` reports as the
model's ``root`` when that directory is readable here; failing both, a one-output model keeps the
label the server names and a multi-output one gets none.

Every HTTP call goes through the backend's retrying, windowed ``_call``, so 429, 5xx and timeouts are
retried and then transient, and a 400 naming the input (``input_tokens``...) is that request's
:class:`RequestError`. A server that has no ``/classify`` (a chat model served for generation, an
embedding model) fails at once with a :class:`BackendError` that says what was expected.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthpref.backends.base import BackendError, CapabilityError, OnRewarded, RequestError
from synthpref.backends.openai_backend import _preview, _server_message
from synthpref.backends.turns import chat_ids, fit_turns_async
from synthpref.backends.types import RewardRequest, RewardResult
from synthpref.records import Message

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from synthpref.backends.openai_backend import OpenAIBackend

#: what a server without the endpoint answers (501: vLLM's route without a handler)
NOT_SERVED = frozenset({404, 405, 501})

EXPECTED = (
    "a pooling server of a sequence-classification reward model, e.g. `vllm serve <reward model "
    "dir> --runner pooling` (its config.json naming architectures: [...ForSequenceClassification])"
)


def server_root(base_url: str | None) -> str:
    """Where vLLM's non-OpenAI routes live: ``base_url`` without its trailing ``/v1``."""
    if not base_url:
        raise BackendError(
            "task: reward needs base_url: the OpenAI API serves no reward models; point base_url "
            f"at {EXPECTED}"
        )
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


async def reward(
    backend: OpenAIBackend, requests: Sequence[RewardRequest], on_result: OnRewarded | None
) -> list[RewardResult]:
    """Each conversation's raw reward-head outputs from the server (see the module docstring)."""
    if backend.task != "reward":
        raise CapabilityError(
            f"{backend.model!r} at {backend.where} is a generating model (task: generate); a "
            f"reward model needs task: reward in its spec and {EXPECTED}"
        )
    if not requests:
        return []
    root = server_root(backend.base_url)
    async with backend._client() as client:
        window = await backend._context_window(client)
        if window is None and any(r.truncation == "drop_oldest_turns" for r in requests):
            raise BackendError(
                f"{backend.where} did not report its context window (max_model_len in /v1/models), "
                "which truncation: drop_oldest_turns needs: set max_context in the model spec"
            )
        labels = await _head_labels(backend, client)
        tokenize = _tokenizer(backend, client, root)

        async def one(i: int) -> RewardResult:
            ids, dropped = await _fit(i, requests[i], tokenize, window)
            body = {"model": backend.model, "input": ids, "use_activation": False}
            url = f"{root}/classify"
            resp = await backend._call(i, _post(backend, client, url, body), kind="reward")
            values, label = _values(backend, i, url, resp)
            if labels is not None and len(labels) == len(values):
                names = labels
            else:
                names = [label] if len(values) == 1 and isinstance(label, str) else []
            return RewardResult(values=values, labels=names, tokens=len(ids), dropped_turns=dropped)

        return await backend._run_all(len(requests), one, on_result)


async def _fit(
    i: int,
    req: RewardRequest,
    tokenize: Callable[[int, list[Message]], Awaitable[list[int]]],
    window: int | None,
) -> tuple[list[int], int]:
    """(the token ids of what fits, the turns dropped): the one truncation rule, counting with
    token ids that may need a network call (each conversation tokenized once)."""
    ids_of: dict[str, list[int]] = {}

    async def count(messages: list[Message]) -> int:
        key = _key(messages)
        if key not in ids_of:
            ids_of[key] = await tokenize(i, messages)
        return len(ids_of[key])

    limit = window if window is not None else sys.maxsize  # unknown: the server checks
    try:
        kept, dropped, _ = await fit_turns_async(req.messages, count, limit, req.truncation)
    except RequestError as exc:
        raise RequestError(f"reward request {i}: {exc}", index=i) from exc
    return ids_of[_key(kept)], dropped


def _key(messages: Sequence[Message]) -> str:
    return json.dumps([m.model_dump() for m in messages])


def _tokenizer(
    backend: OpenAIBackend, client: AsyncOpenAI, root: str
) -> Callable[[int, list[Message]], Awaitable[list[int]]]:
    """How conversations become token ids: the local tokenizer when the spec names one, else the
    server's ``/tokenize`` with the same template settings."""
    if backend.tokenizer_path is not None:
        tok = backend.tokenizer

        async def local(i: int, messages: list[Message]) -> list[int]:
            return chat_ids(tok, messages)

        return local

    url = f"{root}/tokenize"

    async def remote(i: int, messages: list[Message]) -> list[int]:
        body = {
            "model": backend.model,
            "messages": [m.model_dump() for m in messages],
            "add_generation_prompt": False,
            "add_special_tokens": False,
        }
        resp = await backend._call(i, _post(backend, client, url, body), kind="tokenize")
        tokens = resp.get("tokens") if isinstance(resp, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BackendError(
                f"reward request {i}: POST {url} did not answer with token ids (vLLM's /tokenize "
                f"does); got {_preview(resp)}"
            )
        return tokens

    return remote


def _post(
    backend: OpenAIBackend, client: AsyncOpenAI, url: str, body: dict[str, Any]
) -> Callable[[], Awaitable[Any]]:
    """One POST of ``body`` to ``url`` (absolute: the SDK leaves it as is), for ``_call`` to retry.

    A route the server lacks is a BackendError raised from inside the attempt, so it is neither
    retried (a 501 would be, as a 5xx) nor explained as a wrong model name."""
    from openai import APIStatusError

    async def attempt() -> Any:
        try:
            return await client.post(url, cast_to=object, body=body)
        except APIStatusError as exc:
            if exc.status_code not in NOT_SERVED:
                raise
            what = (
                "counting a conversation's tokens needs vLLM's /tokenize or a local copy of the "
                "served model's tokenizer (tokenizer: in the model spec)"
                if url.endswith("/tokenize")
                else f"task: reward expects {EXPECTED}; a chat model served for generation has "
                "no /classify"
            )
            raise BackendError(
                f"model {backend.model!r}: POST {url} answered HTTP {exc.status_code} "
                f"({_server_message(exc).rstrip('. ')}), so {backend.where} does not serve it as a reward model: {what}"
            ) from exc

    return attempt


def _values(backend: OpenAIBackend, i: int, url: str, resp: Any) -> tuple[list[float], Any]:
    """The head's outputs and the server's label from a ``/classify`` answer."""
    data = resp.get("data") if isinstance(resp, dict) else None
    item = data[0] if isinstance(data, list) and len(data) == 1 else None
    probs = item.get("probs") if isinstance(item, dict) else None
    if (
        not isinstance(probs, list)
        or not probs
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in probs)
    ):
        raise BackendError(
            f"reward request {i}: POST {url} did not answer with one row of head outputs "
            f"(data[0].probs, as vLLM's /classify does) for model {backend.model!r}; got "
            f"{_preview(resp)}"
        )
    return [float(v) for v in probs], item.get("label")


async def _head_labels(backend: OpenAIBackend, client: AsyncOpenAI) -> list[str] | None:
    """``id2label`` in order, from a config.json beside the tokenizer or in the served root."""
    dirs = [backend.tokenizer_path] if backend.tokenizer_path else []
    found = _labels_in(dirs)
    if found is not None:
        return found
    try:
        models = await client.models.list()
    except Exception:  # labels are a nicety: a server that lists nothing still answers
        return None
    roots = [
        getattr(m, "root", None) for m in models.data if getattr(m, "id", None) == backend.model
    ]
    return _labels_in([r for r in roots if isinstance(r, str)])


def _labels_in(dirs: Sequence[str]) -> list[str] | None:
    for d in dirs:
        config = Path(d) / "config.json"
        try:
            id2label = json.loads(config.read_text()).get("id2label")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(id2label, dict) and id2label:
            try:
                return [str(id2label[k]) for k in sorted(id2label, key=int)]
            except ValueError:
                continue
    return None
