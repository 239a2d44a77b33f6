"""Client-side request and token rate caps for a hosted API, and the pause a server asks for.

A hosted provider limits requests per minute and tokens per minute per key and answers 429 past
either; sending at the cap instead of into it saves the retries. :class:`RateLimiter` books each
request a send time, in arrival order, so that sends are spaced evenly: ``60 / requests_per_minute``
seconds after the previous one, and ``tokens * 60 / tokens_per_minute`` seconds after a request of
``tokens`` tokens (its estimate: the caller's, see ``OpenAIBackend``). There is no burst: the first
request goes at once and the steady rate equals the cap, never more. A booking is not refunded when
its request is cancelled or fails, which errs on the slow side.

:meth:`RateLimiter.pause` holds every request booked from now on until a time a server named
(``Retry-After`` on a 429 or 503), so the requests not yet sent wait with the one that was told to.
:func:`retry_after` reads that time from a failed response, for every hosted backend.

Plain arithmetic on an injectable clock (``reserve``), with one ``await`` on an injectable sleep
(``acquire``), so tests need no wall time.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone


class RateLimiter:
    """Spaces sends to at most ``requests_per_minute`` and ``tokens_per_minute`` (either may be None:
    no cap) and honours pauses; with neither cap and no pause, ``acquire`` returns at once."""

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        for name, value in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.clock = clock
        self.sleep = sleep
        self._next_request = float("-inf")  # earliest send allowed by the request cap
        self._next_token = float("-inf")  # earliest send allowed by the token cap
        self._paused_until = float("-inf")
        #: seconds requests spent waiting here, summed (progress reports and tests read it)
        self.waited = 0.0

    def reserve(self, tokens: int = 0) -> float:
        """Book the next send for a request of ``tokens`` tokens; return how long to wait for it."""
        now = self.clock()
        at = max(now, self._next_request, self._next_token, self._paused_until)
        if self.requests_per_minute is not None:
            self._next_request = at + 60.0 / self.requests_per_minute
        if self.tokens_per_minute is not None:
            self._next_token = at + max(0, tokens) * 60.0 / self.tokens_per_minute
        return at - now

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until a request of ``tokens`` tokens may be sent."""
        delay = self.reserve(tokens)
        if delay > 0:
            self.waited += delay
            await self.sleep(delay)

    def pause(self, seconds: float) -> None:
        """Send nothing booked from now on for ``seconds`` (a server's ``Retry-After``)."""
        self._paused_until = max(self._paused_until, self.clock() + seconds)


def retry_after(exc: BaseException | None) -> float | None:
    """Seconds the server asked the client to wait before trying again, from a failed response's
    headers: ``retry-after-ms`` (OpenAI), else ``Retry-After`` as seconds or as an HTTP date
    (RFC 9110); None when it said nothing usable. A date in the past is 0."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
    text = headers.get("retry-after")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        value = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, value) if math.isfinite(value) else None
