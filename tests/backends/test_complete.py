"""Raw-text completion (capability ``complete``: ``render_chat`` and ``complete``) on every backend.

The strongest check is independent of the implementation: completing the text of
``render_chat(messages, add_generation_prompt=True)`` greedily must give exactly what chat
generation of the same messages gives, token for token, on the transformers backend, on vLLM and
through ``vllm serve``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from synthpref.backends.base import (
    Backend,
    CapabilityError,
    OnGenerated,
    RequestError,
    TransientBackendError,
)
from synthpref.backends.client import ModelClient
from synthpref.backends.end_of_turn import end_of_turn_id, stop_token_ids
from synthpref.backends.openai_backend import OpenAIBackend, OpenAISpec
from synthpref.backends.specs import ModelSpec
from synthpref.backends.types import (
    Completion,
    CompletionRequest,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Usage,
)
from synthpref.cache import RequestCache
from synthpref.records import Message
from tests.fake_openai_server import FakeServer, error

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)

CONVERSATIONS = [
    [Message(role="user", content="What is the capital of France?")],
    [Message(role="system", content="Be terse."), Message(role="user", content="Name a prime.")],
    [
        Message(role="user", content="Say hello in French."),
        Message(role="assistant", content="Bonjour!"),
        Message(role="user", content="And in Spanish?"),
    ],
]


def user(text: str) -> Message:
    return Message(role="user", content=text)


@pytest.fixture(scope="module")
def backend(embedded_dir):
    from synthpref.backends.transformers_backend import TransformersBackend

    return TransformersBackend(str(embedded_dir), device="cpu", dtype="float32", batch_size=4)


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_dir))


def _raw(backend, messages, params=GREEDY) -> CompletionRequest:
    return CompletionRequest(prompt=backend.render_chat(messages, True), params=params)


def _same(a: GenerationResult, b: GenerationResult) -> None:
    assert a.prompt_tokens == b.prompt_tokens
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in a.completions] == [
        (c.text, c.finish_reason, c.completion_tokens) for c in b.completions
    ]


# --- transformers / embedded ------------------------------------------------------------------


@pytest.mark.slow
def test_render_chat_is_the_tokenizers_chat_template_and_what_generation_renders(backend):
    tok = backend.tokenizer
    for messages in CONVERSATIONS:
        dicts = [m.model_dump() for m in messages]
        for gen in (False, True):
            assert backend.render_chat(messages, gen) == tok.apply_chat_template(
                dicts, tokenize=False, add_generation_prompt=gen
            )
        assert backend.render_chat(messages, True) == backend.render_prompt(
            GenerationRequest(messages=messages)
        )


@pytest.mark.slow
def test_greedy_completion_of_the_rendering_equals_chat_generation(backend):
    chat = [GenerationRequest(messages=m, params=GREEDY) for m in CONVERSATIONS]
    reported: list[int] = []
    raw = asyncio.run(
        backend.complete(
            [_raw(backend, m) for m in CONVERSATIONS], on_result=lambda i, r: reported.append(i)
        )
    )
    assert sorted(reported) == [0, 1, 2]
    for r, g in zip(raw, asyncio.run(backend.generate(chat)), strict=True):
        _same(r, g)
        assert r.completions[0].finish_reason == "stop"  # ended at <|im_end|>, not max_tokens
        assert "<|im_end|>" not in r.completions[0].text


@pytest.mark.slow
def test_the_text_is_tokenized_as_given_without_a_bos(backend):
    text = backend.render_chat(CONVERSATIONS[0], True)
    (result,) = asyncio.run(backend.complete([CompletionRequest(prompt=text, params=GREEDY)]))
    assert result.prompt_tokens == len(backend.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.slow
def test_a_seeded_sample_is_reproducible_and_independent_of_its_batch(embedded_dir):
    from synthpref.backends.transformers_backend import TransformersBackend

    wide = TransformersBackend(str(embedded_dir), device="cpu", dtype="float32", batch_size=8)
    narrow = TransformersBackend(str(embedded_dir), device="cpu", dtype="float32", batch_size=1)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3)
    # Magpie's prompts: a system prompt's rendering, then the start of a user turn
    prompts = [
        wide.render_chat([Message(role="system", content=system)]) + "<|im_start|>user\n"
        for system in ("You are a helpful assistant.", "You answer questions about cooking.")
    ] + ["<|im_start|>user\n"]
    reqs = [CompletionRequest(prompt=p, params=params) for p in prompts]

    def texts(b, rs):
        return {
            r.prompt: [c.text for c in out.completions]
            for r, out in zip(rs, asyncio.run(b.complete(rs)), strict=True)
        }

    reference = texts(wide, reqs)
    assert all(a != b for a, b in reference.values()), "the n samples are distinct draws"
    assert texts(narrow, reqs) == reference
    assert texts(wide, [reqs[2], reqs[0]]) == {p: reference[p] for p in (prompts[2], prompts[0])}
    assert texts(wide, [reqs[1]]) == {prompts[1]: reference[prompts[1]]}
    reseeded = [
        r.model_copy(update={"params": params.model_copy(update={"seed": 4})}) for r in reqs
    ]
    assert texts(wide, reseeded) != reference


@pytest.mark.slow
def test_stop_strings_and_max_tokens_set_the_finish_reason(backend):
    base = CompletionRequest(prompt="Monday, Tuesday, Wednesday,", params=GREEDY)
    (free,) = asyncio.run(backend.complete([base]))
    text = free.completions[0].text
    word = text.split()[3]  # a stop string the free text holds
    stop = base.model_copy(update={"params": GREEDY.model_copy(update={"stop": [word]})})
    short = base.model_copy(update={"params": GREEDY.model_copy(update={"max_tokens": 3})})
    stopped, cut = asyncio.run(backend.complete([stop, short]))
    assert stopped.completions[0].finish_reason == "stop"
    assert stopped.completions[0].text == text[: text.index(word)]
    assert cut.completions[0].finish_reason == "length"
    assert cut.completions[0].completion_tokens == 3
    assert text.startswith(cut.completions[0].text)


@pytest.mark.slow
def test_raw_text_keeps_think_blocks_that_chat_splits_off(backend):
    tok = backend.tokenizer
    ids = tok("<think>hmm</think>Paris.", add_special_tokens=False).input_ids
    req = CompletionRequest(prompt="x", params=GREEDY)
    raw = backend._completion(ids, {2}, req, None, raw=True)
    chat = backend._completion(ids, {2}, req, None, raw=False)
    assert raw.text == "<think>hmm</think>Paris." and raw.reasoning is None
    assert chat.text == "Paris." and chat.reasoning == "hmm"


def _model_with_eos(src: Path, dst: Path, eos_token: str, eos_id: int) -> Path:
    """The embedded model with another EOS (weights shared by a link): as a model whose
    generation config and tokenizer name ``<|endoftext|>`` while its template ends turns with
    ``<|im_end|>``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    for name, key, value in (
        ("generation_config.json", "eos_token_id", eos_id),
        ("config.json", "eos_token_id", eos_id),
        ("tokenizer_config.json", "eos_token", eos_token),
    ):
        data = json.loads((dst / name).read_text())
        data[key] = value
        (dst / name).write_text(json.dumps(data))
    return dst


