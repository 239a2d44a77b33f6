"""Fitting a conversation into a model's context by dropping its oldest turns.

Reward models read the whole conversation, so a long one must either fail or lose context. What is
dropped is whole exchanges from the start (a user turn and the reply that follows it), so the chat
template still sees alternating roles; a leading system message, the last user turn and the reply
being judged are never dropped. Every backend that runs reward models uses this one rule, counting
tokens with its own tokenizer, so the same request is cut the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence

from synthpref.backends.base import RequestError
from synthpref.backends.types import RewardRequest
from synthpref.records import Message


def cuts(messages: Sequence[Message], policy: str) -> Iterator[tuple[list[Message], int]]:
    """The conversations to try, longest first, with how many messages each dropped: the whole
    one, then (with ``drop_oldest_turns``) one oldest exchange fewer at a time, down to the system
    message, the last user turn and the reply."""
    kept = list(messages)
    dropped = 0
    yield kept, dropped
    start = 1 if kept and kept[0].role == "system" else 0
    while policy == "drop_oldest_turns" and len(kept) - start > 2:
        cut = 2 if kept[start].role == "user" and kept[start + 1].role == "assistant" else 1
        cut = min(cut, len(kept) - start - 2)
        kept = kept[:start] + kept[start + cut :]
        dropped += cut
        yield kept, dropped


def fit_turns(
    messages: Sequence[Message],
    count_tokens: Callable[[list[Message]], int],
    limit: int,
    policy: str,
) -> tuple[list[Message], int, int]:
    """(the messages that fit, how many turns were dropped, their token count).

    ``policy`` is ``"error"`` (nothing is dropped) or ``"drop_oldest_turns"``. Raises
    :class:`RequestError` when the conversation cannot fit (or may not be cut).
    """
    for kept, dropped in cuts(messages, policy):
        tokens = count_tokens(kept)
        if tokens <= limit:
            return kept, dropped, tokens
    raise too_long(tokens, limit, policy)


async def fit_turns_async(
    messages: Sequence[Message],
    count_tokens: Callable[[list[Message]], Awaitable[int]],
    limit: int,
    policy: str,
) -> tuple[list[Message], int, int]:
    """:func:`fit_turns` with a count that needs a call (a server's ``/tokenize``)."""
    for kept, dropped in cuts(messages, policy):
        tokens = await count_tokens(kept)
        if tokens <= limit:
            return kept, dropped, tokens
    raise too_long(tokens, limit, policy)


def too_long(tokens: int, limit: int, policy: str) -> RequestError:
    how = (
        "even with only the last exchange left"
        if policy == "drop_oldest_turns"
        else "(truncation: error; drop_oldest_turns would cut the oldest turns)"
    )
    return RequestError(
        f"the conversation is {tokens} tokens, over the model's {limit}-token context {how}"
    )


def chat_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """A conversation's token ids as a reward model reads it: the tokenizer's own chat template, no
    generation prompt (what every reward backend sends, and what the tests' reference computes)."""
    out = tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=True)
    if hasattr(out, "keys"):  # a BatchEncoding on recent transformers
        out = out["input_ids"]
    return [int(t) for t in out]


def fit_request(
    i: int,
    request: RewardRequest,
    token_ids: Callable[[list[Message]], list[int]],
    limit: int,
) -> tuple[list[int], int]:
    """(the token ids of what of request ``i`` fits in ``limit``, the turns dropped), each try
    tokenized once; a :class:`RequestError` names the request's index."""
    ids_of: dict[int, list[int]] = {}  # by message count: each try is shorter than the last

    def count(messages: list[Message]) -> int:
        ids_of[len(messages)] = token_ids(messages)
        return len(ids_of[len(messages)])

    try:
        kept, dropped, _ = fit_turns(request.messages, count, limit, request.truncation)
    except RequestError as exc:
        raise RequestError(f"reward request {i}: {exc}", index=i) from exc
    return ids_of[len(kept)], dropped
