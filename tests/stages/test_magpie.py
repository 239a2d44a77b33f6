"""The Magpie stage: pre-query rendering per chat template family, queries per record with their
lineage, drops by reason, deterministic seeds, keep_input, errors with the YAML path, the recipe end
to end (scripted and on the embedded model) and resume after a kill in the middle of the stage."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Literal

import pyarrow.parquet as pq
import pytest
import yaml

import synthpref
from synthpref.backends.base import Backend, Capability, OnGenerated
from synthpref.backends.specs import ModelSpec, register_backend
from synthpref.backends.types import Completion, CompletionRequest, GenerationResult
from synthpref.errors import ConfigError
from synthpref.recipes.loader import RecipeError, parse_recipe
from synthpref.records import Message, Record
from synthpref.sources import seed_records
from synthpref.stages.magpie import Magpie, MagpieParams, query_seed
from synthpref.stages.pre_query import SENTINEL, PreQueryError, pre_query
from tests.judge_doubles import ScriptedBackend, client_for, run_stage

REPO = Path(__file__).resolve().parents[2]

# --- chat templates, as their model repositories ship them -----------------------------------

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
#: renders the messages' text and nothing else: no place where a user turn starts
CONTENT_ONLY = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
#: shows the roles but never a user's content
NO_CONTENT = "{% for message in messages %}<{{ message['role'] }}>{% endfor %}"
#: ChatML that drops system messages
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endif %}{% endfor %}"
)
TEMPLATES = {
    "chatml": (CHATML, "<|im_start|>", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "content_only": (CONTENT_ONLY, "<s>", "</s>"),
}
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def template_tokenizer(template: str, bos: str = "<s>", eos: str = "</s>"):
    """A tokenizer built here (no hub) that carries ``template`` as its chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(
        tokenizer_object=vocab, bos_token=bos, eos_token=eos, chat_template=template
    )


def renderer(tokenizer) -> Callable[[Sequence[Message]], str]:
    return lambda messages: tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], tokenize=False
    )


# --- pre-query per template family -------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "system", "expected"),
    [
        ("chatml", None, "<|im_start|>user\n"),
        ("chatml", "Ask about cooking.", "<|im_start|>system\nAsk about cooking.<|im_end|>\n<|im_start|>user\n"),
        ("llama3", None, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"),
        (
            "llama3",
            "Ask about cooking.",
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAsk about cooking."
            "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        ),
    ],
)  # fmt: skip
def test_pre_query_of_each_template_family(family, system, expected):
    template, bos, eos = TEMPLATES[family]
    found = pre_query(renderer(template_tokenizer(template, bos, eos)), system)
    assert found.text == expected
    assert found.end_of_turn == eos
    assert found.stop == [eos]
    assert found.system_prompt == system


def test_pre_query_of_the_embedded_model(embedded_dir):
    from transformers import AutoTokenizer

    render = renderer(AutoTokenizer.from_pretrained(embedded_dir))
    default = pre_query(render)
    assert default.text == (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    )  # the template's own default system message
    assert default.end_of_turn == "<|im_end|>"
    steered = pre_query(render, "You write maths questions.")
    assert steered.text == (
        "<|im_start|>system\nYou write maths questions.<|im_end|>\n<|im_start|>user\n"
    )


@pytest.mark.parametrize(
    ("template", "system", "says"),
    [
        (CONTENT_ONLY, None, "renders nothing before a user message's content"),
        (CONTENT_ONLY, "Ask about cooking.", "renders nothing before a user message's content"),
        (NO_CONTENT, None, "does not show a user message's content"),
        (NO_SYSTEM, "Ask about cooking.", "leaves the system message out"),
    ],
)
def test_a_template_with_no_user_turn_start_is_refused(template, system, says):
    with pytest.raises(PreQueryError, match=says):
        pre_query(renderer(template_tokenizer(template)), system)


def test_text_after_the_content_up_to_its_line_ends_the_turn():
    llama2 = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]\nnext{% endfor %}"
    assert pre_query(renderer(template_tokenizer(llama2))).end_of_turn == "[/INST]"
    bare_end = "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}"
    found = pre_query(renderer(template_tokenizer(bare_end)))
    assert (found.text, found.end_of_turn, found.stop) == ("<user>", "", [])


