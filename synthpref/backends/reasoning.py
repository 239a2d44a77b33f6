"""Reasoning models' text split into the reasoning and the answer.

Local reasoning models (DeepSeek-R1 distills, Qwen3, ...) write their reasoning inline, as
``<think>reasoning</think>answer``. The transformers and vLLM backends hand every generated text to
:func:`split_reasoning` before building a :class:`~synthpref.backends.types.Completion`, so that
``Completion.text`` is the answer alone (what judges read and datasets export) and
``Completion.reasoning`` the reasoning. OpenAI-compatible servers return the reasoning apart already
(``reasoning_content`` / ``reasoning``), read in ``openai_backend.py``.

The rule does not depend on the model spec: a text is split only when it starts with ``<think>``
(leading whitespace allowed). A closed block gives its inner text as the reasoning and what follows
``</think>`` (leading whitespace removed) as the answer; an unclosed one (the reply was cut by
``max_tokens`` while reasoning) is all reasoning and an empty answer. Any other text is returned as
it is, with no reasoning, even when it holds the tags further in.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def split_reasoning(text: str) -> tuple[str, str | None]:
    """``(answer, reasoning)`` of a generated text; ``(text, None)`` when it does not start with
    ``<think>``."""
    body = text.lstrip()
    if not body.startswith(OPEN):
        return text, None
    body = body[len(OPEN) :]
    end = body.find(CLOSE)
    if end < 0:
        return "", body.strip()
    return body[end + len(CLOSE) :].lstrip(), body[:end].strip()
