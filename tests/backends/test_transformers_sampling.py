"""Seeded sampling on the transformers backend: a request's text depends on the request and its seed only.

``batch_size`` and worker count are declared volatile (they change speed, never data), and a resumed run
regenerates only its cache misses, so a request's sampled text must not depend on which requests share
its batch.
"""

from __future__ import annotations

import asyncio

import pytest

from synthpref.backends.transformers_backend import TransformersBackend
from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.records import Message

#: a row's bits are checked at the thread count a user's run has (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("all_cores")

PROMPTS = [
    "Name a fruit.",
    "Name a colour.",
    "Name an animal.",
    "Say hello in French.",
    "What is 3 + 4?",
]


def _requests(prompts, seed=7, max_tokens=10) -> list[GenerationRequest]:
    params = SamplingParams(n=2, temperature=1.0, max_tokens=max_tokens, seed=seed)
    return [
        GenerationRequest(messages=[Message(role="user", content=p)], params=params)
        for p in prompts
    ]


def _texts(backend, requests) -> dict[str, list[str]]:
    results = asyncio.run(backend.generate(requests))
    return {
        r.messages[0].content: [c.text for c in out.completions]
        for r, out in zip(requests, results, strict=True)
    }


@pytest.fixture(scope="module")
def backends(embedded_dir):
    return {size: TransformersBackend(str(embedded_dir), batch_size=size) for size in (1, 3, 13)}


@pytest.mark.parametrize("seed, max_tokens", [(7, 6), (11, 8)])
def test_texts_do_not_depend_on_batch_size_or_neighbours(backends, seed, max_tokens):
    """Temperature 1 on a 135M model puts many draws near a boundary of the sampling
    distribution, where a logit moved in its last bits picks another token: (7, 6) read
    'If Jesteryr,' at batch size 1 and 'If Augment-A-' at 8 when a row's logits depended on
    its batch."""

    def texts(size, prompts):
        return _texts(backends[size], _requests(prompts, seed, max_tokens))

    reference = texts(13, PROMPTS)  # every row in one batch
    for size in (1, 3):
        assert texts(size, PROMPTS) == reference, size
    # a resumed run regenerates only its cache misses: other neighbours, in another order
    for subset in (PROMPTS[3:0:-1], [PROMPTS[4], PROMPTS[0]], [PROMPTS[2]]):
        assert texts(13, subset) == {p: reference[p] for p in subset}


def test_samples_of_one_request_differ_and_the_seed_matters(backends):
    texts = _texts(backends[13], _requests(PROMPTS))
    assert any(a != b for a, b in texts.values())  # n samples of a request are distinct draws
    reseeded = _texts(backends[13], _requests(PROMPTS, seed=8))
    assert reseeded != texts
    assert _texts(backends[13], _requests(PROMPTS)) == texts


def test_a_draw_is_the_first_token_whose_cumulative_probability_reaches_the_uniform():
    """Independent computation: the count of tokens whose cumulative probability lies below
    ``u`` times the total, over logits with ties, -inf (top-p cut) tokens and one-token rows."""
    import torch

    from synthpref.backends.row_sampling import RowSampler, draw_tokens

    torch.manual_seed(3)
    logits = torch.randn(64, 1000)
    logits[:8, 500:] = float("-inf")  # a top-p cut: plateaus in the cdf
    logits[8:12] = 0.0  # all tied
    logits[12, 1:] = float("-inf")  # one token left
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1.3, 1.0)]:
        seeds = range(len(logits))
        drawn = draw_tokens(
            logits, [torch.Generator().manual_seed(s) for s in seeds], temperature, top_p
        )
        scores = RowSampler([], temperature, top_p).warpers(None, logits)
        cdf = scores.softmax(-1).cumsum(-1)
        u = torch.stack(
            [1 - torch.rand((), generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
        expected = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=logits.shape[1] - 1)
        assert torch.equal(drawn, expected), (temperature, top_p)
        assert drawn[12] == 0
