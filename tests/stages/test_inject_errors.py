"""inject_errors (RISE): which responses are edited, how each edit is kept or discarded and
counted, the origin and verdicts a kept edit carries, the constructed pairs it makes, the seeded
kind choice, recipe validation, a run through the executor on a scripted model, and
recipes/math_verified.yaml end to end on the embedded model.

The verifier is :class:`AnswerVerifier` below (a response is right when it holds the reference
answer as a whole number), so these tests do not depend on math-verify."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import synthpref
from synthpref.backends.types import Completion, GenerationRequest, GenerationResult
from synthpref.judges.verifier import Check, Verifier, metadata_field
from synthpref.records import Candidate, Message, Record
from synthpref.stages.base import StageContext
from synthpref.stages.constructed import token_edit_distance, tokens
from synthpref.stages.generate import Generate, GenerateParams
from synthpref.stages.inject_errors import (
    DISCARD_REASONS,
    ERROR_KINDS,
    InjectErrors,
    InjectErrorsParams,
    choose_kind,
    clean_reply,
    edit_seed,
)
from synthpref.stages.pairs import BuildPairs, PairsParams
from tests.judge_doubles import POLICIES

ROOT = Path(__file__).resolve().parents[2]
VERIFIER = f"{__name__}:AnswerVerifier"


# the verifier and the editing model --------------------------------------------------------------


def holds_answer(spec: dict, response: str) -> Check:
    """Right when the reference answer appears as a whole number; '???' cannot be checked."""
    if "???" in response:
        return Check(None, error="the response cannot be read")
    found = re.search(rf"(?<![\w.-]){re.escape(spec['answer'])}(?![\w]|\.\d)", response)
    return Check(1.0 if found else 0.0, evidence={"expected": spec["answer"], "found": bool(found)})


class AnswerVerifier(Verifier):
    type_name = "answer_verifier"
    execution = "threads"
    check_fn = holds_answer

    def spec(self, record: Record) -> dict:
        answer = metadata_field(record, "answer", stage=self.name, what="the reference answer")
        return {"answer": str(answer)}


Reply = str | tuple[str, str]  # text, or (text, finish_reason)
EDIT = re.compile(
    r"of this kind:\n\n(?P<label>[\w ]+): .*?\nQuestion:\n(?P<question>.*)\n\n"
    r"Correct response:\n(?P<response>.*)\n\nReply with",
    re.S,
)


def parse_edit(request: GenerationRequest) -> tuple[str, str, str] | None:
    """(question, response, kind) of an edit request, None for any other request."""
    m = EDIT.search(request.messages[-1].content)
    if m is None:
        return None
    return m["question"], m["response"], m["label"].replace(" ", "_")


class Editor:
    """A model client double that answers each edit request with ``edit(question, response,
    kind)``."""

    def __init__(self, edit: Callable[[str, str, str], Reply]) -> None:
        self.edit = edit
        self.requests: list[GenerationRequest] = []

    async def generate(self, requests):
        out = []
        for request in requests:
            self.requests.append(request)
            parsed = parse_edit(request)
            assert parsed is not None, request.messages[-1].content
            reply = self.edit(*parsed)
            text, finish = (reply, "stop") if isinstance(reply, str) else reply
            out.append(
                GenerationResult(
                    completions=[Completion(text=text, finish_reason=finish, completion_tokens=9)],
                    prompt_tokens=9,
                )
            )
        return out


def seven_to_eight(question: str, response: str, kind: str) -> str:
    return response.replace("7", "8")


# records and stages ------------------------------------------------------------------------------


def record(rid: str, answer: str | None, *texts: str | tuple[str, str]) -> Record:
    candidates = []
    for i, t in enumerate(texts):
        text, finish = (t, "stop") if isinstance(t, str) else t
        candidates.append(Candidate(id=f"gen:a:{i}", model="a", text=text, finish_reason=finish))
    return Record(
        id=rid,
        prompt=[Message(role="user", content=f"Question {rid}: what is 3 + 4?")],
        metadata={} if answer is None else {"answer": answer},
        candidates=candidates,
    )


def verified(*records: Record) -> list[Record]:
    asyncio.run(AnswerVerifier("check", AnswerVerifier.Params()).process(list(records)))
    return list(records)


def previous() -> list:
    return [
        Generate("gen", GenerateParams(models=["a"])),
        AnswerVerifier("check", AnswerVerifier.Params()),
    ]


def stage(client, **params) -> InjectErrors:
    s = InjectErrors(
        "inject", InjectErrorsParams.model_validate({"model": "m", "verifier": "check", **params})
    )
    before = previous()
    assert s.check(before) == []
    s.bind(before)
    s.ctx = StageContext({"m": client})  # type: ignore[dict-item]
    return s


def run(s: InjectErrors, records: list[Record]) -> list[Record]:
    return asyncio.run(s.process(records))


def pairs(records: list[Record]) -> BuildPairs:
    p = BuildPairs("pairs", PairsParams(rule="constructed", judge="check"))
    p.bind([*previous(), stage(Editor(seven_to_eight))])
    asyncio.run(p.process(records))
    return p


def made(r: Record) -> list[Candidate]:
    return [c for c in r.candidates if c.origin is not None]


# a kept edit -------------------------------------------------------------------------------------


def test_a_kept_edit_is_a_candidate_with_its_origin_and_the_verifiers_judgment():
    editor = Editor(seven_to_eight)
    recs = verified(record("r1", "7", "3 + 4 = 8.", "So 3 + 4 = 7 apples."))
    s = stage(editor)
    (r,) = run(s, recs)

    kind = choose_kind(0, "r1", "gen:a:1", 0, list(ERROR_KINDS))
    assert ERROR_KINDS[kind] in editor.requests[0].messages[0].content
    (edit,) = made(r)
    assert edit.id == "inject:gen:a:1:0" and edit.text == "So 3 + 4 = 8 apples."
    assert edit.origin.operation == f"inject_error:{kind}"
    assert (edit.origin.parent, edit.origin.prefer, edit.origin.stage) == (
        "gen:a:1",
        "parent",
        "inject",
    )
    assert edit.origin.edit_tokens == 1
    evidence = edit.origin.evidence
    assert evidence["kind"] == kind and evidence["verifier"] == "check"
    assert evidence["verdict"] == {"before": 1.0, "after": 0.0}
    assert evidence["before"] == {"expected": "7", "found": True}
    assert evidence["after"] == {"expected": "7", "found": False}
    (judgment,) = [j for j in r.judgments if j.candidate_ids == [edit.id]]
    assert (judgment.judge, judgment.score, judgment.status) == ("check", 0.0, "ok")
    assert s.counters["edits_requested"] == s.counters["edits_kept"] == 1
    assert s.counters["judge_judgments"] == 1

    p = pairs([r])
    (pair,) = r.pairs
    assert (pair.chosen_id, pair.rejected_id, pair.margin) == ("gen:a:1", edit.id, 1.0)
    assert (pair.judge, pair.rule) == ("check", "constructed")
    assert p.counters["pairs"] == 1


def test_the_stage_is_a_generator_of_candidates_whose_fingerprint_has_template_and_verifier():
    s = stage(Editor(seven_to_eight))
    assert (s.kind, s.writes_candidates, s.models_used()) == ("generator", True, ["m"])
    fp = s.fingerprint()
    assert fp["judge"]["type"] == "answer_verifier" and len(fp["template"]) == 16
    assert fp["kinds"] == ERROR_KINDS
    other = stage(Editor(seven_to_eight), template=str(_template_copy()))
    assert other.fingerprint()["template"] != fp["template"]


def _template_copy() -> Path:
    import tempfile

    src = (ROOT / "prompts" / "constructed" / "inject_error.jinja").read_text()
    path = Path(tempfile.mkdtemp()) / "mine.jinja"
    path.write_text(src + "\nKeep it subtle.")
    return path


# discarded edits ---------------------------------------------------------------------------------

DISCARD_BY_QUESTION: dict[str, Reply] = {
    "truncated": ("So 3 + 4 = 8", "length"),
    "empty": "Edited response:\n",
    "unchanged": "So  3 +\n4 = 7 apples.",  # only white space differs: no token does
    "too_large": "So 3 + 4 = 8 pears and bananas.",  # 4 tokens: one over max_edit_tokens 3
    "still_correct": "So 3 + 4 = 7 pears.",
    "verifier_failed": "So 3 + 4 = ??? apples.",
    "kept_at_max": "So 3 + 4 = 8 pears and.",  # 3 tokens: exactly max_edit_tokens
}


def by_question(question: str, response: str, kind: str) -> Reply:
    return DISCARD_BY_QUESTION[question.split(":")[0].removeprefix("Question ")]


def test_each_failed_edit_is_discarded_counted_by_reason_and_left_out_of_the_record():
    recs = verified(*(record(name, "7", "So 3 + 4 = 7 apples.") for name in DISCARD_BY_QUESTION))
    before = {r.id: (len(r.candidates), len(r.judgments)) for r in recs}
    s = stage(Editor(by_question), max_edit_tokens=3)
    out = run(s, recs)

    for r in out:
        kept = made(r)
        if r.id == "kept_at_max":
            assert [c.origin.edit_tokens for c in kept] == [3]
            assert (len(r.candidates), len(r.judgments)) == (2, 2)
        else:
            assert kept == [] and (len(r.candidates), len(r.judgments)) == before[r.id], r.id
    assert s.counters["edits_requested"] == 7 and s.counters["edits_kept"] == 1
    for reason in DISCARD_BY_QUESTION:
        if reason != "kept_at_max":
            assert s.counters[f"dropped:{reason}"] == 1, reason
    discarded = sum(s.counters[f"dropped:{r}"] for r in DISCARD_REASONS)
    assert discarded + s.counters["edits_kept"] == s.counters["edits_requested"]
    # the verifier checked only the edits that passed the text checks
    assert s.counters["judge_judgments"] == 3 and s.counters["judge_failed"] == 1


def test_two_edits_of_one_response_with_the_same_text_keep_one():
    s = stage(Editor(seven_to_eight), per_candidate=3)
    (r,) = run(s, verified(record("r1", "7", "So 3 + 4 = 7.")))
    assert [c.id for c in made(r)] == ["inject:gen:a:0:0"]
    assert s.counters["dropped:duplicate"] == 2 and s.counters["edits_requested"] == 3


# which responses are edited ----------------------------------------------------------------------


def test_records_whose_candidates_are_all_wrong_or_unverifiable_get_no_edits():
    editor = Editor(seven_to_eight)
    recs = verified(
        record("wrong", "7", "3 + 4 = 8.", "It is 6."),
        record("unverifiable", None, "So 3 + 4 = 7."),  # no reference answer: failed judgments
        Record(id="nothing", prompt=[Message(role="user", content="Hi")], metadata={"answer": 1}),
    )
    snapshot = [r.model_dump() for r in recs]
    s = stage(editor)
    out = run(s, recs)
    assert editor.requests == []
    assert [r.model_dump() for r in out] == snapshot
    assert s.counters["records_without_correct_candidate"] == 3
    assert s.counters["edits_requested"] == 0


def test_the_first_correct_candidates_in_order_each_edited_per_candidate_times():
    calls = iter(range(8, 100))
    editor = Editor(lambda question, response, kind: response.replace("7", str(next(calls))))
    texts = ["Maybe 6.", "It is 7.", "Surely 9.", "7, as 3 + 4 = 7.", "Then 7 it is."]
    (r,) = run(stage(editor, max_candidates=2, per_candidate=2), verified(record("r", "7", *texts)))
    asked = [parse_edit(q)[1] for q in editor.requests]
    assert asked == ["It is 7.", "It is 7.", "7, as 3 + 4 = 7.", "7, as 3 + 4 = 7."]
    assert [(c.origin.parent, c.id) for c in made(r)] == [
        ("gen:a:1", "inject:gen:a:1:0"),
        ("gen:a:1", "inject:gen:a:1:1"),
        ("gen:a:3", "inject:gen:a:3:0"),
        ("gen:a:3", "inject:gen:a:3:1"),
    ]
    seeds = {q.params.seed for q in editor.requests}
    assert len(seeds) == 4
    assert editor.requests[1].params.seed == edit_seed(0, "r", "gen:a:1", 1)


def test_truncated_correct_responses_are_edited_only_when_allowed():
    recs = lambda: verified(record("r", "7", ("So 3 + 4 = 7 and then", "length")))  # noqa: E731
    s = stage(Editor(seven_to_eight))
    (r,) = run(s, recs())
    assert made(r) == [] and s.counters["skipped_truncated_parents"] == 1
    (r,) = run(stage(Editor(seven_to_eight), allow_truncated=True), recs())
    assert [c.text for c in made(r)] == ["So 3 + 4 = 8 and then"]


# the size of an edit -----------------------------------------------------------------------------


def levenshtein(a: list[str], b: list[str]) -> int:
    """Textbook dynamic programme, written here to check the shipped one."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@pytest.mark.parametrize(
    ("a", "b", "by_hand", "a_tokens", "b_tokens"),
    [
        # 7 -> 8: one substitution
        ("So 3 + 4 = 7.", "So 3 + 4 = 8.", 1, ["So", "3", "+", "4", "=", "7", "."], None),
        # a '-' inserted and 'm' -> 'cm'
        ("x = 12 m", "x = -12 cm", 2, ["x", "=", "12", "m"], ["x", "=", "-", "12", "cm"]),
        # 'a' deleted at the front, 'e' inserted at the end
        ("a b c d", "b c d e", 2, None, None),
        # 2.5 is three tokens: the digit 5 -> 4 is one substitution
        ("Total: 2.5 km", "Total: 2.4 km", 1, ["Total", ":", "2", ".", "5", "km"], None),
    ],
)
def test_token_edit_distance_on_hand_counted_examples(a, b, by_hand, a_tokens, b_tokens):
    if a_tokens:
        assert tokens(a) == a_tokens
    if b_tokens:
        assert tokens(b) == b_tokens
    assert token_edit_distance(a, b) == by_hand == levenshtein(tokens(a), tokens(b))


