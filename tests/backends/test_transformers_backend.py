"""The transformers backend on the embedded model: generation semantics and exact scoring."""

from __future__ import annotations

import asyncio

import pytest
import torch

from synthpref.backends.segments import SegmentError
from synthpref.backends.transformers_backend import TransformersBackend
from synthpref.backends.types import GenerationRequest, SamplingParams, ScoreRequest
from synthpref.records import Message


@pytest.fixture(scope="module")
def backend(embedded_dir):
    return TransformersBackend(str(embedded_dir), batch_size=4)


def _conv(answer: str, *extra: Message) -> list[Message]:
    return [
        Message(role="user", content="What is the capital of France?"),
        Message(role="assistant", content=answer),
        *extra,
    ]


def _reference_logprobs(backend, messages, segment_index, include_eot):
    """Independent computation: one plain forward pass over the full chat-templated text."""
    tok, model = backend.tokenizer, backend.model
    dicts = [m.model_dump() for m in messages]
    full = tok.apply_chat_template(dicts[: segment_index + 1], tokenize=False)
    ids = tok(full, add_special_tokens=False, return_tensors="pt").input_ids
    content = messages[segment_index].content
    # locate the content by the text right before it: the rendering of the conversation so far
    head = full[: full.rindex(content)]
    n_head = len(tok(head, add_special_tokens=False).input_ids)
    n_body = len(tok(head + content, add_special_tokens=False).input_ids) - n_head
    n = n_body + (1 if include_eot else 0)
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]
    targets = ids[0, n_head : n_head + n]
    return logp[n_head - 1 : n_head - 1 + n].gather(-1, targets[:, None])[:, 0].tolist()


@pytest.mark.parametrize("include_eot", [False, True])
def test_scoring_matches_plain_forward_pass(backend, include_eot):
    convs = [
        (_conv("Paris is the capital of France."), 1),
        (_conv("I think it might be Lyon, but I am not sure at all."), 1),
        (
            _conv(
                "Paris.",
                Message(role="user", content="Thanks! Can you tell me more about it?"),
            ),
            2,
        ),
    ]
    requests = [
        ScoreRequest(messages=m, segment=i, include_end_of_turn=include_eot) for m, i in convs
    ]
    results = asyncio.run(backend.score(requests))
    for (messages, index), result in zip(convs, results, strict=True):
        expected = _reference_logprobs(backend, messages, index, include_eot)
        assert len(result.token_logprobs) == len(expected)
        per_token = max(abs(a - b) for a, b in zip(result.token_logprobs, expected, strict=True))
        assert per_token < 1e-3
    assert results[0].tokens[-1] == ("<|im_end|>" if include_eot else ".")


def test_a_model_is_loaded_once_however_the_call_spells_its_arguments(embedded_dir):
    from synthpref.backends.transformers_backend import load_model

    path = str(embedded_dir)
    first = load_model(path, "cpu", "float32")
    assert load_model(path, "cpu", "float32", False, 1) is first
    assert load_model(embedded_dir, "cpu", "float32", trust_remote_code=False) is first
    backend = TransformersBackend(path, device="cpu", dtype="float32")
    assert backend.model is first[0] and backend.tokenizer is first[1]


def test_context_overflow_policy(embedded_dir):
    small = TransformersBackend(str(embedded_dir), max_context=48)
    long_question = "Please answer carefully. " * 20
    messages = [
        Message(role="user", content=long_question),
        Message(role="assistant", content="Yes."),
    ]
    with pytest.raises(SegmentError, match="over the model's context of 48"):
        asyncio.run(small.score([ScoreRequest(messages=messages)]))
    result = asyncio.run(small.score([ScoreRequest(messages=messages, truncation="left")]))[0]
    assert result.truncated_tokens > 0 and len(result.token_logprobs) == 2


def test_empty_segment_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        ScoreRequest(
            messages=[Message(role="user", content="hi"), Message(role="assistant", content="")]
        )


def test_generation_is_reproducible_and_honours_params(backend):
    params = SamplingParams(n=2, temperature=0.9, max_tokens=12, seed=7)
    prompts = ["Name a fruit.", "Name a colour.", "Name an animal."]
    requests = [
        GenerationRequest(messages=[Message(role="user", content=p)], params=params)
        for p in prompts
    ]
    seen = []
    first = asyncio.run(backend.generate(requests, on_result=lambda i, r: seen.append(i)))
    again = asyncio.run(backend.generate(requests))
    assert first == again
    assert sorted(seen) == [0, 1, 2]
    for result in first:
        assert len(result.completions) == 2
        for c in result.completions:
            assert c.completion_tokens <= 12
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (
                c.completion_tokens == 12 and "<|im_end|>" not in c.text
            )


