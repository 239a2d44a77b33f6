"""The adaptive in-flight window: controller arithmetic driven by hand-made latencies and signals, the
asyncio gate driven by events, and a simulated queueing server on a fake clock. Nothing here sleeps
or asserts on wall time."""

from __future__ import annotations

import asyncio
import heapq

import pytest

from synthpref.backends.window import AIMDWindow, AsyncWindow

# --- the controller ---------------------------------------------------------------------------


def run_ok(w: AIMDWindow, latencies) -> None:
    for lat in latencies:
        w.finish(w.start(), "ok", lat)


def test_starts_at_the_ceiling_and_stays_there_when_healthy():
    w = AIMDWindow(maximum=256)
    assert w.size == 256
    run_ok(w, [1.0] * 1000)
    assert w.size == 256 and not w.shrinks


def test_a_burst_of_errors_halves_the_window_once():
    w = AIMDWindow(maximum=256)
    tickets = [w.start() for _ in range(100)]
    for t in tickets:  # all started before the first failure was seen: one round trip
        w.finish(t, "overload")
    assert w.size == 128 and w.shrinks["error"] == 1
    # a request started after that shrink that fails again shrinks again
    w.finish(w.start(), "overload")
    assert w.size == 64 and w.shrinks["error"] == 2


def test_neutral_failures_do_not_shrink():
    w = AIMDWindow(maximum=16)
    for _ in range(50):
        w.finish(w.start(), "neutral")
    assert w.size == 16 and w.in_flight == 0


def test_grows_back_additively_one_step_per_window_of_successes():
    w = AIMDWindow(maximum=256, initial=100)
    run_ok(w, [1.0] * 100)  # one window's worth
    assert w.size == 100 or w.size == 101
    assert 100.9 < w.limit < 101.1
    run_ok(w, [1.0] * 1000)
    assert 109 <= w.size <= 111  # ~ +1 per ~105 successes: additive, not multiplicative


def test_never_below_the_floor_nor_above_the_ceiling():
    w = AIMDWindow(maximum=8, minimum=2)
    for _ in range(10):
        w.finish(w.start(), "overload")
    assert w.size == 2
    run_ok(w, [1.0] * 10_000)
    assert w.size == 8


def test_a_fixed_window_is_a_semaphore():
    w = AIMDWindow(maximum=3, minimum=3)
    w.finish(w.start(), "overload")
    run_ok(w, [1.0] * 10 + [100.0] * 10)
    assert w.size == 3
    assert [w.start() for _ in range(3)] and not w.has_room()


def test_rising_latency_shrinks_but_one_slow_request_does_not():
    w = AIMDWindow(maximum=256)
    run_ok(w, [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 1.0, 1.0] * 4)
    assert 0.85 <= w.baseline() <= 1.05  # near the fast end: an unloaded server's latency
    run_ok(w, [8.0])  # one long generation among fast ones
    run_ok(w, [1.0] * 8)
    assert w.size == 256 and not w.shrinks
    run_ok(w, [3.0, 4.0, 5.0, 6.0])  # the server started queueing
    assert w.shrinks["latency"] == 1 and w.size == 128


def test_latency_is_judged_per_kind_of_request():
    w = AIMDWindow(maximum=64)
    for _ in range(20):  # long generations and short judge calls on one server
        w.finish(w.start(), "ok", 10.0, kind="generate:512")
        w.finish(w.start(), "ok", 0.5, kind="generate:4")
    assert w.baseline("generate:512") == 10.0 and w.baseline("generate:4") == 0.5
    assert w.size == 64 and not w.shrinks


def test_a_forming_queue_stops_growth_before_it_forces_a_shrink():
    w = AIMDWindow(maximum=256, initial=100)
    run_ok(w, [1.0] * 20)
    run_ok(w, [1.8] * 5)  # over healthy_factor x baseline, under latency_factor x
    held = w.limit
    run_ok(w, [1.8] * 50)
    assert w.limit == held and not w.shrinks


def test_latency_alone_never_starves_the_window():
    w = AIMDWindow(maximum=256, latency_minimum=8)
    run_ok(w, [1.0] * 20)
    for _ in range(20):  # the workload really got 10x slower
        run_ok(w, [10.0] * 3)
    assert w.size == 8
    w.finish(w.start(), "overload")  # errors still may go lower
    assert w.size == 4


def test_after_a_latency_shrink_fresh_samples_are_needed_before_another():
    w = AIMDWindow(maximum=256, min_recent=3, latency_minimum=1)
    run_ok(w, [1.0] * 20)
    run_ok(w, [6.0] * 3)
    assert w.shrinks["latency"] == 1
    run_ok(w, [6.0] * 2)  # only two samples since: no verdict yet
    assert w.shrinks["latency"] == 1
    run_ok(w, [6.0])
    assert w.shrinks["latency"] == 2 and w.size == 64


def test_late_signals_from_before_a_shrink_are_ignored():
    w = AIMDWindow(maximum=64)
    run_ok(w, [1.0] * 20)
    old = [w.start() for _ in range(10)]
    w.finish(w.start(), "overload")
    assert w.size == 32
    for t in old:  # these were already in flight when the window shrank
        w.finish(t, "ok", 50.0)
        w_size = w.size
    assert w_size == 32 and w.shrinks["latency"] == 0