def test_the_origin_records_the_edit_size_counted_by_hand():
    # "So 3 + 4 = 7 apples." -> "So 3 - 4 = -1 apples.": '+' -> '-', '7' -> '-', '1' inserted
    def edit(question, response, kind):
        return "So 3 - 4 = -1 apples."

    (r,) = run(stage(Editor(edit)), verified(record("r", "7", "So 3 + 4 = 7 apples.")))
    assert [c.origin.edit_tokens for c in made(r)] == [3]


# the reply as an edited response -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "original", "expected"),
    [
        ("Edited response:\nSo it is 8.", "So it is 7.", "So it is 8."),
        ("**Edited response:** So it is 8.", "So it is 7.", "So it is 8."),
        ("Here is the modified answer: So it is 8.", "So it is 7.", "So it is 8."),
        ("```\nSo it is 8.\n```", "So it is 7.", "So it is 8."),
        ("Edited response:\n```text\nSo it is 8.\n```", "So it is 7.", "So it is 8."),
        ("```py\nx = 8\n```", "```py\nx = 7\n```", "```py\nx = 8\n```"),  # the original's fence
        ("The new answer: 8, as computed.", "The answer: 7.", "The new answer: 8, as computed."),
        ("Edited answer: 8.", "Edited answer: 7.", "Edited answer: 8."),  # the original's label
        ("  So it is 8.  \n", "So it is 7.", "So it is 8."),
    ],
)
def test_a_leading_label_and_a_wrapping_code_fence_are_removed(reply, original, expected):
    assert clean_reply(reply, original) == expected


