"""The self-preference warning: a judge whose model also wrote the candidates it judges."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from synthpref.stages.base import Stage


def self_preference_warnings(stages: Sequence[Stage], models: dict[str, Any]) -> list[str]:
    """Warn where a judge stage uses a model that also generated the candidates it judges.

    LLM judges rate their own outputs higher than other models' outputs of equal quality
    (self-preference bias). Models are compared by what they run (``display_name()`` of the spec,
    e.g. the weights' name), not by their recipe names, so the same weights under two system prompts
    count as one model. Works for every judge stage, built in or plugged in, since it only reads
    ``kind`` and ``models_used()``.
    """
    warnings = []
    generated: dict[str, list[str]] = {}
    for i, stage in enumerate(stages):
        used = [m for m in stage.models_used() if m in models]
        if stage.kind == "generator":
            for m in used:
                generated.setdefault(models[m].display_name(), []).append(m)
        elif stage.kind == "judge":
            for m in used:
                same = generated.get(models[m].display_name())
                if same:
                    names = ", ".join(repr(n) for n in dict.fromkeys(same))
                    warnings.append(
                        f"stages[{i}] ({stage.name}): judge model {m!r} runs "
                        f"{models[m].display_name()}, which also generated candidates (as {names}); "
                        "judges tend to prefer their own outputs (self-preference bias). Prefer a "
                        "different judge model, or a jury of several."
                    )
    return warnings