# --- a scripted model that continues raw text ---------------------------------------------------

Writer = Callable[[CompletionRequest], tuple[str, str]]

TOPICS = ["bread", "tides", "prime numbers", "chess", "rust", "volcanoes", "jazz", "tea"]
ASKS = ["How do I start learning about", "Explain", "What is the history of", "Why do people like"]


def seeded_query(request: CompletionRequest) -> tuple[str, str]:
    """A query drawn from the request's seed alone (so identical seeds give identical queries)."""
    rng = random.Random(request.params.seed)
    code = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    return f"{rng.choice(ASKS)} {rng.choice(TOPICS)}, case {code}?", "stop"


def duplicating_writer(request: CompletionRequest) -> tuple[str, str]:
    """Queries from the seed, but every third one the same text (for dedup to drop)."""
    if request.params.seed % 3 == 0:
        return "What is the capital of France?", "stop"
    return seeded_query(request)


WRITERS: dict[str, Writer] = {"seeded": seeded_query, "duplicating": duplicating_writer}


class MagpieBackend(ScriptedBackend):
    """Renders chats with a real chat template; ``complete`` answers from ``writer``."""

    def __init__(
        self,
        template: str = CHATML,
        writer: Writer = seeded_query,
        complete: bool = True,
        name: str = "magpie",
    ) -> None:
        super().__init__("prefers_longer", extra=("complete",) if complete else (), name=name)
        self.tokenizer = template_tokenizer(template, "<|im_start|>", "<|im_end|>")
        self.writer = writer
        self.completion_requests: list[CompletionRequest] = []

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    async def complete(
        self, requests: Sequence[CompletionRequest], on_result: OnGenerated | None = None
    ) -> list[GenerationResult]:
        out = []
        for i, request in enumerate(requests):
            self.completion_requests.append(request)
            text, finish = self.writer(request)
            result = GenerationResult(
                completions=[
                    Completion(text=text, finish_reason=finish, completion_tokens=len(text.split()))
                ],
                prompt_tokens=len(request.prompt.split()),
            )
            if on_result:
                on_result(i, result)
            out.append(result)
        return out


@register_backend
class MagpieScriptedSpec(ModelSpec):
    """A scripted model with a chat template that continues raw text (tests only)."""

    backend_name: ClassVar[str] = "magpie_scripted"
    backend: str = "magpie_scripted"
    template: Literal["chatml", "llama3", "content_only"] = "chatml"
    can_complete: bool = True
    writer: Literal["seeded", "duplicating"] = "seeded"
    model: str = "scripted"

    def build(self) -> Backend:
        return MagpieBackend(
            TEMPLATES[self.template][0],
            WRITERS[self.writer],
            complete=self.can_complete,
            name=f"magpie-{self.template}-{self.can_complete}-{self.writer}",
        )

    def capabilities(self) -> frozenset[str]:
        caps: set[Capability] = {"generate", "prefill"}
        return frozenset(caps | {"complete"} if self.can_complete else caps)

    def display_name(self) -> str:
        return f"magpie-scripted-{self.template}"


def stage(index: int | None = 0, name: str = "magpie", **params) -> Magpie:
    s = Magpie(name, MagpieParams(model="writer", **params))
    if index is not None:
        s.bind([None] * index)  # type: ignore[list-item]
    return s


def run(s: Magpie, records: list[Record], backend: Backend, system_prompt: str | None = None):
    return run_stage(s, records, {"writer": client_for(backend, "writer", system_prompt)})


def outputs(backend_outputs: list[tuple[str, str]]) -> Writer:
    queue = list(backend_outputs)
    return lambda request: queue.pop(0)


# --- the stage ---------------------------------------------------------------------------------