# the error kind ----------------------------------------------------------------------------------


def test_the_kind_is_a_seeded_choice_by_record_candidate_and_index():
    kinds = list(ERROR_KINDS)
    draws = [choose_kind(0, f"r{i}", "gen:a:0", k, kinds) for i in range(20) for k in range(3)]
    assert draws == [
        choose_kind(0, f"r{i}", "gen:a:0", k, kinds) for i in range(20) for k in range(3)
    ]
    assert set(draws) == set(kinds)
    other = [choose_kind(1, f"r{i}", "gen:a:0", k, kinds) for i in range(20) for k in range(3)]
    assert other != draws
    assert choose_kind(0, "r", "gen:a:0", 0, ["sign_error"]) == "sign_error"

    def requests(seed: int) -> list[GenerationRequest]:
        editor = Editor(seven_to_eight)
        recs = verified(*(record(f"r{i}", "7", "So 3 + 4 = 7.") for i in range(6)))
        run(stage(editor, seed=seed, per_candidate=2), recs)
        return editor.requests

    first = requests(0)
    assert first == requests(0)
    sent = [parse_edit(q)[2] for q in first]
    expected = [choose_kind(0, f"r{i}", "gen:a:0", k, kinds) for i in range(6) for k in range(2)]
    assert sent == expected
    assert requests(5) != first


