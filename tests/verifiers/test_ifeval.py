"""IFEval checks: verdicts worked out by hand, and the adapter against lm-eval's reference code.

The hand-checked cases say what IFEval's rules mean without asking lm-eval; the comparison on
IFEval's prompts shows that the adapter (record fields -> spec -> the reference's InputExample,
one instruction at a time) gives exactly the verdicts of calling the reference on the whole row: by
default on a slice that exercises every part of the adapter, all 541 rows under ``-m soak``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval", reason="the ifeval extra is not installed")

from synthpref.judges.ifeval_verifier import IFEvalParams, IFEvalVerifier
from synthpref.recipes.schema import SourceSpec
from synthpref.sources import read_rows, rows_to_records
from synthpref.verifiers.ifeval import NLTK_DATA, check_ifeval, reference

REPO = Path(__file__).resolve().parents[2]
SHARED_IFEVAL = REPO.parent / "shared" / "evaldata" / "prompts" / "ifeval.jsonl"


def spec(ids, kwargs, *, prompt="Follow the instructions.", level="prompt", mode="strict"):
    return {
        "record": "r1",
        "source_row": 7,
        "prompt": prompt,
        "instruction_id_list": ids,
        "kwargs": kwargs,
        "level": level,
        "mode": mode,
        "instructions_field": "instruction_id_list",
        "kwargs_field": "kwargs",
    }


def verdicts(ids, kwargs, response, **kw):
    check = check_ifeval(spec(ids, kwargs, **kw), response)
    assert check.error is None, check.error
    return [(r["strict"], r["loose"]) for r in check.evidence["instructions"]]


# verdicts worked out by hand -----------------------------------------------------------------

LOWER = "this whole answer is written in lower case letters because the task asked for it."
FOUR_WORDS = "one two three four"


@pytest.mark.parametrize(
    ("iid", "kwargs", "response", "expected"),
    [
        ("punctuation:no_comma", {}, "Red and blue are colours.", True),
        ("punctuation:no_comma", {}, "Red, blue.", False),
        ("change_case:english_lowercase", {}, LOWER, True),
        ("change_case:english_lowercase", {}, LOWER.capitalize(), False),
        (
            "length_constraints:number_words",
            {"relation": "at least", "num_words": 4},
            FOUR_WORDS,
            True,
        ),
        (
            "length_constraints:number_words",
            {"relation": "at least", "num_words": 5},
            FOUR_WORDS,
            False,
        ),
        (
            "length_constraints:number_words",
            {"relation": "less than", "num_words": 5},
            FOUR_WORDS,
            True,
        ),
        ("detectable_format:json_format", {}, '{"colour": "red", "n": [1, 2]}', True),
        ("detectable_format:json_format", {}, '```json\n{"colour": "red"}\n```', True),
        ("detectable_format:json_format", {}, "colour: red", False),
        (
            "startend:end_checker",
            {"end_phrase": "Any other questions?"},
            "Done. Any other questions?",
            True,
        ),
        (
            "startend:end_checker",
            {"end_phrase": "Any other questions?"},
            "Any other questions? Done.",
            False,
        ),
        # "Mr." is an abbreviation in the English Punkt tables: three sentences, not four
        (
            "length_constraints:number_sentences",
            {"relation": "at least", "num_sentences": 3},
            "Hello there Mr. Smith. How are you? Fine.",
            True,
        ),
        (
            "length_constraints:number_sentences",
            {"relation": "at least", "num_sentences": 4},
            "Hello there Mr. Smith. How are you? Fine.",
            False,
        ),
    ],
)
def test_hand_checked_verdicts(iid, kwargs, response, expected):
    assert verdicts([iid], [kwargs], response) == [(expected, expected)]


def test_loose_forgives_a_trailing_line_and_markup_that_strict_does_not():
    end = {"end_phrase": "Any other questions?"}
    assert verdicts(["startend:end_checker"], [end], "Done. Any other questions?\nBye") == [
        (False, True)
    ]
    # markdown emphasis after the phrase: loose reading also tries the response with '*' removed
    assert verdicts(["startend:end_checker"], [end], "Done. Any other questions?**") == [
        (False, True)
    ]


def test_scores_by_level_and_mode():
    ids = ["punctuation:no_comma", "startend:end_checker"]
    kwargs = [{}, {"end_phrase": "Any other questions?"}]
    # loose reading passes an instruction when any of the response, it without its first line, its
    # last line, both, each with '*' removed, passes: every variant here keeps a comma, and the one
    # without the last line ends with the phrase
    response = "Red, blue.\nGreen, white. Any other questions?\nBye"
    expected = {
        "prompt_strict": 0.0,
        "instruction_strict": 0.0,
        "prompt_loose": 0.0,
        "instruction_loose": 0.5,
    }
    for level in ("prompt", "instruction"):
        for mode in ("strict", "loose"):
            check = check_ifeval(spec(ids, kwargs, level=level, mode=mode), response)
            assert check.scores == expected
            assert check.score == expected[f"{level}_{mode}"]
    check = check_ifeval(
        spec(ids, kwargs, mode="loose"), "Red blue.\nGreen white. Any other questions?\nBye"
    )
    assert check.score == 1.0 and check.passed
    assert check.scores == {k: 1.0 for k in expected} | {
        "prompt_strict": 0.0,
        "instruction_strict": 0.5,
    }


def test_the_evidence_lists_each_instruction():
    kwargs = [{}, {"relation": "at least", "num_words": 3}]
    check = check_ifeval(
        spec(["punctuation:no_comma", "length_constraints:number_words"], kwargs), "a, b"
    )
    assert check.evidence == {
        "instructions": [
            {"id": "punctuation:no_comma", "kwargs": {}, "strict": False, "loose": False},
            {
                "id": "length_constraints:number_words",
                "kwargs": kwargs[1],
                "strict": False,
                "loose": False,
            },
        ]
    }


def test_an_unknown_instruction_fails_naming_record_field_and_id():
    check = check_ifeval(spec(["punctuation:no_comma", "no_such:check"], [{}, {}]), "ok")
    assert check.score is None and check.counters == ("unknown_instruction",)
    assert "record 'r1'" in check.error and "'instruction_id_list'[1]" in check.error
    assert "'no_such:check'" in check.error


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"relation": "at least"}, "needs 'num_words'"),
        ({"relation": "at least", "num_words": 0}, "needs 'num_words'"),
        ({"relation": "at least", "num_words": 3, "colour": "red"}, "no argument 'colour'"),
    ],
)
def test_arguments_the_reference_would_draw_at_random_or_refuse_fail_the_check(kwargs, says):
    check = check_ifeval(spec(["length_constraints:number_words"], [kwargs]), "a b c d")
    assert check.score is None and check.counters == ("bad_kwargs",)
    assert "'kwargs'[0]" in check.error and says in check.error


def test_a_value_the_reference_would_replace_at_random_fails_the_check():
    # IFEval's letter count takes one letter a-z; for anything else it draws a random letter
    kwargs = {"letter": "#", "let_frequency": 2, "let_relation": "at least"}
    check = check_ifeval(spec(["keywords:letter_frequency"], [kwargs]), "## #")
    assert check.score is None and check.counters == ("bad_kwargs",)
    assert "'kwargs'[0]" in check.error and "letter='#'" in check.error


def test_values_the_checker_only_normalises_are_accepted():
    letter = {"letter": "Q", "let_frequency": 2, "let_relation": "at least"}
    assert verdicts(["keywords:letter_frequency"], [letter], "quick quiz") == [(True, True)]
    end = {"end_phrase": " Any Other Questions? "}
    assert verdicts(["startend:end_checker"], [end], "Done. any other questions?") == [(True, True)]
    words = {"forbidden_words": ["red", "blue", "red"]}
    assert verdicts(["keywords:forbidden_words"], [words], "Green.") == [(True, True)]


def test_arguments_given_as_null_are_left_out_as_the_reference_does():
    kwargs = {"relation": "at least", "num_words": 3, "num_highlights": None, "keywords": None}
    assert verdicts(["length_constraints:number_words"], [kwargs], "a b c") == [(True, True)]


def test_a_checker_that_raises_fails_the_check_with_its_error():
    # a number where the reference expects the prompt's text: its checker calls .strip() on it
    check = check_ifeval(spec(["combination:repeat_prompt"], [{"prompt_to_repeat": 5}]), "x")
    assert check.score is None and check.counters == ("checker_error",)
    assert "'combination:repeat_prompt' raised AttributeError" in check.error
    assert "record 'r1'" in check.error


def test_the_vendored_punkt_tables_are_found_and_match_their_provenance():
    import nltk

    reference()
    found = Path(nltk.data.find("tokenizers/punkt_tab/english/"))
    assert found.resolve() == (NLTK_DATA / "tokenizers/punkt_tab/english").resolve()
    provenance = (found / "PROVENANCE.md").read_text()
    listed = dict(re.findall(r"\| `([\w.]+)` \| \d+ \| `([0-9a-f]{64})` \|", provenance))
    files = {p.name for p in found.iterdir() if p.suffix != ".md"}
    assert set(listed) == files and len(files) == 4
    for name, digest in listed.items():
        assert hashlib.sha256((found / name).read_bytes()).hexdigest() == digest


def test_synthpref_imports_no_lm_eval_and_the_reference_never_downloads(tmp_path):
    """In a fresh interpreter with no NLTK data of its own: importing the stage leaves lm-eval
    unimported, and the reference then counts sentences from the vendored tables without any
    download."""
    script = (
        "import sys, nltk\n"
        "nltk.download = lambda *a, **k: sys.exit('nltk.download was called')\n"
        "import synthpref.judges.ifeval_verifier\n"
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported with synthpref'\n"
        "from synthpref.verifiers.ifeval import reference\n"
        "reference()\n"
        "from lm_eval.tasks.ifeval import instructions_util as u\n"
        "print(u.count_sentences('Hello there Mr. Smith. How are you? Fine.'))\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "NLTK_DATA": str(tmp_path / "none")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3"


# the adapter against the reference on IFEval's own prompts ------------------------------------

PARAGRAPHS = [
    "<<A Title>>\n\nThe first paragraph has two sentences. Here is the second.\n\n***\n\n"
    "Another paragraph, with a comma.\n\nP.S. A postscript.",
    "* first point\n* second point\n* third point\n\nIs there anything else I can help with?",
    '"everything here is wrapped in double quotes, in lower case and written in english."',
    "SECTION 1\nThe first section is about *the weather* and *the sea*.\n"
    "SECTION 2\nThe second one names [name] and [address].",
    "My answer is yes.",
    "Dies ist ein kurzer Text auf Deutsch. Er hat zwei Saetze.",
    "THIS WHOLE RESPONSE IS WRITTEN IN CAPITAL LETTERS BECAUSE THE TASK ASKED FOR IT IN ENGLISH.",
    "Answer one is short.\n******\nAnswer two is short too.",
    '{"answer": "a json object", "items": [1, 2, 3]}',
    "Day 1\nWe walk.\nDay 2\nWe rest. P.P.S remember the map.",
]


def responses(i: int, row: dict) -> list[str]:
    """Deterministic responses to row ``i``: its prompt as is, upper-cased, lower-cased without
    commas, wrapped in fenced JSON, a fixed paragraph, the prompt repeated before one, and one
    followed by the row's own argument strings (keywords, end phrases, markers)."""
    p = row["prompt"]
    words = [
        " ".join(v) if isinstance(v, list) else str(v)
        for kw in row["kwargs"]
        for k, v in kw.items()
        if k != "prompt_to_repeat"
    ]
    n = len(PARAGRAPHS)
    return [
        p,
        p.upper(),
        p.lower().replace(",", ""),
        f"```json\n{json.dumps({'prompt': p})}\n```",
        PARAGRAPHS[i % n],
        f"{p}\n\n{PARAGRAPHS[(i + 3) % n]}",
        f"{PARAGRAPHS[(i + 5) % n]}\n{' '.join(words)}",
    ]