@pytest.mark.slow
def test_replies_end_at_the_templates_end_of_turn_when_eos_is_another_token(
    backend, embedded_dir, tmp_path
):
    from synthpref.backends.transformers_backend import TransformersBackend

    other = TransformersBackend(
        str(_model_with_eos(embedded_dir, tmp_path / "eot", "<|endoftext|>", 0)),
        device="cpu",
        dtype="float32",
        batch_size=4,
    )
    assert other.tokenizer.eos_token_id == 0 and other.stop_ids == {0, 2}
    chat = [GenerationRequest(messages=m, params=GREEDY) for m in CONVERSATIONS]
    expected = asyncio.run(backend.generate(chat))
    # chat generation and raw completion both stop at <|im_end|>, as on the original model
    for got, want in zip(asyncio.run(other.generate(chat)), expected, strict=True):
        _same(got, want)
    raw = [_raw(other, m) for m in CONVERSATIONS]
    for got, want in zip(asyncio.run(other.complete(raw)), expected, strict=True):
        _same(got, want)
    # its replies stop earlier than before this rule: its cache keys are new; the embedded
    # model (EOS is <|im_end|>) keeps its identity and so its cached results
    assert other.identity.endswith(":eot") and not backend.identity.endswith(":eot")


def test_end_of_turn_is_read_from_the_template(tokenizer):
    from tokenizers import AddedToken

    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids([2, 0], tokenizer) == {0, 2}
    llama = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    llama.add_tokens([AddedToken("<|eot_id|>", special=True)], special_tokens=False)
    llama.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    assert end_of_turn_id(llama) == llama.convert_tokens_to_ids("<|eot_id|>")
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    )
    assert end_of_turn_id(plain) is None
    plain.chat_template = None
    assert end_of_turn_id(plain) is None


# --- OpenAI-compatible servers ----------------------------------------------------------------


def test_openai_without_a_tokenizer_cannot_complete():
    spec = OpenAISpec(model="m", base_url="http://127.0.0.1:1/v1")
    assert "complete" not in spec.capabilities()
    backend = spec.build()
    assert not backend.supports("complete")
    with pytest.raises(CapabilityError, match="tokenizer"):
        backend.render_chat([user("hi")], True)
    with pytest.raises(CapabilityError, match="tokenizer"):
        asyncio.run(backend.complete([CompletionRequest(prompt="hi")]))