def test_a_custom_kind_with_its_description_reaches_the_model():
    editor = Editor(seven_to_eight)
    s = stage(editor, kinds=["rounding"], descriptions={"rounding": "one value is rounded wrongly"})
    (r,) = run(s, verified(record("r", "7", "So 3 + 4 = 7.")))
    assert "rounding: one value is rounded wrongly" in editor.requests[0].messages[0].content
    assert made(r)[0].origin.operation == "inject_error:rounding"


# recipe validation -------------------------------------------------------------------------------


def _recipe(tmp_path: Path, stages: list[dict]) -> dict:
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"id": "m1", "prompt": "What is 3 + 4?", "answer": "7"}) + "\n")
    return {
        "name": "rise-check",
        "source": {"path": str(data), "id_field": "id"},
        "models": {"m": {"backend": "scripted", "policy": "always_a"}},
        "stages": stages,
        "output": {"dir": str(tmp_path / "run"), "formats": []},
    }


GEN = {"type": "generate", "models": ["m"], "n": 2}
CHECK = {"type": VERIFIER, "name": "check"}
INJECT = {"type": "inject_errors", "model": "m", "verifier": "check"}


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            [GEN, {"type": "rubric_judge", "name": "check", "model": "m"}, INJECT],
            "stages[2]: verifier: 'check' is a rubric_judge, not a Verifier stage",
        ),
        ([GEN, INJECT, CHECK], "verifier: 'check' is not a judge stage before this one"),
        ([GEN, CHECK, {**INJECT, "verifier": "nope"}], "verifier: 'nope' is not a judge stage"),
        ([CHECK, INJECT], "inject_errors needs candidates: put a generate stage before it"),
        ([GEN, CHECK, {**INJECT, "kinds": ["typo"]}], "kinds: 'typo' has no description"),
        ([GEN, CHECK, {**INJECT, "template": "nope.jinja"}], "template: 'nope.jinja' not found"),
    ],
)
def test_the_recipe_is_refused_naming_the_problem(tmp_path, stages, message):
    with pytest.raises(synthpref.RecipeError) as err:
        synthpref.validate(_recipe(tmp_path, stages))
    assert message in str(err.value)