def test_congested_samples_barely_move_the_baseline():
    w = AIMDWindow(maximum=256)
    run_ok(w, [1.0] * 20)
    run_ok(w, [10.0] * 50)
    assert w.baseline() < 1.5
    assert w.size < 32


def test_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        AIMDWindow(maximum=4, minimum=5)
    with pytest.raises(ValueError):
        AIMDWindow(decrease=1.0)


# --- a simulated server that queues instead of refusing (as vllm serve does) -------------------


def simulate(window: AIMDWindow, *, capacity: int, service: float, requests: int):
    """A server that runs ``capacity`` requests at once, each taking ``service`` seconds, and
    queues the rest FIFO; the client keeps the window full. Returns (window sizes over time,
    peak requests queued at the server)."""
    now = 0.0
    server_free = [0.0] * capacity  # when each server slot is next free
    heapq.heapify(server_free)
    done: list[tuple[float, int, float]] = []  # (finish time, ticket, start time)
    sent = finished = 0
    sizes, peak_queue = [], 0
    while finished < requests:
        while sent < requests and window.has_room():
            ticket = window.start()
            begin = max(now, heapq.heappop(server_free))
            heapq.heappush(server_free, begin + service)
            heapq.heappush(done, (begin + service, ticket, now))
            sent += 1
        peak_queue = max(peak_queue, sum(1 for f, _, _ in done if f - service > now))
        now, ticket, started = heapq.heappop(done)
        window.finish(ticket, "ok", now - started)
        finished += 1
        sizes.append(window.size)
    return sizes, peak_queue


def test_queueing_server_drives_the_window_down_towards_its_capacity():
    w = AIMDWindow(maximum=256)
    sizes, _ = simulate(w, capacity=16, service=1.0, requests=3000)
    assert w.shrinks["latency"] >= 2 and not w.shrinks["error"]
    tail = sizes[-1000:]
    # a server that queues 240 of 256 requests ends up queueing at most ~3 service times' worth
    assert max(tail) <= 64, "the window must not stay far above what the server runs at once"
    assert min(tail) >= 16, "nor fall below it"


def test_server_with_room_keeps_the_full_window():
    w = AIMDWindow(maximum=64)
    sizes, peak_queue = simulate(w, capacity=128, service=1.0, requests=2000)
    assert peak_queue == 0 and min(sizes) == 64 and not w.shrinks


# --- the asyncio gate -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_gate_admits_in_order_up_to_the_window_and_hands_slots_on():
    async def main():
        gate = AsyncWindow(AIMDWindow(maximum=3), clock=FakeClock())
        release = [asyncio.Event() for _ in range(10)]
        entered: list[int] = []

        async def job(i: int) -> int:
            async with gate.slot():
                entered.append(i)
                await release[i].wait()
            return i

        tasks = [asyncio.create_task(job(i)) for i in range(10)]
        await asyncio.sleep(0)
        assert entered == [0, 1, 2] and gate.window.in_flight == 3
        release[1].set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert entered == [0, 1, 2, 3]
        for e in release:
            e.set()
        assert await asyncio.gather(*tasks) == list(range(10))
        assert gate.peak_in_flight == 3 and gate.window.in_flight == 0

    asyncio.run(main())


def test_gate_shrinks_on_classified_errors_and_measures_latency_on_its_clock():
    class Overloaded(Exception):
        pass

    async def main():
        clock = FakeClock()
        changes = []
        gate = AsyncWindow(
            AIMDWindow(maximum=8),
            classify=lambda exc: "overload" if isinstance(exc, Overloaded) else "neutral",
            clock=clock,
            on_change=lambda old, new, sig: changes.append((old, new, sig)),
        )
        async with gate.slot():
            clock.now += 2.5
        assert gate.window.baseline() == 2.5
        with pytest.raises(ValueError):
            async with gate.slot():
                raise ValueError("a 400: says nothing about load")
        assert gate.window.size == 8
        with pytest.raises(Overloaded):
            async with gate.slot():
                raise Overloaded
        assert gate.window.size == 4 and changes == [(8, 4, "overload")]

    asyncio.run(main())


def test_cancelled_waiters_and_holders_give_their_place_back():
    async def main():
        gate = AsyncWindow(AIMDWindow(maximum=1))
        hold = asyncio.Event()

        async def job():
            async with gate.slot():
                await hold.wait()

        first = asyncio.create_task(job())
        waiting = asyncio.create_task(job())
        await asyncio.sleep(0)
        waiting.cancel()
        first.cancel()
        await asyncio.gather(first, waiting, return_exceptions=True)
        assert gate.window.in_flight == 0 and not gate._waiters
        assert gate.window.size == 1 and not gate.window.shrinks
        hold.set()
        await asyncio.wait_for(job(), timeout=5)  # the place is free again

    asyncio.run(main())


def test_openai_errors_are_classified_as_overload_or_not():
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    from synthpref.backends.openai_backend import overload_signal

    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")

    def status(code: int):
        response = httpx.Response(code, request=request)
        return openai.APIStatusError("x", response=response, body=None)

    assert overload_signal(status(429)) == "overload"
    assert overload_signal(status(503)) == "overload"
    assert overload_signal(status(400)) == "neutral"
    assert overload_signal(status(404)) == "neutral"
    assert overload_signal(openai.APITimeoutError(request=request)) == "overload"
    assert overload_signal(openai.APIConnectionError(request=request)) == "overload"
    assert overload_signal(ValueError("bad json")) == "neutral"