def test_openai_with_a_tokenizer_renders_its_chat_template(embedded_dir, tokenizer):
    spec = OpenAISpec(model="m", base_url="http://127.0.0.1:1/v1", tokenizer=str(embedded_dir))
    assert {"complete", "score"} <= spec.capabilities()
    backend = spec.build()
    assert backend.supports("complete")
    messages = CONVERSATIONS[1]
    assert backend.render_chat(messages, True) == tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
    )


def _completions(texts: list[str], prompt_tokens: int, completion_tokens: int | None = None):
    choices = [
        {"index": k, "text": t, "finish_reason": "length" if k else "stop", "logprobs": None}
        for k, t in enumerate(texts)
    ]
    body: dict[str, Any] = {
        "id": "fake",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": choices,
    }
    if completion_tokens is not None:
        body["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    return 200, body


def _scripted(server, embedded_dir, **kwargs) -> OpenAIBackend:
    return OpenAIBackend(
        "m",
        base_url=server.base_url,
        tokenizer=str(embedded_dir),
        retry_initial_wait=0.01,
        **{"max_context": 2048, **kwargs},
    )


def test_openai_sends_token_ids_and_the_sampling_params(embedded_dir, tokenizer):
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids

    def reply(path, body):
        return _completions(["a b", "c"], len(body["prompt"]), 5)

    with FakeServer(reply) as server:
        params = SamplingParams(n=2, temperature=0.5, top_p=0.9, max_tokens=7, seed=11, stop=["x"])
        reported: list[int] = []
        (result,) = asyncio.run(
            _scripted(server, embedded_dir).complete(
                [CompletionRequest(prompt=text, params=params)],
                on_result=lambda i, r: reported.append(i),
            )
        )
    probe, (path, body) = server.requests  # n > 1 on a new server: a one-token probe first
    assert probe[1]["max_tokens"] == 1 and probe[1]["n"] == 2
    assert path.endswith("/v1/completions")
    assert body["prompt"] == ids  # as tokenized here, no BOS added
    assert {k: body[k] for k in ("n", "temperature", "top_p", "max_tokens", "seed", "stop")} == {
        "n": 2,
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 7,
        "seed": 11,
        "stop": ["x"],
    }
    assert reported == [0]
    assert [c.text for c in result.completions] == ["a b", "c"]
    assert [c.finish_reason for c in result.completions] == ["stop", "length"]
    assert result.prompt_tokens == len(ids)
    # the probe was billed too (the fake server reports the same usage for it)
    assert result.usage == Usage(input_tokens=2 * len(ids), output_tokens=10)


def test_openai_completion_without_usage_counts_with_the_local_tokenizer(embedded_dir):
    with FakeServer(lambda path, body: _completions(["Paris is big."], 0)) as server:
        (result,) = asyncio.run(
            _scripted(server, embedded_dir).complete([CompletionRequest(prompt="Hi")])
        )
    assert result.usage is None and result.completions[0].completion_tokens == 4
    assert result.prompt_tokens == 1


def test_openai_completion_errors_are_typed_as_for_chat(embedded_dir):
    rejected = error(400, "prompt too long", param="prompt")
    with FakeServer(lambda path, body: rejected) as server:
        with pytest.raises(RequestError) as err:
            asyncio.run(_scripted(server, embedded_dir).complete([CompletionRequest(prompt="Hi")]))
    assert err.value.index == 0
    with FakeServer(lambda path, body: error(503, "busy")) as server:
        with pytest.raises(TransientBackendError):
            asyncio.run(
                _scripted(server, embedded_dir, max_retries=1).complete(
                    [CompletionRequest(prompt="Hi")]
                )
            )
        assert len(server.requests) == 2  # retried once
    long = CompletionRequest(prompt="word " * 40)
    with FakeServer() as server:
        with pytest.raises(RequestError, match="context"):
            asyncio.run(
                _scripted(server, embedded_dir, max_context=16).complete(
                    [CompletionRequest(prompt="Hi"), long]
                )
            )
        assert server.requests == []  # refused before sending


def test_openai_completion_keeps_to_the_window_and_splits_n_where_refused(embedded_dir):
    def reply(path, body):
        if body["n"] > 1:
            return error(400, "n must be 1", param="n")
        return _completions([f"seed={body.get('seed')}"], 3, 2)

    with FakeServer(reply) as server:
        backend = _scripted(server, embedded_dir, max_concurrency=2, adaptive_concurrency=False)
        reqs = [CompletionRequest(prompt=f"Hi {k}") for k in range(6)]
        reqs.append(CompletionRequest(prompt="Hi", params=SamplingParams(n=3, seed=5)))
        results = asyncio.run(backend.complete(reqs))
    assert backend.peak_in_flight <= 2
    assert backend.supports_n is False
    assert [c.text for c in results[-1].completions] == ["seed=5", "seed=6", "seed=7"]
    assert results[-1].usage == Usage(input_tokens=9, output_tokens=6)


# --- the request cache ------------------------------------------------------------------------


class _Echo(Backend):
    """Answers chat with "chat" and raw text with "raw", counting the calls."""

    capabilities = frozenset({"generate", "complete"})

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def identity(self) -> str:
        return "echo"

    async def _answer(self, kind, requests, on_result: OnGenerated | None):
        out = []
        for i, _ in enumerate(requests):
            self.calls.append(kind)
            result = GenerationResult(
                completions=[Completion(text=kind, finish_reason="stop", completion_tokens=1)],
                prompt_tokens=1,
            )
            if on_result:
                on_result(i, result)
            out.append(result)
        return out

    async def generate(self, requests, on_result=None):
        return await self._answer("chat", requests, on_result)

    async def complete(self, requests, on_result=None):
        return await self._answer("raw", requests, on_result)


def test_the_cache_keys_completions_apart_from_chat_requests(tmp_path):
    backend = _Echo()
    client = ModelClient("m", ModelSpec(backend="test"), backend, RequestCache(tmp_path / "c.db"))
    raw = CompletionRequest(prompt="Hi", params=GREEDY)
    chat = GenerationRequest(messages=[user("Hi")], params=GREEDY)
    assert raw.cache_key("echo") != chat.cache_key("echo")
    (a,) = asyncio.run(client.complete([raw]))
    (b,) = asyncio.run(client.generate([chat]))
    (c,) = asyncio.run(client.complete([raw]))  # a hit
    (d,) = asyncio.run(client.complete([raw.model_copy(update={"prompt": "Hi!"})]))
    assert [r.completions[0].text for r in (a, b, c, d)] == ["raw", "chat", "raw", "raw"]
    assert backend.calls == ["raw", "chat", "raw"]
    assert client.cache_hits == 1


# --- vLLM -------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_vllm_completion_equals_its_chat_generation_and_transformers(
    vllm_backend, transformers_reference
):
    reqs = [_raw(vllm_backend, m) for m in CONVERSATIONS]
    for m, r in zip(CONVERSATIONS, reqs, strict=True):
        assert r.prompt == transformers_reference.render_chat(m, True)
    chat = [GenerationRequest(messages=m, params=GREEDY) for m in CONVERSATIONS]
    reported: list[int] = []
    raw = asyncio.run(vllm_backend.complete(reqs, on_result=lambda i, r: reported.append(i)))
    assert sorted(reported) == [0, 1, 2]
    for r, g, t in zip(
        raw,
        asyncio.run(vllm_backend.generate(chat)),
        asyncio.run(transformers_reference.complete(reqs)),
        strict=True,
    ):
        _same(r, g)
        _same(r, t)