def test_a_valid_recipe_with_a_custom_kind_validates(tmp_path):
    inject = {**INJECT, "kinds": ["typo"], "descriptions": {"typo": "one digit is mistyped"}}
    pairs_ = {"type": "pairs", "judge": "check", "rule": "constructed"}
    assert synthpref.validate(_recipe(tmp_path, [GEN, CHECK, inject, pairs_])) == []


# through the executor, on scripted models --------------------------------------------------------

SUMS = {"What is 3 + 4?": 7, "What is 6 + 7?": 13, "What is 20 + 22?": 42, "What is 1 + 1?": 2}


def _worked(question: str, value: int) -> str:
    a, b = re.findall(r"\d+", question)
    return f"We add {a} and {b}. The answer is {value}."


def _sum_solver(right: bool) -> Callable[[GenerationRequest], str]:
    def policy(request: GenerationRequest) -> str:
        parsed = parse_edit(request)
        if parsed is not None:  # the editing model: the final number one too large
            question, response, _ = parsed
            value = SUMS[question]
            return f"Edited response:\n{response.replace(str(value), str(value + 1))}"
        question = request.messages[-1].content
        return _worked(question, SUMS[question] if right else SUMS[question] - 2)

    return policy


def _executor_recipe(tmp_path: Path) -> dict:
    POLICIES["sum_right"], POLICIES["sum_wrong"] = _sum_solver(True), _sum_solver(False)
    data = tmp_path / "math.jsonl"
    rows = [{"id": f"q{i}", "prompt": q, "answer": str(a)} for i, (q, a) in enumerate(SUMS.items())]
    del rows[3]["answer"]  # nothing to verify against: no edit
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "name": "rise-executor",
        "source": {"path": str(data), "id_field": "id"},
        "models": {
            "right": {"backend": "scripted", "policy": "sum_right"},
            "wrong": {"backend": "scripted", "policy": "sum_wrong"},
        },
        "stages": [
            {"type": "generate", "models": ["wrong", "right"], "n": 1},
            {"type": VERIFIER, "name": "check"},
            {**INJECT, "model": "right", "max_edit_tokens": 2},
            {"type": "pairs", "judge": "check", "rule": "constructed"},
        ],
        "output": {"dir": str(tmp_path / "run"), "formats": ["preference"]},
        "settings": {"shard_size": 2},
    }