def test_n_queries_per_seed_with_ids_lineage_and_seeds():
    backend = MagpieBackend()
    s = stage(n=3, seed=7)
    out = run(s, seed_records(4), backend)
    assert [r.id for r in out] == [f"seed-{i:06d}.m{k}" for i in range(4) for k in range(3)]
    for r in out:
        parent, k = r.id.rsplit(".m", 1)
        assert r.metadata == {
            "parent": parent,
            "operation": "magpie",
            "query_index": int(k),
            "model": "writer",
            "system_prompt": None,
            "finish_reason": "stop",
        }
        assert [m.role for m in r.prompt] == ["user"] and r.prompt[0].content.endswith("?")
    requests = backend.completion_requests
    assert [q.params.seed for q in requests] == [
        query_seed(7, f"seed-{i:06d}", k) for i in range(4) for k in range(3)
    ]
    assert len({q.params.seed for q in requests}) == 12
    assert {q.prompt for q in requests} == {"<|im_start|>user\n"}
    assert all(q.params.stop == ["<|im_end|>"] and q.params.n == 1 for q in requests)
    assert s.counters == {"queries": 12}


def test_queries_cut_empty_or_not_ending_the_turn_are_dropped_and_counted():
    writer = outputs(
        [
            ("  What is a tide?  ", "stop"),
            ("How do volcanoes form and why do they", "length"),
            ("   \n", "stop"),
            ("Tell me about jazz", "abort"),
            ("Why is tea popular?", "stop"),
            ("", "length"),
        ]
    )
    s = stage(n=3)
    out = run(s, seed_records(2), MagpieBackend(writer=writer))
    assert [(r.id, r.prompt[0].content) for r in out] == [
        ("seed-000000.m0", "What is a tide?"),
        ("seed-000001.m1", "Why is tea popular?"),
    ]
    assert s.counters == {
        "queries": 2,
        "dropped:truncated": 2,
        "dropped:empty": 1,
        "dropped:no_end_of_turn": 1,
    }


def test_queries_are_deterministic_and_depend_on_the_stage_seed():
    first = run(stage(n=2, seed=1), seed_records(5), MagpieBackend())
    again = run(stage(n=2, seed=1), seed_records(5), MagpieBackend())
    other = run(stage(n=2, seed=2), seed_records(5), MagpieBackend())
    assert [r.model_dump() for r in first] == [r.model_dump() for r in again]
    assert [r.prompt for r in first] != [r.prompt for r in other]
    # a record's queries do not depend on its shard or its neighbours
    alone = run(stage(n=2, seed=1), seed_records(5)[3:4], MagpieBackend())
    assert [r.model_dump() for r in alone] == [r.model_dump() for r in first[6:8]]


def test_keep_input_grows_a_given_source_and_never_keeps_seed_records():
    given = [
        Record(id="p1", prompt=[Message(role="user", content="Name a colour.")], source_row=0),
        Record(id="p2", prompt=[Message(role="user", content="Add 3 and 4.")], source_row=1),
    ]
    s = stage(n=2)
    out = run(s, [r.model_copy(deep=True) for r in given], MagpieBackend())
    assert [r.id for r in out] == ["p1", "p1.m0", "p1.m1", "p2", "p2.m0", "p2.m1"]
    assert out[0] == given[0] and out[3] == given[1]
    assert out[4].source_row == 1 and out[4].metadata["parent"] == "p2"
    assert s.counters == {"inputs_kept": 2, "queries": 4}

    dropped = run(stage(n=2, keep_input=False), given, MagpieBackend())
    assert [r.id for r in dropped] == ["p1.m0", "p1.m1", "p2.m0", "p2.m1"]
    seeds = run(stage(n=1, keep_input=True), seed_records(2), MagpieBackend())
    assert [r.id for r in seeds] == ["seed-000000.m0", "seed-000001.m0"]


def test_the_system_prompt_steers_the_pre_query_and_is_recorded():
    backend = MagpieBackend()
    out = run(stage(system_prompt="Ask about cooking."), seed_records(1), backend)
    assert backend.completion_requests[0].prompt == (
        "<|im_start|>system\nAsk about cooking.<|im_end|>\n<|im_start|>user\n"
    )
    assert out[0].metadata["system_prompt"] == "Ask about cooking."
    assert [m.role for m in out[0].prompt] == ["user"]

    kept = run(stage(system_prompt="Ask about cooking.", keep_system=True), seed_records(1),
               MagpieBackend())  # fmt: skip
    assert [(m.role, m.content) for m in kept[0].prompt[:1]] == [("system", "Ask about cooking.")]

    # without its own, the stage uses the model spec's system prompt, as every chat request does
    backend = MagpieBackend()
    spec_system = run(stage(), seed_records(1), backend, system_prompt="Ask about chess.")
    assert backend.completion_requests[0].prompt.startswith("<|im_start|>system\nAsk about chess.")
    assert spec_system[0].metadata["system_prompt"] == "Ask about chess."


