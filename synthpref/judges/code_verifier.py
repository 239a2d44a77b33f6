"""``code_verifier``: each candidate's Python code run against the tests its record carries.

A verifier judge (:mod:`synthpref.judges.verifier`): no model is asked; the score is the fraction of
the record's tests the code passes (:mod:`synthpref.verifiers.code` for the accepted shapes of the
tests field and how code is found in a reply). Every program runs in
:mod:`synthpref.verifiers.sandbox`: its own interpreter, directory, session, resource limits and
no network, which keeps honest but buggy code from hanging the run or harming this machine by
accident, and is no defence against code written to do harm. Running model-written code is
therefore opt-in: a recipe must say ``allow_code_execution: true``, and without it the recipe is
refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
from typing import Any, ClassVar, Literal

from pydantic import Field

from synthpref.judges.units import Skip
from synthpref.judges.verifier import Verifier, VerifierParams, metadata_field
from synthpref.records import Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.registry import register_stage
from synthpref.verifiers import code as code_checks
from synthpref.verifiers import sandbox
from synthpref.verifiers.code import MalformedTests, check_code, parse_tests

OPT_IN = (
    "code_verifier runs model-written code on this machine; set allow_code_execution: true to opt "
    "in (see README 'Verifiers')"
)


class CodeVerifierParams(VerifierParams):
    allow_code_execution: bool = Field(
        False,
        description="run the code candidates contain on this machine (isolated, limited, no "
        "network, but not a security sandbox): the recipe must opt in",
    )
    tests_field: str = Field(
        "tests",
        min_length=1,
        description="record metadata field holding the tests: assert statements, "
        "{input, output} cases, or {asserts, setup, stdio}",
    )
    timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="wall-clock limit of each program (all assert tests of a candidate run in one "
        "program; each stdio case is a program)",
    )
    test_timeout_seconds: float = Field(
        3.0, gt=0, le=600, description="time limit of each assert test, and of loading the code"
    )
    cpu_seconds: float | None = Field(
        None, gt=0, le=3600, description="CPU-time limit of each program; default: timeout_seconds"
    )
    memory_mb: int = Field(512, ge=64, le=1_048_576, description="address-space limit, in MB")
    max_output_bytes: int = Field(
        1_000_000,
        ge=1024,
        le=1_000_000_000,
        description="stdout and stderr kept per program; a program printing more is killed",
    )
    extract: Literal["last", "first", "all"] = Field(
        "last",
        description="which fenced code block of a reply is the code (python blocks first; "
        "'all' joins them); a reply without one is taken whole",
    )
    network: Literal["deny"] = Field(
        "deny",
        description="network access of the code: always denied (a network namespace where the "
        "kernel allows one, else an audit-hook guard)",
    )


@register_stage
class CodeVerifier(Verifier):
    """Scores each candidate by the fraction of its record's tests its code passes."""

    type_name = "code_verifier"
    Params: ClassVar[type[StageParams]] = CodeVerifierParams
    params: CodeVerifierParams
    execution = "threads"
    check_fn = check_code

    def check(self, previous: list[Stage]) -> list[str]:
        problems = super().check(previous)
        if not self.params.allow_code_execution:
            problems.append(OPT_IN)
        if os.name != "posix":
            problems.append(
                "code_verifier needs Linux or macOS: its sandbox uses POSIX resource limits and "
                "process groups"
            )
        return problems

    def fingerprint(self) -> dict[str, Any]:
        harness = hashlib.sha256((sandbox.BOOTSTRAP + code_checks.HARNESS).encode()).hexdigest()
        return {
            **super().fingerprint(),
            "python": platform.python_version(),
            "harness": harness[:16],
        }

    def spec(self, record: Record) -> dict[str, Any]:
        if not self.params.allow_code_execution:
            raise Skip(OPT_IN, counter="not_allowed")
        field = self.params.tests_field
        value = metadata_field(
            record, field, stage=self.name, what="the tests the code is run against"
        )
        try:
            tests = parse_tests(value)
        except MalformedTests as exc:
            raise Skip(
                f"record {record.id!r} (source row {record.source_row}) field {field!r} is "
                f"malformed: {exc}; stage {self.name!r} cannot check its responses",
                counter="malformed_field",
            ) from None
        p = self.params
        limits = sandbox.Limits(
            wall_seconds=p.timeout_seconds,
            cpu_seconds=p.cpu_seconds,
            memory_mb=p.memory_mb,
            max_output_bytes=p.max_output_bytes,
        )
        return {
            "tests": tests.as_dict(),
            "limits": dataclasses.asdict(limits),
            "test_seconds": min(p.test_timeout_seconds, p.timeout_seconds),
            "extract": p.extract,
            "network": "auto",
        }
