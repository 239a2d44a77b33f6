"""Fitting a conversation into a model's context by dropping its oldest turns.

Reward models read the whole conversation, so a long one must either fail or lose context. What is
dropped is whole exchanges from the start (a user turn and the reply that follows it), so the chat
template still sees alternating roles; a leading system message, the last user turn and the reply
being judged are never dropped. Every backend that runs reward models uses this one rule, counting
tokens with its own tokenizer, so the same request is cut the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from synthpref.backends.base import RequestError
from synthpref.records import Message


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
    kept = list(messages)
    tokens = count_tokens(kept)
    dropped = 0
    start = 1 if kept and kept[0].role == "system" else 0
    while tokens > limit and policy == "drop_oldest_turns" and len(kept) - start > 2:
        cut = 2 if kept[start].role == "user" and kept[start + 1].role == "assistant" else 1
        cut = min(cut, len(kept) - start - 2)
        del kept[start : start + cut]
        dropped += cut
        tokens = count_tokens(kept)
    if tokens > limit:
        how = (
            "even with only the last exchange left"
            if policy == "drop_oldest_turns"
            else "(truncation: error; drop_oldest_turns would cut the oldest turns)"
        )
        raise RequestError(
            f"the conversation is {tokens} tokens, over the model's {limit}-token context {how}"
        )
    return kept, dropped, tokens
