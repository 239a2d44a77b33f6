"""Locating a message's tokens inside a chat-template rendering, the same way on every backend.

Scoring needs the log-probability of exactly the tokens of one message's content, as the model's own
chat template lays the conversation out. The message content is swapped for a sentinel, the
conversation is rendered, and the rendering is split around the sentinel: this finds the prefix (turn
header included) and the suffix (end-of-turn marker) for any template, including ones that render the
last turn differently. The joined text is then tokenized once, and the segment is the tokens whose
characters overlap the content. Backends are handed token ids, never text, so the transformers, vLLM
and OpenAI-compatible paths score the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from synthpref.backends.base import RequestError
from synthpref.backends.types import ScoreRequest

_SENTINEL = "\ue000synthpref-segment\ue001"


class SegmentError(RequestError, ValueError):
    """The request's conversation cannot be scored as asked (no token to score, over the context
    window): a fault of this request alone. Still a ValueError for callers that caught it as one."""


@dataclass(frozen=True)
class RenderedSegment:
    token_ids: list[int]
    start: int
    end: int
    truncated_tokens: int = 0


def render_segment(tokenizer, request: ScoreRequest, max_length: int | None) -> RenderedSegment:
    index = request.segment % len(request.messages)
    messages = [m.model_dump() for m in request.messages[: index + 1]]
    content = messages[index]["content"]
    messages[index]["content"] = _SENTINEL
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    parts = rendered.split(_SENTINEL)
    if len(parts) != 2:
        raise SegmentError("the chat template does not render message content verbatim")
    prefix, suffix = parts
    text = prefix + content + suffix
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets = enc["offset_mapping"]
    lo, hi = len(prefix), len(prefix) + len(content)
    inside = [i for i, (a, b) in enumerate(offsets) if b > lo and a < hi]
    if not inside:
        raise SegmentError("the scored message produced no tokens")
    start, end = inside[0], inside[-1] + 1
    if start == 0:
        raise SegmentError("the segment starts the sequence, so its first token has no context")
    if request.include_end_of_turn:
        if end >= len(ids):
            raise SegmentError("the chat template puts no end-of-turn token after this message")
        end += 1
    ids = ids[:end]
    cut = 0
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - max_length
        if request.truncation == "error" or cut >= start:
            raise SegmentError(
                f"the conversation is {len(ids)} tokens, over the model's context of {max_length}"
                + ("" if request.truncation == "error" else " even after dropping all context")
                + "; shorten it or set truncation: left"
            )
        ids = ids[cut:]
    return RenderedSegment(ids, start - cut, end - cut, cut)
