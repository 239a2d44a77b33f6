"""Continuous batching (``decode_loop.py``) on the embedded model: what each row generates equals an
independent computation, rows leave the batch as they end and join it while others run, and a model
whose cache cannot be stacked falls back to ``model.generate``."""

from __future__ import annotations

import asyncio

import pytest
import torch

from synthpref.backends import decode_loop
from synthpref.backends.transformers_backend import TransformersBackend
from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.records import Message

#: a row's bits are checked at the thread count a user's run has (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("all_cores")

#: prompts of very different lengths, so rows join a batch whose cache is longer or shorter
QUESTIONS = [
    "Hi.",
    "Name a primary colour.",
    "Explain in detail, step by step, how a bicycle's gears make climbing a steep hill easier.",
    "What is 3 + 4?",
    "Write two sentences about the sea, then one about the mountains, then stop.",
    "Say hello in French.",
]


@pytest.fixture(scope="module")
def backend(embedded_dir):
    return TransformersBackend(str(embedded_dir), batch_size=4)  # 6 requests: rows must join


#: the sampled requests most tests run: n=2 samples per prompt, top-p, a stop string, rows ending at
#: different steps
SAMPLED = SamplingParams(n=2, temperature=0.9, top_p=0.9, max_tokens=12, seed=5, stop=["."])


@pytest.fixture(scope="module")
def fixed_sampled(backend):
    """The SAMPLED requests on fixed ``model.generate`` batches (an independent computation: one
    sampling setting a batch, no rows joining or leaving), computed once for the module."""
    return _generate(backend, _requests(SAMPLED), continuous=False)


def _texts(results) -> list[list[str]]:
    return [[c.text for c in r.completions] for r in results]


def _requests(params: SamplingParams, top_logprobs: int = 0) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            messages=[Message(role="user", content=q)], params=params, top_logprobs=top_logprobs
        )
        for q in QUESTIONS
    ]


def _generate(backend, requests, continuous: bool):
    backend.continuous_batching = continuous
    try:
        return asyncio.run(backend.generate(requests))
    finally:
        del backend.continuous_batching


def test_greedy_rows_equal_each_prompt_generated_alone(backend):
    """Independent computation: ``model.generate`` on each prompt alone (batch of one, no padding,
    no other rows), greedy, stopping at the same stop ids."""
    requests = _requests(SamplingParams(temperature=0, max_tokens=16))
    results = _generate(backend, requests, continuous=True)
    tok, model = backend.tokenizer, backend.model
    for req, result in zip(requests, results, strict=True):
        ids = tok(backend.render_prompt(req), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=sorted(backend.stop_ids),
                pad_token_id=tok.pad_token_id,
            )
        alone = out[0, ids.input_ids.shape[1] :].tolist()
        if alone[-1] in backend.stop_ids:
            alone = alone[: alone.index(alone[-1]) + 1]
        assert result.completions[0].completion_tokens == len(alone)
        assert result.completions[0].text == tok.decode(alone, skip_special_tokens=True)


def test_sampled_rows_equal_the_fixed_batch_path(backend, fixed_sampled):
    """Each sample draws from its own seeded stream, so the running batch around it changes
    nothing: n=2 samples with a stop string read as on fixed ``model.generate`` batches."""
    running = _generate(backend, _requests(SAMPLED), continuous=True)
    for a, b in zip(fixed_sampled, running, strict=True):
        assert [c.text for c in a.completions] == [c.text for c in b.completions]
        assert [c.finish_reason for c in a.completions] == [c.finish_reason for c in b.completions]
        assert a.prompt_tokens == b.prompt_tokens


def test_top_logprobs_equal_the_fixed_batch_path(backend):
    requests = _requests(SamplingParams(temperature=0, max_tokens=6), top_logprobs=3)
    fixed = _generate(backend, requests, continuous=False)
    running = _generate(backend, requests, continuous=True)
    for a, b in zip(fixed, running, strict=True):
        ca, cb = a.completions[0], b.completions[0]
        assert ca.text == cb.text and len(ca.top_logprobs) == len(cb.top_logprobs)
        for x, y in zip(ca.top_logprobs, cb.top_logprobs, strict=True):
            assert x.keys() == y.keys()
            for token in x:
                assert x[token] == pytest.approx(y[token], abs=1e-4)


