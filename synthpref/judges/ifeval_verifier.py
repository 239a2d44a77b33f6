"""``ifeval_verifier``: IFEval's verifiable instructions, checked by IFEval's own code.

Records carry IFEval's constraint fields (as ``google/IFEval`` and the benchmark's
``input_data.jsonl`` have them): ``instruction_id_list`` (e.g. ``punctuation:no_comma``) and
``kwargs``, one dict per instruction (e.g. ``{"relation": "at least", "num_words": 300}``). Each
candidate is checked against the user's final message by lm-eval's copy of Google's reference
checkers (:mod:`synthpref.verifiers.ifeval`), so a score means what it means on the benchmark.

This stage reads and validates the fields (a record that cannot be checked fails its judgments
naming the record and the field); the checks run in worker processes, where the reference is
imported once per process.
"""

from __future__ import annotations

import hashlib
import importlib.util
from typing import Any, ClassVar

from pydantic import Field

from synthpref.judges.units import Skip, split_turns
from synthpref.judges.verifier import Verifier, VerifierParams, metadata_field
from synthpref.records import Record
from synthpref.stages.base import Stage
from synthpref.stages.registry import register_stage
from synthpref.verifiers.ifeval import (
    EXTRA_MODULES,
    INSTALL_HINT,
    NLTK_DATA,
    Level,
    Mode,
    check_ifeval,
)


class IFEvalParams(VerifierParams):
    instructions_field: str = Field(
        "instruction_id_list",
        min_length=1,
        description="metadata field with the list of IFEval instruction ids "
        "(e.g. 'punctuation:no_comma')",
    )
    kwargs_field: str = Field(
        "kwargs",
        min_length=1,
        description="metadata field with one dict of arguments per instruction, in the same order "
        "({} for an instruction that takes none)",
    )
    level: Level = Field(
        "prompt",
        description="the score: 'prompt' = 1.0 when every instruction is followed, else 0.0; "
        "'instruction' = the fraction of instructions followed (all four numbers are in scores)",
    )
    mode: Mode = Field(
        "strict",
        description="'strict' checks the response as written; 'loose' also passes an instruction "
        "when the response follows it after dropping '*' markup or its first or last line",
    )


def _malformed(record: Record, field: str, problem: str, stage: str) -> Skip:
    return Skip(
        f"record {record.id!r} (source row {record.source_row}) field {field!r}: {problem}; "
        f"stage {stage!r} cannot check its responses",
        counter="malformed_field",
    )


@register_stage
class IFEvalVerifier(Verifier):
    """IFEval instruction following, strict or loose, prompt or instruction level."""

    type_name = "ifeval_verifier"
    Params: ClassVar[type[IFEvalParams]] = IFEvalParams
    params: IFEvalParams
    check_fn = check_ifeval
    libraries = ("lm-eval", "nltk", "langdetect")

    def check(self, previous: list[Stage]) -> list[str]:
        problems = super().check(previous)
        missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            problems.append(
                "ifeval_verifier runs IFEval's reference checkers from lm-eval; not installed: "
                f"{', '.join(missing)}. Install them with: {INSTALL_HINT}"
            )
        return problems

    def fingerprint(self) -> dict[str, Any]:
        """The libraries' versions, and the sentence tokenizer's tables (they decide sentence
        counts)."""
        digest = hashlib.sha256()
        for path in sorted(NLTK_DATA.rglob("*")):
            if path.is_file() and path.suffix != ".md":
                digest.update(path.relative_to(NLTK_DATA).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
        return {**super().fingerprint(), "nltk_data": digest.hexdigest()}

    def spec(self, record: Record) -> dict[str, Any]:
        p = self.params

        def malformed(field: str, problem: str) -> Skip:
            return _malformed(record, field, problem, self.name)

        what = "IFEval instruction ids"
        ids = metadata_field(record, p.instructions_field, stage=self.name, what=what)
        kwargs = metadata_field(
            record, p.kwargs_field, stage=self.name, what="one IFEval kwargs dict per instruction"
        )
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise malformed(
                p.instructions_field, f"expected a list of instruction ids, got {ids!r}"
            )
        if not isinstance(kwargs, list):
            raise malformed(
                p.kwargs_field, f"expected a list of dicts, got {type(kwargs).__name__}"
            )
        if len(kwargs) != len(ids):
            raise malformed(
                p.kwargs_field,
                f"{len(kwargs)} kwargs dicts for {len(ids)} instructions in "
                f"{p.instructions_field!r}; each instruction needs its own ({{}} for none)",
            )
        for i, kw in enumerate(kwargs):
            if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
                raise malformed(
                    f"{p.kwargs_field}[{i}]",
                    f"expected a dict of arguments for {ids[i]!r}, got {kw!r}",
                )
        final = split_turns(record)[1]
        if final is None:
            raise malformed("prompt", "the prompt does not end with a user message")
        return {
            "record": record.id,
            "source_row": record.source_row,
            "prompt": final,
            "instruction_id_list": list(ids),
            "kwargs": [dict(kw) for kw in kwargs],
            "level": p.level,
            "mode": p.mode,
            "instructions_field": p.instructions_field,
            "kwargs_field": p.kwargs_field,
        }
