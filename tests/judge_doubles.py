"""Deterministic stand-ins for a judge model, for tests whose right answer must be known exactly.

``ScriptedBackend`` is a real :class:`~synthpref.backends.base.Backend`: requests go through the model
client, the cache and the judges' parsing and retry logic as with any model; only the text comes from
a Python function instead of weights. ``ScriptedSpec`` makes it usable from a recipe
(``backend: scripted``, ``policy: always_a``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import ClassVar

from synthpref.backends.base import Backend, Capability, OnGenerated
from synthpref.backends.specs import ModelSpec, register_backend
from synthpref.backends.types import Completion, GenerationRequest, GenerationResult

Policy = Callable[[GenerationRequest], str]


def prompt_text(request: GenerationRequest) -> str:
    return "\n".join(m.content for m in request.messages if m.role != "assistant")


def prefill(request: GenerationRequest) -> str:
    last = request.messages[-1]
    return last.content if request.continue_final_message and last.role == "assistant" else ""


def section(text: str, name: str) -> str:
    m = re.search(rf"\[{name}\]\n(.*?)\n\[End of {name.lower()}\]", text, re.S | re.I)
    assert m, f"no [{name}] section in the prompt"
    return m.group(1)


def candidate_text(request: GenerationRequest) -> str:
    """Generation requests (not judge prompts): a short or long answer by system prompt."""
    system = next((m.content for m in request.messages if m.role == "system"), "")
    user = request.messages[-1].content
    if "long" in system.lower():
        return f"A long and detailed answer to: {user} " + "with many more words " * 10
    return f"Short answer to: {user}"


def is_judge_prompt(request: GenerationRequest) -> bool:
    return "[Instruction]" in prompt_text(request)


def verdict_reply(label: str, request: GenerationRequest) -> str:
    """Reply with ``label`` in the form the request asked for (JSON, pre-filled, or free text)."""
    if request.json_schema is not None:
        return json.dumps({"reasoning": "scripted", "verdict": label})
    if prefill(request).startswith("Verdict"):
        return f" {label}\nReasoning: scripted"
    return f"Reasoning: scripted.\nVerdict: {label}"


def always_a(request: GenerationRequest) -> str:
    """A judge with total position bias: whatever it reads, response A is much better."""
    if not is_judge_prompt(request):
        return candidate_text(request)
    if "[RESULT]" in prompt_text(request):  # Prometheus relative
        return " A\nFeedback: scripted" if prefill(request) else "Feedback: scripted [RESULT] A"
    return verdict_reply("A++", request)


def prefers_longer(request: GenerationRequest) -> str:
    """A position-consistent judge: the longer response is slightly better (a length-biased judge)."""
    if not is_judge_prompt(request):
        return candidate_text(request)
    text = prompt_text(request)
    a, b = section(text, "Response A"), section(text, "Response B")
    if "[RESULT]" in text:
        winner = "A" if len(a) >= len(b) else "B"
        return f" {winner}" if prefill(request) else f"Feedback: scripted [RESULT] {winner}"
    label = "A=B" if len(a) == len(b) else ("A+" if len(a) > len(b) else "B+")
    return verdict_reply(label, request)


def garbage(request: GenerationRequest) -> str:
    if not is_judge_prompt(request):
        return candidate_text(request)
    return " I cannot decide, both are nice."


POLICIES: dict[str, Policy] = {
    "always_a": always_a,
    "prefers_longer": prefers_longer,
    "garbage": garbage,
}


class ScriptedBackend(Backend):
    capabilities: ClassVar[frozenset[Capability]] = frozenset({"generate", "prefill"})

    def __init__(
        self, policy: Policy | str, extra: Sequence[Capability] = (), name: str | None = None
    ) -> None:
        self.policy = POLICIES[policy] if isinstance(policy, str) else policy
        self._name = name or (policy if isinstance(policy, str) else policy.__name__)
        self._caps = frozenset(self.capabilities | set(extra))
        self.requests: list[GenerationRequest] = []

    @property
    def identity(self) -> str:
        return f"scripted:{self._name}:{sorted(self._caps)}"

    def supports(self, capability: Capability) -> bool:
        return capability in self._caps

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        out = []
        for i, request in enumerate(requests):
            self.requests.append(request)
            text = self.policy(request)
            result = GenerationResult(
                completions=[
                    Completion(text=text, finish_reason="stop", completion_tokens=len(text.split()))
                ],
                prompt_tokens=len(prompt_text(request).split()),
            )
            if on_result:
                on_result(i, result)
            out.append(result)
        return out


@register_backend
class ScriptedSpec(ModelSpec):
    """A scripted test double of a model (tests only)."""

    backend_name: ClassVar[str] = "scripted"
    backend: str = "scripted"
    policy: str = "always_a"
    model: str = "scripted"

    def build(self) -> Backend:
        return ScriptedBackend(self.policy)

    def capabilities(self) -> frozenset[str]:
        return ScriptedBackend.capabilities

    def display_name(self) -> str:
        return f"scripted-{self.policy}"


def client_for(backend: Backend, name: str = "judge", system_prompt: str | None = None):
    """A model client over ``backend`` with no cache, as the executor would build it."""
    from synthpref.backends.client import ModelClient

    spec = ModelSpec(backend="test", system_prompt=system_prompt)
    return ModelClient(name, spec, backend, None)


def run_stage(stage, records, clients: dict):
    """Run one stage on records with the given clients (name -> ModelClient)."""
    import asyncio

    from synthpref.stages.base import StageContext

    stage.ctx = StageContext(clients)
    return asyncio.run(stage.process(records))