def draws_at_random(registry: dict, row: dict) -> bool:
    """Whether building one of the row's checkers from its kwargs, under different random seeds,
    gives different arguments (the reference replaced a given value with a random one)."""
    state = random.getstate()
    try:
        for iid, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            seen = set()
            for seed in range(8):
                random.seed(seed)
                built = registry[iid](iid)
                built.build_description(**{k: v for k, v in kwargs.items() if v})
                seen.add(repr(built.get_instruction_args()))
            if len(seen) > 1:
                return True
        return False
    finally:
        random.setstate(state)


#: rows per instruction id in the default comparison, besides rows that add an argument form
PER_INSTRUCTION = 3
#: arguments that take one of a handful of values, each value a branch of its checker
FEW_VALUED = (
    "relation",
    "capital_relation",
    "let_relation",
    "postscript_marker",
    "section_spliter",
)


def _needs_normalising(value) -> bool:
    if isinstance(value, str):
        return value != value.strip().lower()
    if isinstance(value, list):
        return [str(v) for v in value] != sorted({str(v).strip().lower() for v in value})
    return False


def argument_forms(row: dict) -> set[tuple]:
    """What of the adapter a row exercises: how many instructions it splits the row into, each
    instruction with the set of arguments it is given (checked against the checker's own), each
    value of an argument that picks a branch of its checker, and each argument the adapter must
    normalise before comparing it with what the checker kept (case, spaces, list order)."""
    forms: set[tuple] = {("instructions", len(row["instruction_id_list"]))}
    for iid, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
        forms.add((iid, tuple(sorted(k for k, v in kwargs.items() if v))))
        for key, value in kwargs.items():
            if key in FEW_VALUED:
                forms.add((iid, key, value))
            if _needs_normalising(value):
                forms.add((iid, key, "normalised"))
    return forms


