"""An adaptive bound on requests in flight to a server (AIMD, as TCP congestion control).

A fixed concurrency limit is either too low for a large deployment or too high for a small one. The
window starts at its ceiling and moves with what the server says:

- **shrink** (multiply by ``decrease``) on an overload signal: a timeout, a dropped connection, a 5xx,
  a 429, or a latency well above its baseline (the latency of an unloaded server, learnt per kind of
  request). The last matters for self-hosted servers such
  as ``vllm serve``, which queue excess requests rather than refuse them: latency is the only sign
  they are saturated. One shrink per round trip: signals from requests that started before the last
  shrink are ignored, so one burst of failures halves the window once, not once per failed request.
- **grow** additively when healthy: ``increase`` per window's worth of successes, up to the ceiling.

:class:`AIMDWindow` is the controller, plain arithmetic with no clock or event loop, so it is tested
deterministically; :class:`AsyncWindow` gates asyncio tasks on it (FIFO) and measures latency with
an injectable clock.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

#: what one finished request tells the window: ``ok`` (with its latency), ``overload`` (shrink), or
#: ``neutral`` (a failure that says nothing about load, e.g. HTTP 400 or a cancelled task)
Signal = Literal["ok", "overload", "neutral"]


@dataclass
class LatencyTrack:
    """The latency baseline of one kind of request, and its latest samples.

    The baseline is a moving average that follows lower latencies quickly (``down_alpha``) and
    higher ones slowly (``up_alpha``; a tenth of that for samples over ``healthy_factor`` times it),
    so it sits
    near the latency of an unloaded server: a queue building up does not drag it along, while a
    genuine change of workload still moves it eventually. Its first ``warmup`` samples set it as
    their plain mean.
    """

    baseline: float | None = None
    samples: int = 0
    recent: deque = field(default_factory=deque)

    def add(self, latency: float, w: AIMDWindow) -> str:
        """Record a sample and judge the recent median against the baseline: ``congested`` over
        ``latency_factor`` times it, ``healthy`` under ``healthy_factor`` times it, else ``hold``."""
        self.samples += 1
        self.recent.append(latency)
        while len(self.recent) > w.recent_size:
            self.recent.popleft()
        if self.baseline is None or self.samples <= w.warmup:
            prev = self.baseline or 0.0
            self.baseline = prev + (latency - prev) / self.samples
            return "healthy"
        limit = w.latency_factor * self.baseline
        median = statistics.median(self.recent)
        if len(self.recent) >= w.min_recent and median > limit:
            verdict = "congested"
        elif median > w.healthy_factor * self.baseline:
            verdict = "hold"
        else:
            verdict = "healthy"
        if latency < self.baseline:
            alpha = w.down_alpha
        else:
            alpha = w.up_alpha if latency <= w.healthy_factor * self.baseline else w.up_alpha / 10
        self.baseline += alpha * (latency - self.baseline)
        return verdict


@dataclass
class AIMDWindow:
    """The in-flight limit and the latency baselines it is judged against.

    ``start()`` hands out a ticket (a sequence number) and ``finish(ticket, signal, latency, kind)``
    reports what happened to that request. Latency is judged per ``kind`` (requests of different
    sizes, e.g. long generations and short judge calls, each get their own :class:`LatencyTrack`),
    on the median of the last ``recent_size`` samples, so one long generation among short ones is not
    mistaken for congestion. Between ``healthy_factor`` and ``latency_factor`` times the baseline
    the window holds: a queue is forming, so it does not grow into it.
    """

    maximum: int = 256
    minimum: int = 1
    initial: int | None = None
    decrease: float = 0.5
    increase: float = 1.0
    latency_factor: float = 2.0
    #: grow only while the recent median latency is under this many times the baseline
    healthy_factor: float = 1.5
    #: latency alone never shrinks the window below this (errors may, down to ``minimum``): a
    #: workload that really got slower must not starve while the baseline learns it
    latency_minimum: int = 8
    recent_size: int = 5
    #: fresh latency samples needed after a shrink before latency may shrink the window again
    min_recent: int = 3
    warmup: int = 8
    down_alpha: float = 0.2
    up_alpha: float = 0.005

    limit: float = field(init=False)
    in_flight: int = field(default=0, init=False)
    shrinks: Counter = field(default_factory=Counter, init=False)
    tracks: dict[str, LatencyTrack] = field(default_factory=dict, init=False)
    _started: int = field(default=0, init=False)
    _epoch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(f"need 1 <= minimum ({self.minimum}) <= maximum ({self.maximum})")
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {self.decrease}")
        start = self.maximum if self.initial is None else self.initial
        self.limit = float(min(self.maximum, max(self.minimum, start)))

    @property
    def size(self) -> int:
        """How many requests may be in flight now."""
        return max(self.minimum, min(self.maximum, int(self.limit)))

    def has_room(self) -> bool:
        return self.in_flight < self.size

    def baseline(self, kind: str = "") -> float | None:
        track = self.tracks.get(kind)
        return track.baseline if track else None

    def start(self) -> int:
        self.in_flight += 1
        self._started += 1
        return self._started

    def finish(
        self, ticket: int, signal: Signal, latency: float | None = None, kind: str = ""
    ) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if signal == "overload":
            self._shrink(ticket, "error")
        elif signal == "ok":
            track = self.tracks.setdefault(kind, LatencyTrack())
            if ticket <= self._epoch and latency is not None:
                # started before the last shrink, into the queue that shrink answered: it may
                # lower the baseline but neither raises it nor is judged
                if track.baseline is not None and latency < track.baseline:
                    track.baseline += self.down_alpha * (latency - track.baseline)
                return
            verdict = "healthy" if latency is None else track.add(latency, self)
            if verdict == "congested":
                self._shrink(ticket, "latency")
            elif verdict == "healthy":
                self.limit = min(float(self.maximum), self.limit + self.increase / self.limit)

    def _shrink(self, ticket: int, reason: str) -> None:
        if ticket <= self._epoch:
            return  # started before the last shrink: that shrink already answered this load
        floor = self.minimum if reason == "error" else max(self.minimum, self.latency_minimum)
        if self.limit <= floor:
            return
        self.limit = max(float(floor), self.limit * self.decrease)
        self._epoch = self._started
        for track in self.tracks.values():
            track.recent.clear()
        self.shrinks[reason] += 1


class AsyncWindow:
    """Admit asyncio tasks in arrival order while the window has room.

    ``classify`` maps an exception raised inside a slot to a :data:`Signal`; cancellation is always
    neutral. A slot returned to the window wakes as many waiters as the (possibly grown) window admits.
    """

    def __init__(
        self,
        window: AIMDWindow,
        classify: Callable[[BaseException], Signal] = lambda exc: "neutral",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int, int, str], None] | None = None,
    ) -> None:
        self.window = window
        self.classify = classify
        self.clock = clock
        self.on_change = on_change  # (old size, new size, signal) whenever the size changes
        self.peak_in_flight = 0
        self._waiters: deque[asyncio.Future[int]] = deque()

    async def acquire(self) -> int:
        if not self._waiters and self.window.has_room():
            return self._start()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # a slot was handed over as we were cancelled
                self.release(fut.result(), "neutral")
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(
        self, ticket: int, signal: Signal, latency: float | None = None, kind: str = ""
    ) -> None:
        before = self.window.size
        self.window.finish(ticket, signal, latency, kind)
        if self.on_change and self.window.size != before:
            self.on_change(before, self.window.size, signal)
        self._wake()

    def _start(self) -> int:
        ticket = self.window.start()
        self.peak_in_flight = max(self.peak_in_flight, self.window.in_flight)
        return ticket

    def _wake(self) -> None:
        while self._waiters and self.window.has_room():
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._start())

    @asynccontextmanager
    async def slot(
        self, kind: str = "", ready: Callable[[], Awaitable[object]] | None = None
    ) -> AsyncIterator[int]:
        """``async with window.slot(kind): await request()`` holds one place in the window; ``kind``
        names the latency baseline the request is judged against (requests of similar size).

        ``ready``, when given, is awaited once the place is held and before the latency clock
        starts: a client-side wait (a rate cap, a server's ``Retry-After``) then neither lets requests
        pile up behind the window and leave in a burst, nor counts as the server's latency. A failure
        inside it says nothing about load (neutral).
        """
        ticket = await self.acquire()
        if ready is not None:
            try:
                await ready()
            except BaseException:
                self.release(ticket, "neutral")
                raise
        t0 = self.clock()
        try:
            yield ticket
        except asyncio.CancelledError:
            self.release(ticket, "neutral")
            raise
        except BaseException as exc:
            self.release(ticket, self.classify(exc))
            raise
        self.release(ticket, "ok", self.clock() - t0, kind)
