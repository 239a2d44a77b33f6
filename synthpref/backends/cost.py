"""The run's spending: dollars per model call, and the ``settings.max_cost_usd`` cap.

One :class:`CostMeter` per run is shared by every model client. A paid result's dollars are
committed to the request cache together with the result (``RequestCache.put``), so what a run
directory has spent survives kills and reruns: the cap applies to the run directory as a whole, not
to one invocation, and answers served from the cache cost nothing again.

The cap is checked before anything is sent: each request books its ceiling (every prompt token at the
highest prompt rate, ``max_tokens`` times ``n`` output tokens, see :meth:`Price.ceiling`), and a
request whose ceiling would take spent plus booked past the cap is not sent. When its result comes
back the booking is replaced by what the provider billed. So a run can never pass the cap, and stops
short of it by at most the ceilings of the requests it held back.
"""

from __future__ import annotations

import threading

from synthpref.errors import RunPaused


class BudgetExceeded(RunPaused):
    """The run stopped before it would pass ``settings.max_cost_usd``; everything finished is
    checkpointed and cached, and a rerun with a higher cap resumes (the CLI exits 3)."""


class CostMeter:
    """Dollars spent by a run directory (``spent_before``: earlier invocations, from its cache) and
    by this invocation, and the bookings of requests in flight, against an optional cap."""

    def __init__(self, cap: float | None = None, spent_before: float = 0.0) -> None:
        self.cap = cap
        self.spent_before = spent_before
        self.spent = 0.0
        self.booked = 0.0
        self.held_back = 0
        self.refused = 0.0  # the ceiling of the last request that did not fit
        self._lock = threading.Lock()

    @property
    def total(self) -> float:
        """What the run directory has spent, this invocation included."""
        return self.spent_before + self.spent

    def book(self, ceiling: float) -> bool:
        """Reserve ``ceiling`` dollars for a request about to be sent; False (and nothing booked)
        if that could take the run past the cap."""
        with self._lock:
            if self.cap is not None and self.total + self.booked + ceiling > self.cap + 1e-12:
                self.held_back += 1
                self.refused = ceiling
                return False
            self.booked += ceiling
            return True

    def settle(self, booked: float, dollars: float) -> None:
        """A booked request came back, billed ``dollars`` (or failed: ``dollars`` 0)."""
        with self._lock:
            self.booked = max(0.0, self.booked - booked)
            self.spent += dollars

    def exceeded(self, what: str) -> BudgetExceeded:
        left = max(0.0, (self.cap or 0.0) - self.total)
        return BudgetExceeded(
            f"stopped before passing settings.max_cost_usd = ${self.cap:.2f}: this run directory "
            f"has spent ${self.total:.4f} (${self.spent:.4f} in this invocation), ${left:.4f} is "
            f"left, and {what} could cost up to ${self.refused:.4f} each (prompt at the highest "
            "input rate, max_tokens of every sample at the output rate). Everything finished is "
            "checkpointed and cached: raise max_cost_usd (or remove it) and run the same command "
            "to resume."
        )