@pytest.mark.vllm
def test_openai_completion_on_vllm_serve_equals_transformers(vllm_server, transformers_reference):
    backend = OpenAIBackend(
        vllm_server.model, base_url=vllm_server.base_url, tokenizer=str(vllm_server.model_dir)
    )
    reqs = [_raw(backend, m) for m in CONVERSATIONS]
    remote = asyncio.run(backend.complete(reqs))
    for r, t in zip(remote, asyncio.run(transformers_reference.complete(reqs)), strict=True):
        _same(r, t)
        assert r.usage == Usage(
            input_tokens=t.prompt_tokens, output_tokens=t.completions[0].completion_tokens
        )


@pytest.mark.vllm
def test_vllm_stops_at_the_end_of_turn_where_eos_is_another_token(
    embedded_dir, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer

    from synthpref.backends.vllm_backend import VLLMBackend, VLLMSpec

    other = _model_with_eos(embedded_dir, tmp_path / "eot", "<|endoftext|>", 0)
    tokenizers = {path: AutoTokenizer.from_pretrained(str(path)) for path in (embedded_dir, other)}
    # the tokenizer alone decides; no engine is started
    monkeypatch.setattr(
        VLLMBackend, "tokenizer", property(lambda self: tokenizers[Path(self.spec.model)])
    )
    same = VLLMSpec(model=str(embedded_dir)).build()
    assert same.end_of_turn_stop is None  # <|im_end|> is the EOS, which vLLM stops at anyway
    moved = VLLMSpec(model=str(other)).build()
    assert moved.end_of_turn_stop == [2]
    for req in (CompletionRequest(prompt="Hi"), GenerationRequest(messages=[user("Hi")])):
        assert moved._sampling_params(req).stop_token_ids == [2]