def test_through_the_executor_kept_edits_survive_checkpoints_and_make_the_dataset(tmp_path):
    import polars as pl

    synthpref.run(_executor_recipe(tmp_path), progress=False)
    rows = pl.read_parquet(tmp_path / "run" / "data" / "records.parquet").to_dicts()
    by_id = {r["id"]: r for r in rows}
    for i, (question, value) in enumerate(list(SUMS.items())[:3]):
        record_ = by_id[f"q{i}"]
        cands = {c["id"]: c for c in record_["candidates"]}
        edit = cands["inject_errors:generate:right:0:0"]
        origin = json.loads(edit["origin"])
        assert origin["parent"] == "generate:right:0" and origin["edit_tokens"] == 1
        assert origin["evidence"]["verdict"] == {"before": 1.0, "after": 0.0}
        assert edit["text"] == _worked(question, value + 1)
        (pair,) = record_["pairs"]
        assert (pair["chosen_id"], pair["rejected_id"]) == ("generate:right:0", edit["id"])
    assert all(c["origin"] is None for c in by_id["q3"]["candidates"])
    assert by_id["q3"]["pairs"] == []

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counters = next(s for s in summary["stages"] if s["name"] == "inject_errors")["counters"]
    assert counters["edits_requested"] == counters["edits_kept"] == 3
    assert counters["records_without_correct_candidate"] == 1
    preference = pl.read_parquet(tmp_path / "run" / "data" / "preference.parquet")
    assert preference.height == 3


# the shipped recipe, on the embedded model --------------------------------------------------------


def _shipped_recipe() -> dict:
    import synthpref.judges.math_verifier  # noqa: F401  (registers math_verifier)

    return yaml.safe_load((ROOT / "recipes" / "math_verified.yaml").read_text())


def test_the_shipped_recipe_validates_and_pairs_constructed_candidates_only():
    recipe = _shipped_recipe()
    recipe["source"]["path"] = str(ROOT / "recipes" / recipe["source"]["path"])
    assert synthpref.validate(recipe) == []
    types = [s["type"] for s in recipe["stages"]]
    assert types == ["generate", "math_verifier", "inject_errors", "pairs"]
    assert recipe["stages"][3] == {"type": "pairs", "judge": "math", "rule": "constructed"}


@pytest.mark.slow
def test_math_verified_recipe_end_to_end_on_the_embedded_model(tmp_path, embedded_dir):
    import polars as pl

    # the shipped recipe on 2 problems, shorter replies (the suite's time budget); replies cut at
    # max_tokens are edited and paired too, so the editing path runs whatever the model writes.
    # Each sample is drawn from its own seeded stream, so a problem's samples are the ones a run
    # on more problems gives it; the checks below are per record and per edit.
    recipe = _shipped_recipe()
    recipe["source"]["path"] = str(ROOT / "recipes" / recipe["source"]["path"])
    recipe["source"]["limit"] = 2
    generate, _, inject, pairs_ = recipe["stages"]
    generate.update(max_tokens=48)
    inject.update(max_tokens=64, allow_truncated=True, max_candidates=2)
    pairs_.update(allow_truncated=True)
    recipe["output"]["dir"] = str(tmp_path / "run")
    synthpref.run(recipe, progress=False)

    records_ = pl.read_parquet(tmp_path / "run" / "data" / "records.parquet").to_dicts()
    assert len(records_) == 2
    kept = 0
    for row in records_:
        cands = {c["id"]: c for c in row["candidates"]}
        scores = {}
        for j in row["judgments"]:
            assert j["judge"] == "math"
            scores[j["candidate_ids"][0]] = j["score"] if j["status"] == "ok" else None
        assert set(scores) == set(cands), "every candidate, sampled or edited, is verified"
        edits = {cid: json.loads(c["origin"]) for cid, c in cands.items() if c["origin"]}
        for cid, origin in edits.items():
            parent = cands[origin["parent"]]
            assert scores[origin["parent"]] == 1.0 and scores[cid] == 0.0
            assert origin["edit_tokens"] == token_edit_distance(parent["text"], cands[cid]["text"])
            assert 1 <= origin["edit_tokens"] <= inject["max_edit_tokens"]
            assert origin["operation"] == "inject_error:" + origin["evidence"]["kind"]
            assert origin["evidence"]["kind"] in inject["kinds"]
        assert {(p["chosen_id"], p["rejected_id"]) for p in row["pairs"]} == {
            (o["parent"], cid) for cid, o in edits.items()
        }
        kept += len(edits)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counters = next(s for s in summary["stages"] if s["name"] == "inject_errors")["counters"]
    discarded = sum(counters.get(f"dropped:{r}", 0) for r in DISCARD_REASONS)
    assert counters.get("edits_kept", 0) == kept
    assert counters.get("edits_requested", 0) == kept + discarded
    correct = sum(1 for row in records_ if any(j["score"] == 1.0 for j in row["judgments"]))
    assert counters.get("records_without_correct_candidate", 0) == len(records_) - correct
    preference = pl.read_parquet(tmp_path / "run" / "data" / "preference.parquet")
    assert preference.height == kept