def test_rows_leave_when_they_end_and_waiting_rows_join(backend, monkeypatch):
    """Every decode step computes only rows still generating: the rows fed to the model over all
    steps add up to the tokens generated after each row's first (which its prefill drew), and no
    step ever holds more rows than ``batch_size``."""
    steps: list[int] = []
    joins: list[int] = []
    step, join = decode_loop.DecodeLoop.step, decode_loop.DecodeLoop.join

    def counted_step(self):
        steps.append(len(self.rows))
        return step(self)

    def counted_join(self, jobs):
        joins.append(len(self.rows))  # rows already running when these join
        return join(self, jobs)

    monkeypatch.setattr(decode_loop.DecodeLoop, "step", counted_step)
    monkeypatch.setattr(decode_loop.DecodeLoop, "join", counted_join)
    # replies end at their first full stop, at different steps
    params = SamplingParams(temperature=0, max_tokens=16, stop=["."])
    results = _generate(backend, _requests(params), True)
    generated = [r.completions[0].completion_tokens for r in results]
    assert sum(steps) == sum(g - 1 for g in generated)
    assert max(steps) <= backend.batch_size and len(joins) >= 2
    assert any(running > 0 for running in joins), "no row joined a running batch"


def test_a_cache_that_cannot_be_stacked_falls_back_to_model_generate(
    backend, monkeypatch, fixed_sampled
):
    monkeypatch.setattr(decode_loop, "stackable", lambda cache: False)
    backend.continuous_batching = True
    try:
        fallen_back = asyncio.run(backend.generate(_requests(SAMPLED)))
        assert backend.continuous_batching is False  # remembered: the next call goes straight there
    finally:
        del backend.continuous_batching
    assert _texts(fallen_back) == _texts(fixed_sampled)


def test_each_request_is_reported_as_it_ends(backend):
    """Results reach ``on_result`` from the running batch one request at a time, each once."""
    seen: list[int] = []
    requests = _requests(SamplingParams(temperature=0, max_tokens=12))
    results = asyncio.run(backend.generate(requests, on_result=lambda i, r: seen.append(i)))
    assert sorted(seen) == list(range(len(requests)))
    assert all(r is not None for r in results)


def test_concurrent_calls_share_steps_and_each_reads_as_if_alone(backend, monkeypatch):
    """Two calls with different sampling (greedy, and n=2 sampled with a stop string) in flight at
    once run in the one running batch; each call's texts equal the fixed-batch path run on that
    call alone (an independent computation: ``model.generate``, one sampling setting a batch)."""
    greedy = _requests(SamplingParams(temperature=0, max_tokens=12))[2:3]  # the longest prompt
    sampled = _requests(
        SamplingParams(n=2, temperature=0.9, top_p=0.95, max_tokens=12, seed=3, stop=["."])
    )[3:]
    alone = [_generate(backend, greedy, False), _generate(backend, sampled, False)]
    mixed_steps = []
    step = decode_loop.DecodeLoop.step

    def watched(self):
        mixed_steps.append(len({r.job.settings for r in self.rows}) > 1)
        return step(self)

    monkeypatch.setattr(decode_loop.DecodeLoop, "step", watched)

    async def both():
        return await asyncio.gather(backend.generate(greedy), backend.generate(sampled))

    together = asyncio.run(both())
    assert any(mixed_steps), "the two calls never shared a forward pass"
    for mine, ref in zip(together, alone, strict=True):
        assert [[c.text for c in r.completions] for r in mine] == [
            [c.text for c in r.completions] for r in ref
        ]
        assert [[c.finish_reason for c in r.completions] for r in mine] == [
            [c.finish_reason for c in r.completions] for r in ref
        ]


def test_a_cancelled_call_leaves_the_batch_and_the_engine_stops(backend, monkeypatch):
    steps = []
    step = decode_loop.DecodeLoop.step

    def counted(self):
        steps.append(len(self.rows))
        return step(self)

    monkeypatch.setattr(decode_loop.DecodeLoop, "step", counted)
    requests = _requests(SamplingParams(temperature=0, max_tokens=400))

    async def cancel_soon():
        task = asyncio.ensure_future(backend.generate(requests))
        while len(steps) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    engine = backend._engine
    thread = engine._thread
    if thread is not None:
        thread.join(timeout=30)
    assert engine._thread is None and engine.loop.rows == []
    assert len(steps) < 20, "the cancelled rows kept generating"