def test_a_model_that_cannot_complete_is_refused_naming_the_yaml_path():
    with pytest.raises(ConfigError, match=r"stages\[2\] \(writer_stage\)\.model: .*'complete'"):
        run(stage(2, "writer_stage"), seed_records(1), MagpieBackend(complete=False))


def test_a_template_without_a_user_turn_start_is_refused_at_run_time():
    with pytest.raises(ConfigError, match=r"stages\[0\] \(magpie\)\.model: .*renders nothing"):
        run(stage(), seed_records(1), MagpieBackend(template=CONTENT_ONLY))


def test_a_template_that_raises_is_refused_naming_the_yaml_path():
    refuses_system = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + CHATML
    )
    with pytest.raises(ConfigError, match=r"stages\[0\] \(magpie\)\.model: .*System role not"):
        run(stage(system_prompt="x"), seed_records(1), MagpieBackend(template=refuses_system))


# --- validation ----------------------------------------------------------------------------------


def seeds_recipe(tmp_path: Path, models: dict, stages: list[dict], **extra) -> dict:
    return {
        "name": "magpie-test",
        "source": {"seeds": 6},
        "models": models,
        "stages": stages,
        "output": {"dir": str(tmp_path / "run"), "formats": []},
        "settings": {"shard_size": 2},
        **extra,
    }


def test_validate_refuses_a_model_without_raw_completion(tmp_path):
    models = {
        "api": {"backend": "openai", "model": "gpt-4o-mini", "base_url": "http://127.0.0.1:9"}
    }
    recipe = seeds_recipe(tmp_path, models, [{"type": "magpie", "model": "api"}])
    with pytest.raises(RecipeError) as info:
        synthpref.validate(recipe)
    [problem] = info.value.problems
    assert problem.startswith("stages[0] (magpie): model 'api' (backend openai) cannot complete")
    assert "openai with a 'tokenizer'" in problem  # says which backends can


def test_validate_accepts_magpie_first_on_seeds_and_binds_its_place(tmp_path):
    models = {"w": {"backend": "magpie_scripted"}}
    stages = [{"type": "dedup"}, {"type": "magpie", "name": "q", "model": "w"}]
    with pytest.raises(
        RecipeError, match=r"stages\[0\] \(dedup\).*prompt-writing stages: .*magpie"
    ):
        synthpref.validate(seeds_recipe(tmp_path, models, stages))
    loaded = parse_recipe(seeds_recipe(tmp_path, models, stages[::-1]))
    assert loaded.stages[0].where() == "stages[0] (q).model"
    assert synthpref.validate(seeds_recipe(tmp_path, models, stages[::-1])) == []


# --- through the executor: from seeds to a preference dataset, scripted ---------------------


def scripted_recipe(tmp_path: Path, run_dir: Path, writer: str = "seeded") -> dict:
    return seeds_recipe(
        tmp_path,
        {
            "writer": {"backend": "magpie_scripted", "writer": writer},
            "long": {"backend": "scripted", "system_prompt": "Give a long answer."},
            "judge": {"backend": "scripted", "policy": "prefers_longer"},
        },
        [
            {"type": "magpie", "model": "writer", "n": 2, "max_tokens": 32},
            {"type": "dedup"},
            {
                "type": "decontaminate",
                "eval_prompts": [str(REPO / "recipes/data/eval_prompts.txt")],
            },
            {"type": "generate", "models": ["writer", "long"], "n": 1, "max_tokens": 8},
            {"type": "pairwise_judge", "name": "pw", "model": "judge", "max_tokens": 8},
            {"type": "pairs", "judge": "pw"},
        ],
        output={"dir": str(run_dir), "formats": ["preference"]},
    )