def test_stop_strings_and_top_logprobs(backend):
    request = GenerationRequest(
        messages=[Message(role="user", content="Write one sentence about the sea.")],
        params=SamplingParams(temperature=0, max_tokens=40, stop=["e"]),
        top_logprobs=5,
    )
    result = asyncio.run(backend.generate([request]))[0].completions[0]
    assert "e" not in result.text and result.finish_reason == "stop"
    assert result.top_logprobs and len(result.top_logprobs[0]) == 5
    assert all(v <= 0 for v in result.top_logprobs[0].values())


def test_prefill_continues_the_assistant_message(backend):
    request = GenerationRequest(
        messages=[
            Message(role="user", content="Rate the number 5 from 1 to 5."),
            Message(role="assistant", content="Rating:"),
        ],
        params=SamplingParams(temperature=0, max_tokens=3),
        continue_final_message=True,
    )
    assert backend.render_prompt(request).endswith("Rating:")
    assert asyncio.run(backend.generate([request]))[0].completions[0].text


def test_shared_prefix_generation_matches_unshared(backend):
    """Judge prompts share their rubric: a ``model.generate`` batch runs it once, and nothing else
    changes. (The running batch prefills each prompt whole, so a row's bits never depend on which
    prompts share its prefill.)"""
    rubric = (
        "You are grading one AI assistant response on a single aspect: helpfulness. Score from 1 "
        "to 5, where 1 is off-topic and 5 fully addresses the request.\n\n[Response]\n"
    )
    responses = ["Paris.", "The capital is Lyon.", "Paris, on the Seine.", "I am not sure."]
    requests = [
        GenerationRequest(
            messages=[
                Message(role="user", content=rubric + r + "\n[End of response]"),
                Message(role="assistant", content="Rating:"),
            ],
            params=SamplingParams(temperature=0, max_tokens=6),
            continue_final_message=True,
            top_logprobs=3,
        )
        for r in responses
    ]
    shared_rows = []
    original = backend._generation_inputs

    def spy(ids, n):
        inputs = original(ids, n)
        if "past_key_values" in inputs:
            shared_rows.append(inputs["past_key_values"].get_seq_length())
        return inputs

    backend._generation_inputs = spy
    backend.continuous_batching = False
    try:
        shared = asyncio.run(backend.generate(requests))
        backend.prefix_sharing = False
        plain = asyncio.run(backend.generate(requests))
    finally:
        del backend._generation_inputs
        del backend.prefix_sharing
        del backend.continuous_batching
    assert shared_rows and shared_rows[0] >= 30  # the rubric's tokens ran once
    assert len(shared_rows) == 1  # the unshared run built no prefix cache
    for a, b in zip(shared, plain, strict=True):
        assert a.prompt_tokens == b.prompt_tokens
        ca, cb = a.completions[0], b.completions[0]
        assert ca.text == cb.text and ca.finish_reason == cb.finish_reason
        for x, y in zip(ca.top_logprobs, cb.top_logprobs, strict=True):
            for token in x.keys() & y.keys():
                assert x[token] == pytest.approx(y[token], abs=1e-3)


def test_shared_prefix_sampling_is_reproducible(backend):
    """n samples per prompt on a shared prefix: each row is its own sample, reproducibly."""
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3)
    system = Message(role="system", content="You are a terse assistant. " * 6)
    requests = [
        GenerationRequest(messages=[system, Message(role="user", content=q)], params=params)
        for q in ("Name a river.", "Name a mountain.", "Name a city.")
    ]
    first = asyncio.run(backend.generate(requests))
    assert first == asyncio.run(backend.generate(requests))
    assert all(len(r.completions) == 2 for r in first)
    texts = [c.text for r in first for c in r.completions]
    assert len(set(texts)) > 1


def test_generation_and_scoring_with_a_shared_prefix_raise_no_deprecation_warning(backend, caplog):
    """The shared-prefix KV cache is handed to ``generate`` and to the forward pass as a Cache
    object: transformers' deprecation of other forms of ``past_key_values`` (a FutureWarning or a
    logged warning) must not reach users on every run."""
    import logging
    import warnings

    system = Message(role="system", content="You are a careful assistant. " * 6)
    gen = [
        GenerationRequest(
            messages=[system, Message(role="user", content=q)],
            params=SamplingParams(n=2, temperature=0.8, max_tokens=4, seed=1),
        )
        for q in ("Name a colour.", "Name a fruit.")
    ]
    score = [
        ScoreRequest(messages=[system, *_conv(a)], segment=2)
        for a in ("Paris is the capital.", "It is Paris, of course.")
    ]
    caplog.set_level(logging.WARNING, logger="transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        asyncio.run(backend.generate(gen))
        asyncio.run(backend.score(score))
    assert not [r for r in caplog.records if "past_key_values" in r.getMessage()]
