"""``math_verifier``: each candidate's final answer checked against the record's reference answer.

The checking is :mod:`synthpref.verifiers.math` (Hugging Face's math-verify); this stage only says
where the reference lives (``answer_field`` of the record's metadata, i.e. a column of the source)
and which comparison options apply. A record without a reference gets failed judgments naming the
record and the field; the run goes on.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from synthpref.judges.units import Skip
from synthpref.judges.verifier import Verifier, VerifierParams, metadata_field
from synthpref.records import Record
from synthpref.stages.registry import register_stage
from synthpref.verifiers import math as math_check


class MathVerifierParams(VerifierParams):
    answer_field: str = Field(
        "answer",
        min_length=1,
        description="record metadata field (source column) holding the reference answer: a "
        "number, or a string such as '42', '1,000', '\\frac{1}{2}', '[1, 2)'",
    )
    float_rounding: int = Field(
        math_check.FLOAT_ROUNDING,
        ge=0,
        le=100,
        description="decimal places floats are rounded to before comparing (math-verify's "
        "float_rounding)",
    )
    numeric_precision: int = Field(
        math_check.NUMERIC_PRECISION,
        ge=1,
        le=1000,
        description="significant digits of numeric evaluation when comparing expressions "
        "(math-verify's numeric_precision)",
    )
    strict: bool = Field(
        math_check.STRICT,
        description="variables must match by name and sets are not tuples; false matches "
        "variables by position and lets a set equal a tuple (math-verify's strict)",
    )


@register_stage
class MathVerifier(Verifier):
    """Scores 1 when a candidate's final answer is equivalent to the reference answer, else 0."""

    type_name = "math_verifier"
    Params = MathVerifierParams
    params: MathVerifierParams
    execution = "processes"
    check_fn = math_check.check
    libraries: ClassVar[tuple[str, ...]] = ("math-verify", "latex2sympy2_extended")

    def spec(self, record: Record) -> dict[str, Any]:
        field = self.params.answer_field
        value = metadata_field(record, field, stage=self.name, what="the reference answer")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise Skip(
                f"record {record.id!r} (source row {record.source_row}) field {field!r} holds a "
                f"{type(value).__name__} ({value!r}); stage {self.name!r} needs a reference answer "
                "that is a string or a number",
                counter="bad_reference",
            )
        return {
            "reference": value,
            "float_rounding": self.params.float_rounding,
            "numeric_precision": self.params.numeric_precision,
            "strict": self.params.strict,
        }