def test_a_forward_pass_that_fails_midway_falls_back_for_every_unfinished_request(
    backend, monkeypatch, fixed_sampled
):
    """A step that raises with rows running fails all of them (none is lost or half-reported);
    the call regenerates the unfinished ones on ``model.generate`` and gets what that path gives."""
    requests = _requests(SAMPLED)
    step = decode_loop.DecodeLoop.step
    calls = []

    def breaks_once(self):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("out of memory")
        return step(self)

    monkeypatch.setattr(decode_loop.DecodeLoop, "step", breaks_once)
    backend.continuous_batching = True
    try:
        seen: list[int] = []
        out = asyncio.run(backend.generate(requests, on_result=lambda i, r: seen.append(i)))
        assert backend.continuous_batching is False
    finally:
        del backend.continuous_batching
    assert sorted(seen) == list(range(len(requests)))  # each reported once
    assert _texts(out) == _texts(fixed_sampled)


def test_every_rows_logits_equal_its_prompt_run_alone_bit_for_bit(backend, monkeypatch):
    """The logits each row is drawn from, at every step, equal bit for bit those of its prompt
    run alone (independent computation: transformers' own forward passes with a ``DynamicCache``,
    one row, no padding, no mask, fed the tokens the row drew). Six prompts of 4 to 30 tokens,
    n=2 sampled with a stop string, at most 4 rows at once: rows join a running batch whose
    rows are longer and shorter than theirs and leave at different steps."""
    seen: dict[int, tuple[decode_loop.Row, list[torch.Tensor]]] = {}
    draw = decode_loop.DecodeLoop._draw

    def recorded(self, logits, rows):
        for row, x in zip(rows, logits, strict=True):
            seen.setdefault(id(row), (row, []))[1].append(x.clone())
        return draw(self, logits, rows)

    monkeypatch.setattr(decode_loop.DecodeLoop, "_draw", recorded)
    _generate(backend, _requests(SAMPLED), continuous=True)
    assert len(seen) == 2 * len(QUESTIONS)
    model = backend.model
    for row, logits in seen.values():
        assert len(logits) == len(row.tokens)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([row.job.prompt]), use_cache=True)
            alone = [out.logits[0, -1]]
            for token in row.tokens[:-1]:
                out = model(
                    input_ids=torch.tensor([[token]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                alone.append(out.logits[0, -1])
        for step, (mine, ref) in enumerate(zip(logits, alone, strict=True)):
            assert torch.equal(mine, ref), (row.job.prompt[-3:], row.sample, step)


def test_a_join_prefills_in_parts_within_its_token_budget(backend, monkeypatch):
    """Prompts of 10 to 40 tokens joining together run in several prefill passes of at most
    ``prefill_tokens`` tokens, end to end without padding (the model computes exactly the
    prompts' tokens); every row then generates what it generates in one pass."""
    one_pass = _generate(backend, _requests(SAMPLED), continuous=True)
    parts: list[list[int]] = []
    computed: list[int] = []
    prefill = decode_loop.DecodeLoop._prefill

    def counted(self, jobs):
        parts.append([len(j.prompt) for j in jobs])
        forward = self.model.forward

        def seen(*args, **kwargs):
            computed.append(kwargs["input_ids"].numel())
            return forward(*args, **kwargs)

        self.model.forward = seen
        try:
            return prefill(self, jobs)
        finally:
            del self.model.forward

    monkeypatch.setattr(decode_loop.DecodeLoop, "_prefill", counted)
    monkeypatch.setattr(backend._engine.loop, "prefill_tokens", 50)
    assert backend._engine.loop.packed_prefill
    running = _generate(backend, _requests(SAMPLED), continuous=True)
    assert len(parts) >= 3
    assert all(sum(p) <= 50 for p in parts if len(p) > 1)  # a longer prompt runs alone
    assert computed == [sum(p) for p in parts]  # no padding computed
    assert _texts(running) == _texts(one_pass)


def test_a_model_that_drops_row_lengths_is_prefilled_padded(backend, monkeypatch, caplog):
    """A model registered with the row-wise attention whose layers do not pass ``row_lengths``
    on: the loop sees that no layer attended prompt by prompt, prefills that join again padded
    under a mask (as for any other attention), warns, and pads from then on; greedy rows read
    as they do through the row-wise prefill."""
    from transformers import AttentionInterface

    from synthpref.backends import cpu_attention

    model, tok = backend.model, backend.tokenizer
    prompts = [
        tok(backend.render_prompt(r), add_special_tokens=False).input_ids
        for r in _requests(SamplingParams())
    ]
    settings = decode_loop.Settings(8, 0.0, 1.0, frozenset(backend.stop_ids))

    def generate() -> tuple[decode_loop.DecodeLoop, list[list[int]]]:
        loop = decode_loop.DecodeLoop(model, tok)
        jobs = [decode_loop.Job(p, 1, settings, [None], print, print) for p in prompts]
        with torch.inference_mode():
            loop.join(jobs)
            while loop.rows:
                loop.step()
                loop.leave()
        return loop, [job.finished[0].tokens for job in jobs]

    _, rowwise = generate()

    def dropping(*args, row_lengths=None, **kwargs):
        return cpu_attention.cpu_sdpa(*args, **kwargs)

    AttentionInterface.register(cpu_attention.NAME, dropping)
    try:
        loop, padded = generate()
    finally:
        AttentionInterface.register(cpu_attention.NAME, cpu_attention.cpu_sdpa)
    assert not loop.packed_prefill
    assert "does not pass its keyword arguments" in caplog.text
    assert padded == rowwise


def test_parts_keep_order_and_budget():
    def job(length: int, n: int = 1) -> decode_loop.Job:
        return decode_loop.Job([0] * length, n, None, [None] * n, print, print)  # type: ignore[arg-type]

    jobs = [job(10), job(10), job(30), job(30), job(30), job(200)]
    parts = decode_loop._parts(jobs, 64)
    assert [j for p in parts for j in p] == jobs  # every job once, in order
    assert [[len(j.prompt) for j in p] for p in parts] == [[10, 10], [30, 30], [30], [200]]
    two = decode_loop._parts([job(10, n=2), job(10, n=2), job(10, n=2)], 25)
    assert [len(p) for p in two] == [2, 1]  # prompts count, not rows: a prompt's samples share one
    packed = decode_loop._parts(jobs, 64, packed=True)  # end to end: lengths add up
    assert [[len(j.prompt) for j in p] for p in packed] == [[10, 10, 30], [30, 30], [200]]


def test_a_model_whose_attention_takes_no_row_lengths_still_generates_correctly(backend):
    """transformers' own ``sdpa`` attention ignores ``row_lengths``: the loop then passes a padding
    mask over the left-aligned rows (as it does for CUDA and for eager attention), and greedy rows
    read as they do through the row-wise attention (texts, not bits)."""
    from synthpref.backends.cpu_attention import NAME

    model, tok = backend.model, backend.tokenizer
    prompts = [
        tok(backend.render_prompt(r), add_special_tokens=False).input_ids
        for r in _requests(SamplingParams())
    ]
    settings = decode_loop.Settings(14, 0.0, 1.0, frozenset(backend.stop_ids))

    def generate() -> list[list[int]]:
        loop = decode_loop.DecodeLoop(model, tok)
        jobs = [decode_loop.Job(p, 1, settings, [None], print, print) for p in prompts]
        with torch.inference_mode():
            for step in range(60):  # as the engine does: a join or a step, then leave
                if step in (0, 3):  # rows of other lengths join a running batch at step 3
                    loop.join(jobs[:3] if step == 0 else jobs[3:])
                elif loop.rows:
                    loop.step()
                loop.leave()
        assert not loop.rows
        return [job.finished[0].tokens for job in jobs]

    rowwise = generate()
    model.set_attn_implementation("sdpa")
    try:
        assert not decode_loop.DecodeLoop(model, tok).row_attention
        masked = generate()
    finally:
        model.set_attn_implementation(NAME)
    assert masked == rowwise


def test_a_layer_keeps_its_remaining_rows_in_order_copying_only_the_rows_after_a_gap():
    """Independent computation: the kept rows' written columns, picked by index from a copy."""
    cache = decode_loop.RowCache()
    keys, values = torch.randn(6, 3, 70, 8), torch.randn(6, 3, 70, 8)
    layer = decode_loop.RowLayer(cache, keys.clone(), values.clone(), width=50)
    buffer = layer._k
    layer.keep(2, torch.tensor([3, 5]), width=40)  # rows 2 and 4 ended
    assert layer._k.data_ptr() == buffer.data_ptr()  # in place: no new buffer
    assert torch.equal(layer.keys, keys[[0, 1, 3, 5], :, :40])
    assert torch.equal(layer.values, values[[0, 1, 3, 5], :, :40])
    layer.keep(3, torch.tensor([], dtype=torch.long), width=30)  # the last row ended: no copy
    assert torch.equal(layer.keys, keys[[0, 1, 3], :, :30])
