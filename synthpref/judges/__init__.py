"""The judge plugin API: everything a custom judge imports comes from here.

A judge that asks a model subclasses :class:`Judge` and writes a ``prompt`` and :meth:`Judge.parse`
(see README "Custom judges" and docs/custom-judges.md); one that computes scores otherwise subclasses
:class:`JudgeStage` and writes ``process``. The shipped judges' reply parsers
(ratings, five-level verdicts, YES/NO) are here for judges that ask in the same forms. The names below are the stable surface: a test imports a
complete judge from this module alone.
"""

from synthpref.judges.asking import Answer, JudgeParams, ask_until_parsed, judge_request
from synthpref.judges.base import (
    Ask,
    Form,
    Judge,
    JudgeStage,
    Skip,
    Unit,
    Verdict,
    instruction,
)
from synthpref.judges.checklist import parse_yes_no
from synthpref.judges.pairwise import Choice, parse_five_level
from synthpref.judges.parsing import ParseError, expected_rating, json_object, parse_rating
from synthpref.records import Candidate, Judgment, Record

__all__ = [
    "Answer",
    "Ask",
    "Candidate",
    "Choice",
    "Form",
    "Judge",
    "JudgeParams",
    "JudgeStage",
    "Judgment",
    "ParseError",
    "Record",
    "Skip",
    "Unit",
    "Verdict",
    "ask_until_parsed",
    "expected_rating",
    "instruction",
    "json_object",
    "judge_request",
    "parse_five_level",
    "parse_rating",
    "parse_yes_no",
]
