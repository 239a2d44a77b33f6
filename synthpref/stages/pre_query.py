"""Magpie's pre-query: the text of a model's chat template up to where a user message's content
starts, found by rendering a placeholder user message with the model's own template.

``[system?, {"role": "user", "content": SENTINEL}]`` is rendered (no generation prompt) and cut at the
sentinel. What precedes it is the pre-query an instruct model is asked to continue: it then writes
what a user would say. What follows it, up to the end of its line, is the template's end of a user
turn (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3): the query ends there, so it serves as a
stop string beside the model's EOS token.

A template that does not show the placeholder, shows nothing before it (it renders bare content, so
the model would see no sign that a user is speaking), or leaves out the system message that should
steer the queries cannot be used: :class:`PreQueryError` says which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from synthpref.errors import ConfigError
from synthpref.records import Message

#: the placeholder user content: letters, digits and underscores only, so templates that trim or
#: escape content leave it as it is
SENTINEL = "SYNTHPREF_MAGPIE_USER_QUERY_7E3A"

#: changes whenever the rule below changes what a model is sent (it joins the stage fingerprint)
RULE_VERSION = 1

Render = Callable[[Sequence[Message]], str]


class PreQueryError(ConfigError, ValueError):
    """The chat template has no recognisable start of a user turn (or drops the system message):
    the recipe's choice of model cannot do Magpie."""


@dataclass(frozen=True)
class PreQuery:
    text: str
    """Everything the template renders before a user message's content."""
    end_of_turn: str
    """The template's text right after a user message's content, up to the end of its line ("":
    none; the model's EOS token alone ends a query)."""
    system_prompt: str | None

    @property
    def stop(self) -> list[str]:
        return [self.end_of_turn] if self.end_of_turn else []


def pre_query(render: Render, system_prompt: str | None = None) -> PreQuery:
    """The pre-query of the template behind ``render`` (messages -> text, without a generation
    prompt), after ``system_prompt`` as a system message when given."""
    messages = [Message(role="user", content=SENTINEL)]
    if system_prompt:
        messages.insert(0, Message(role="system", content=system_prompt))
    text = render(messages)
    at = text.find(SENTINEL)
    if at < 0:
        raise PreQueryError(
            "the chat template does not show a user message's content, so there is no place where "
            "a user's query starts"
        )
    before, after = text[:at], text[at + len(SENTINEL) :]
    marker = before
    if system_prompt:
        shown = system_prompt.strip()
        if shown not in before:
            raise PreQueryError(
                "the chat template leaves the system message out, so system_prompt cannot steer "
                "the queries (leave it unset, or use a model whose template shows system messages)"
            )
        marker = before.replace(shown, "", 1)
    if not marker.strip():
        raise PreQueryError(
            "the chat template renders nothing before a user message's content (no user turn "
            f"start such as '<|im_start|>user'; it rendered {_shown(text)!r}), so the model would not "
            "know a user is speaking; use an instruct model with a chat template that marks turns"
        )
    end = after.lstrip().split("\n", 1)[0].strip()
    return PreQuery(text=before, end_of_turn=end, system_prompt=system_prompt or None)


def _shown(text: str, limit: int = 80) -> str:
    text = text.replace(SENTINEL, "{user content}")
    return text if len(text) <= limit else text[:limit] + "..."