def test_seeds_to_a_preference_dataset_through_the_executor(tmp_path):
    result = synthpref.run(scripted_recipe(tmp_path, tmp_path / "run"), progress=False)
    stages = {s.name: s for s in result.stages}
    assert stages["magpie"].records_in == 6 and stages["magpie"].records_out == 12
    rows = pq.read_table(tmp_path / "run" / "data" / "preference.parquet").to_pylist()
    assert rows, "no preference pair came out"
    records = {
        r["id"]: r for r in pq.read_table(tmp_path / "run" / "data" / "records.parquet").to_pylist()
    }
    for row in rows:
        [user] = [m for m in row["prompt"] if m["role"] == "user"]
        assert user["content"].endswith("?")
    assert all(".m" in rid and json.loads(r["metadata"])["operation"] == "magpie"
               for rid, r in records.items())  # fmt: skip


def test_dedup_after_magpie_drops_repeated_queries(tmp_path):
    result = synthpref.run(scripted_recipe(tmp_path, tmp_path / "run", "duplicating"),
                           progress=False)  # fmt: skip
    dedup = next(s for s in result.stages if s.name == "dedup")
    repeated = sum(query_seed(0, f"seed-{i:06d}", k) % 3 == 0 for i in range(6) for k in range(2))
    assert repeated >= 2  # the same query written for several seeds: all but the first dropped
    assert dedup.records_in == 12
    assert dedup.counters == {"kept": 12 - (repeated - 1), "dropped:exact_duplicate": repeated - 1}
    assert dedup.records_out == 12 - (repeated - 1)


# --- resume after a kill in the middle of the magpie stage ---------------------------------------

#: what a child ``synthpref run`` imports first: the scripted backends its recipes name
CHILD_IMPORTS = ("tests.stages.test_magpie", "tests.judge_doubles")


def child(recipe: Path, env: dict, kill=None, timeout: float = 900):
    from tests.fault_fixtures import run_child

    return run_child(recipe, env, kill, timeout=timeout, imports=CHILD_IMPORTS)


def uninterrupted(tmp: Path, recipe: dict) -> Path:
    """The reference: ``recipe`` run in this process (see fault_fixtures.run_in_process)."""
    from tests.conftest import write_recipe
    from tests.fault_fixtures import run_in_process

    tmp.mkdir(parents=True, exist_ok=True)
    run_in_process(write_recipe(tmp, recipe))
    return Path(recipe["output"]["dir"])


def killed_then_resumed(tmp: Path, recipe: dict, env: dict, kills: list) -> Path:
    from tests.conftest import write_recipe

    tmp.mkdir(parents=True, exist_ok=True)
    path = write_recipe(tmp, recipe)
    for kill in kills:
        proc = child(path, env, kill)
        assert proc.killed, f"{kill}: not killed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    proc = child(path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(recipe["output"]["dir"])


def assert_same_dataset(resumed: Path, reference: Path, tol: float) -> None:
    """The same dataset and counters as the reference, and no model call computed twice."""
    from tests.fault_fixtures import dataset, differences, journal_counts, stage_counters

    got, want = dataset(resumed), dataset(reference)
    assert want["preference.parquet"], "the reference run made no pair"
    diff = differences(got, want, tol)
    assert not diff, "\n".join(diff[:20])
    assert stage_counters(resumed) == stage_counters(reference)
    computed = journal_counts(resumed / "cache.sqlite")
    assert computed.keys() == journal_counts(reference / "cache.sqlite").keys()
    assert set(computed.values()) == {1}, "a model call was computed again after the kill"


def test_a_kill_inside_magpie_resumes_to_the_same_dataset(tmp_path, subprocess_env):
    from tests.fault_fixtures import KillPoint

    reference = uninterrupted(
        tmp_path / "reference", scripted_recipe(tmp_path, tmp_path / "reference" / "run")
    )
    resumed = killed_then_resumed(
        tmp_path / "killed",
        scripted_recipe(tmp_path, tmp_path / "killed" / "run"),
        subprocess_env,
        [
            KillPoint("call", "magpie", shard=1, nth=2),  # between the queries of one shard
            KillPoint("checkpoint-written", "magpie", shard=2),  # after its last checkpoint
        ],
    )
    assert_same_dataset(resumed, reference, 0.0)


# --- the shipped recipe on the embedded model --------------------------------------------------


def embedded_completes() -> bool:
    from synthpref.backends.transformers_backend import TransformersBackend

    return TransformersBackend.complete is not Backend.complete


