"""Tolerant parsing of judge output.

Small and large models alike wrap their verdicts in markdown, JSON, fractions or chatter. These parsers
accept the common shapes and raise :class:`ParseError` (with what was seen) for everything else, so the
caller can re-ask or record a failed judgment; they never guess.
"""

from __future__ import annotations

import json
import re

from synthpref.errors import SynthprefError


class ParseError(SynthprefError, ValueError):
    """A judge's reply does not parse; the message says what was seen (judges re-ask, then record a
    failed judgment)."""


_NUM = r"(-?\d+(?:\.\d+)?)"
_LABELLED = re.compile(
    r"(?:rating|score|grade)\s*\**\s*[:=]?\s*\**\s*\[?\s*" + _NUM + r"(?:\s*(?:/|out of)\s*(\d+))?",
    re.IGNORECASE,
)
_FRACTION = re.compile(_NUM + r"\s*(?:/|out of)\s*(\d+)")
_LEADING = re.compile(r"^\W*" + _NUM + r"\b")
_RATIONALE = re.compile(
    r"(?:rationale|reason(?:ing)?|explanation)\s*\**\s*[:=]\s*\**\s*(.*)", re.I | re.S
)


def parse_rating(text: str, low: int = 1, high: int = 5) -> tuple[float, str]:
    """Return (rating, rationale) from a judge's reply, or raise ParseError."""
    candidates: list[tuple[float, int | None]] = []
    obj = json_object(text)
    if obj is not None:
        for key in ("rating", "score", "grade"):
            if isinstance(obj.get(key), int | float) and not isinstance(obj.get(key), bool):
                rationale = (
                    obj.get("rationale") or obj.get("reason") or obj.get("explanation") or ""
                )
                return _in_range(float(obj[key]), low, high, text), str(rationale)
    for pattern in (_LABELLED, _FRACTION, _LEADING):
        m = pattern.search(text)
        if m:
            scale = int(m.group(2)) if m.lastindex and m.lastindex >= 2 and m.group(2) else None
            candidates.append((float(m.group(1)), scale))
            break
    if not candidates:
        raise ParseError(f"no rating found in {clip(text)!r}")
    value, scale = candidates[0]
    if scale is not None and scale != high:
        raise ParseError(f"rating given out of {scale}, expected out of {high}: {clip(text)!r}")
    return _in_range(value, low, high, text), _rationale(text)


def _in_range(value: float, low: int, high: int, text: str) -> float:
    if not low <= value <= high:
        raise ParseError(f"rating {value:g} is outside {low}-{high}: {clip(text)!r}")
    return value


def _rationale(text: str) -> str:
    m = _RATIONALE.search(text)
    return (m.group(1) if m else "").strip()


def json_object(text: str) -> dict | None:
    """The outermost {...} of a reply as a dict, or None: models wrap JSON in prose and fences."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n] + "…"


def expected_rating(
    top_logprobs: list[dict[str, float]] | None, low: int = 1, high: int = 5
) -> tuple[float, dict[int, float]] | None:
    """Probability-weighted rating at the first generated token that is a rating digit (G-Eval).

    Small judges put most of their mass on one digit whatever they read; the weighted mean over the
    digits' probabilities still ranks responses, where the greedy digit ties them all. Returns the
    expectation and the renormalised distribution, or None when no position offers a rating digit.
    """
    import math

    if not top_logprobs:
        return None
    valid = {str(d): d for d in range(low, high + 1)}
    for alternatives in top_logprobs:
        best = max(alternatives, key=alternatives.get) if alternatives else ""
        if best.strip() not in valid:
            continue
        probs: dict[int, float] = {}
        for token, lp in alternatives.items():
            digit = valid.get(token.strip())
            if digit is not None:
                probs[digit] = probs.get(digit, 0.0) + math.exp(lp)
        total = sum(probs.values())
        dist = {d: p / total for d, p in sorted(probs.items())}
        return sum(d * p for d, p in dist.items()), dist
    return None