def comparison_slice(rows: list[dict], at_random: set[int]) -> list[int]:
    """Indices of the rows the default comparison runs on, in file order: a row is taken when it
    holds an instruction id seen in fewer than PER_INSTRUCTION taken rows, adds an argument form
    (:func:`argument_forms`) no taken row has, or is in ``at_random`` (the rows whose arguments
    the reference would draw at random, which the adapter must refuse)."""
    taken: list[int] = []
    seen: set[tuple] = set()
    per_id: Counter = Counter()
    for i, row in enumerate(rows):
        forms = argument_forms(row)
        if (
            forms - seen
            or any(per_id[iid] < PER_INSTRUCTION for iid in row["instruction_id_list"])
            or i in at_random
        ):
            taken.append(i)
            seen |= forms
            per_id.update(row["instruction_id_list"])
    return taken


@pytest.mark.parametrize("subset", ["slice", pytest.param("all", marks=pytest.mark.soak)])
def test_the_adapter_gives_the_references_verdicts_on_the_ifeval_prompts(subset):
    """Each row's verdicts are compared on their own, so a row adds to the comparison only through
    what of the adapter it exercises. The default slice (60 of the 541 rows, about a tenth of the
    time: most of it is langdetect's, 31 rows ask for a response language) holds every instruction
    id in at least three rows, every argument form (:func:`argument_forms`), rows of one, two and
    three instructions, and both rows the reference would give random arguments; its responses are
    the ones the full run gives those rows. ``-m soak`` compares all 541."""
    if not SHARED_IFEVAL.is_file():
        pytest.skip(f"the shared IFEval prompts are not at {SHARED_IFEVAL} (../shared is absent)")
    utils, registry = reference()
    source = SourceSpec(path=str(SHARED_IFEVAL), id_field="id")
    base = SimpleNamespace(resolve=Path)
    raw = [row for _, row in read_rows(source, base)]
    records, errors = rows_to_records(read_rows(source, base), source)
    assert not errors and len(records) == len(raw) == 541
    at_random = [i for i, row in enumerate(raw) if draws_at_random(registry, row)]
    compared = comparison_slice(raw, set(at_random)) if subset == "slice" else range(len(raw))
    assert set(at_random) <= set(compared) and len(compared) == (60 if subset == "slice" else 541)
    stage = IFEvalVerifier("ifeval", IFEvalParams())
    outcomes: dict[str, Counter] = defaultdict(Counter)
    chance = []
    for i in compared:
        record, row = records[i], raw[i]
        ours = stage.spec(record)
        refused = check_ifeval(ours, row["prompt"]).error
        if refused is not None:
            assert "so its verdict would be chance" in refused, refused
            chance.append(row)
            continue
        inp = utils.InputExample(
            key=int(row["id"].removeprefix("ifeval-")),
            instruction_id_list=row["instruction_id_list"],
            prompt=row["prompt"],
            kwargs=row["kwargs"],
        )
        for response in responses(i, row):
            check = check_ifeval(ours, response)
            assert check.error is None, check.error
            got = check.evidence["instructions"]
            strict = utils.test_instruction_following_strict(inp, response)
            loose = utils.test_instruction_following_loose(inp, response)
            where = (row["id"], response)
            assert [r["strict"] for r in got] == strict.follow_instruction_list, where
            assert [r["loose"] for r in got] == loose.follow_instruction_list, where
            assert check.scores["prompt_strict"] == float(strict.follow_all_instructions)
            assert check.scores["prompt_loose"] == float(loose.follow_all_instructions)
            for iid, s, lo in zip(
                row["instruction_id_list"],
                strict.follow_instruction_list,
                loose.follow_instruction_list,
                strict=True,
            ):
                outcomes[iid][("strict", s)] += 1
                outcomes[iid][("loose", lo)] += 1
    # refused rows are those whose verdict the reference leaves to chance (a letter count given
    # "#" or "!"), and only those
    assert len(chance) <= 2 and [row["id"] for row in chance] == [raw[i]["id"] for i in at_random]
    # not vacuous: the responses make most checkers say both yes and no (all but
    # nth_paragraph_first_word, which only a response built for its arguments would pass)
    both = [
        iid
        for iid, c in outcomes.items()
        if all(c[(mode, v)] > 0 for mode in ("strict", "loose") for v in (True, False))
    ]
    assert len(outcomes) == 25 and len(both) >= 22, sorted(set(outcomes) - set(both))