needs_complete = pytest.mark.skipif(
    not embedded_completes(), reason="the embedded backend cannot continue raw text yet"
)


def shipped_recipe(run_dir: Path, seeds: int | None = None, shard_size: int | None = None) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / "magpie.yaml").read_text())
    recipe["output"]["dir"] = str(run_dir)
    for stage_ in recipe["stages"]:
        for key, value in stage_.items():
            if key == "eval_prompts":
                stage_[key] = [str(REPO / "recipes" / p) for p in value]
    if seeds is not None:
        recipe["source"]["seeds"] = seeds
    if shard_size is not None:
        recipe["settings"]["shard_size"] = shard_size
    return recipe


def check_recipe_output(run_dir: Path, seeds: int, n: int) -> None:
    """What the shipped recipe must make from nothing: every seed's queries written or dropped by
    reason, dedup over exactly the written ones, pairs whose prompt is a query, lineage to a seed."""
    stages = {s["name"]: s for s in json.loads((run_dir / "summary.json").read_text())["stages"]}
    magpie, dedup = stages["magpie"], stages["dedup"]
    written = magpie["counters"].get("queries", 0)
    dropped = sum(v for k, v in magpie["counters"].items() if k.startswith("dropped:"))
    assert written + dropped == seeds * n and written >= 2, magpie["counters"]
    assert magpie["records_out"] == written and dedup["records_in"] == written
    decided = dedup["counters"].get("kept", 0) + sum(
        v for k, v in dedup["counters"].items() if k.startswith("dropped:")
    )
    assert decided == written
    rows = pq.read_table(run_dir / "data" / "preference.parquet").to_pylist()
    assert rows, "no pairs"
    for row in rows:
        assert row["prompt"][-1]["role"] == "user" and row["prompt"][-1]["content"].strip()
        assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]
    records = pq.read_table(run_dir / "data" / "records.parquet").to_pylist()
    assert all(json.loads(r["metadata"])["parent"].startswith("seed-") for r in records)


@pytest.mark.slow
@needs_complete
def test_the_embedded_recipe_killed_inside_magpie_resumes_to_the_same_dataset(
    tmp_path, subprocess_env
):
    from tests.fault_fixtures import KillPoint

    def recipe(run_dir: Path) -> dict:
        """The shipped recipe, small: 2 seeds x 2 queries in shards of one seed, short replies."""
        out = shipped_recipe(run_dir, seeds=2, shard_size=1)
        magpie, _, _, generate, _, pairs = out["stages"]
        magpie.update(n=2, max_tokens=48)
        generate.update(max_tokens=16)
        pairs.update(allow_truncated=True)
        return out

    reference = uninterrupted(tmp_path / "reference", recipe(tmp_path / "reference" / "run"))
    check_recipe_output(reference, seeds=2, n=2)
    resumed = killed_then_resumed(
        tmp_path / "killed",
        recipe(tmp_path / "killed" / "run"),
        subprocess_env,
        [KillPoint("call", "magpie", shard=1, nth=1)],  # inside the batch of shard 1's queries
    )
    # embedded scores may be recomputed in other batches after a kill
    assert_same_dataset(resumed, reference, 1e-5)


def test_query_seeds_are_31_bit_and_spread():
    seeds = {query_seed(0, f"seed-{i:06d}", k) for i in range(200) for k in range(3)}
    assert len(seeds) == 600 and all(0 <= s < 2**31 for s in seeds)
    assert query_seed(0, "a", 0) != query_seed(1, "a", 0) != query_seed(0, "a", 1)


def test_every_query_of_a_shard_is_asked_in_one_call():
    calls = []

    class Counting(MagpieBackend):
        async def complete(self, requests, on_result=None):
            calls.append(len(requests))
            return await super().complete(requests, on_result)

    run(stage(n=4), seed_records(3), Counting())
    assert calls == [12]
    assert run(stage(), [], Counting()) == [] and calls == [12]


def test_the_sentinel_never_reaches_the_model():
    backend = MagpieBackend(template=LLAMA3)
    run(stage(n=2, system_prompt="Ask about tea."), seed_records(2), backend)
    assert all(SENTINEL not in q.prompt for q in backend.completion_requests)
