"""The tolerant rating parser accepts common shapes and refuses to guess."""

from __future__ import annotations

import math

import pytest

from synthpref.judges.parsing import ParseError, expected_rating, parse_rating


@pytest.mark.parametrize(
    "text, value",
    [
        ("Rating: 4\nRationale: good", 4),
        ("**Rating:** 5", 5),
        ("Score = 3/5 because", 3),
        ('{"rating": 2, "rationale": "meh"}', 2),
        ("I'd give it 4 out of 5.", 4),
        ("Rating: [3]", 3),
        ("3", 3),
    ],
)
def test_accepts(text, value):
    assert parse_rating(text)[0] == value


@pytest.mark.parametrize(
    "text", ["", "Rating: N", "Rating: 9", "Score: 7/10", "It is quite good.", "Rating: -1"]
)
def test_rejects(text):
    with pytest.raises(ParseError):
        parse_rating(text)


def test_rationale_extracted():
    assert parse_rating("Rating: 4\nRationale: clear and correct")[1] == "clear and correct"


def test_expected_rating_weights_digits():
    top = [{" 4": math.log(0.6), " 5": math.log(0.2), " The": math.log(0.2)}]
    value, dist = expected_rating(top)
    assert dist == pytest.approx({4: 0.75, 5: 0.25})
    assert value == pytest.approx(4.25)
    assert expected_rating([{"Hello": 0.0}]) is None
    assert expected_rating(None) is None
