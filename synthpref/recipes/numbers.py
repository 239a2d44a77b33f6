"""Numbers in a recipe mean what they say: finite floats, whole ints of a size a machine can hold.

Pydantic on its own accepts ``temperature: .inf`` (NaN compares false with every bound, so ``ge=0``
lets it through too), turns ``n: 2.0`` or ``n: 1e24`` into ints and ``n: true`` into 1; each gives a
run whose cache, fingerprint or card says something other than what the author wrote. Every recipe
model (the recipe's own sections and every stage's parameters) derives from :class:`RecipeNumbers`.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

INT64 = 2**63


def _accepts(annotation: Any, kind: type) -> bool:
    if annotation is kind:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(annotation))
    return False


class RecipeNumbers(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _accepts(field.annotation, int):
            return value
        if isinstance(value, bool) and not _accepts(field.annotation, bool):
            raise ValueError(f"a whole number is expected, not {value!r}")
        if isinstance(value, float) and not _accepts(field.annotation, float):
            raise ValueError(f"a whole number is expected, not {value!r}")
        if isinstance(value, int) and not -INT64 <= value < INT64:
            raise ValueError(f"{value} is out of range (at most {INT64 - 1})")
        return value
