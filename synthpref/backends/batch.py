"""Provider batch jobs (``mode: batch``): requests sent as jobs, their ids kept in the run's cache.

The OpenAI Batch API and Anthropic's Message Batches answer within 24 hours at half the price. A
run hands a stage's cache misses to :func:`run_batch`, which works in *passes*: each pass collects the
jobs that have ended, submits the lines no job holds, reports every request whose lines are all
answered (so the request cache stores it, exactly as an online result), and raises
:class:`BatchPending` if any line is still with the provider. The executor runs passes until nothing
is pending (``settings.batch.wait``), or stops after one and lets a later ``synthpref run`` collect.

Every job and each of its lines is recorded in ``cache.sqlite`` (``batch_jobs``, ``batch_lines``)
the moment the provider accepts the job, and every line's outcome when the job ends. Hence:

- a killed run never resubmits a line a live job holds: the next pass finds the job and waits for it;
- a finished line is never lost: its answer is in ``batch_lines`` until the request is cached;
- only lines that expired, were cancelled or failed for the provider's reasons (5xx, overload) are
  resubmitted, each at most ``MAX_SUBMISSIONS`` times per invocation; a line the provider rejects as
  invalid fails its request (:class:`RequestError`) as the same request would online.

The one window that remains is between the provider accepting a job and the SQLite commit that
records it (microseconds): a kill exactly there leaves a job nobody collects, and its lines are
submitted again.

A provider is a :class:`BatchProvider`: the request bodies of a request (one per sample when the
provider has no ``n``), submit, poll, read the outcomes, and turn a request's answered lines into a
:class:`GenerationResult` with the online backend's own parser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from synthpref.backends.base import OnGenerated, RequestError
from synthpref.backends.types import GenerationRequest, GenerationResult
from synthpref.cache import RequestCache
from synthpref.errors import RunPaused

log = logging.getLogger(__name__)

#: how many times one line is submitted in one invocation before its request fails as transient
MAX_SUBMISSIONS = 3

LineState = Literal["pending", "done", "retry", "invalid"]


class BatchPending(RunPaused):
    """Lines of this call are still with the provider; ``jobs`` are their ids, ``done`` and
    ``total`` count this call's requests."""

    def __init__(self, message: str, jobs: Sequence[str] = (), done: int = 0, total: int = 0):
        super().__init__(message)
        self.jobs = list(jobs)
        self.done = done
        self.total = total

    def __reduce__(self):
        return type(self), (str(self), self.jobs, self.done, self.total)


@dataclass(frozen=True)
class Line:
    """One line of a job: ``sample`` of the request whose cache key is ``key``."""

    custom_id: str
    key: str
    sample: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What a job said about one line: its answer (``value``), or why it has none."""

    custom_id: str
    state: Literal["done", "retry", "invalid"]
    value: dict[str, Any] | None = None
    error: str = ""


@dataclass(frozen=True)
class JobStatus:
    ended: bool
    #: the provider refused the job as a whole (an input that failed validation): its message
    failed: str | None = None
    progress: str = ""


class BatchProvider(ABC):
    """One provider's batch API, over the online backend that builds and parses its requests."""

    name: ClassVar[str]
    #: most lines per job (the provider's limit, or lower)
    max_lines: ClassVar[int]
    #: most bytes of request bodies per job
    max_bytes: ClassVar[int]

    @abstractmethod
    def bodies(self, i: int, request: GenerationRequest) -> list[dict[str, Any]]:
        """Request ``i``'s line bodies: one, or one per sample where the provider has no ``n``
        (checked here, before anything is sent, as the online path checks)."""

    @abstractmethod
    async def submit(self, lines: Sequence[Line]) -> str:
        """Create a job holding ``lines``; its id."""

    @abstractmethod
    async def poll(self, job_id: str) -> JobStatus: ...

    @abstractmethod
    async def outcomes(self, job_id: str) -> list[Outcome]:
        """Every line of an ended job (a line missing from the provider's files counts as retry)."""

    @abstractmethod
    def result(
        self, i: int, request: GenerationRequest, values: list[dict[str, Any]]
    ) -> GenerationResult:
        """Request ``i``'s result from its lines' answers, in sample order."""


class BatchJobs:
    """The jobs and lines recorded in a run's ``cache.sqlite``."""

    def __init__(self, cache: RequestCache) -> None:
        self.cache = cache
        with cache.transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS batch_jobs (job_id TEXT PRIMARY KEY, provider TEXT, "
                "identity TEXT, lines INTEGER, state TEXT, created REAL, updated REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS batch_lines (job_id TEXT, custom_id TEXT, key TEXT, "
                "sample INTEGER, state TEXT, value TEXT, error TEXT, "
                "PRIMARY KEY (job_id, custom_id))"
            )
            db.execute("CREATE INDEX IF NOT EXISTS batch_lines_key ON batch_lines (key)")

    def record(self, job_id: str, provider: str, identity: str, lines: Sequence[Line]) -> None:
        now = time.time()
        with self.cache.transaction() as db:
            db.execute(
                "INSERT INTO batch_jobs VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (job_id, provider, identity, len(lines), now, now),
            )
            db.executemany(
                "INSERT INTO batch_lines VALUES (?, ?, ?, ?, 'pending', NULL, '')",
                [(job_id, ln.custom_id, ln.key, ln.sample) for ln in lines],
            )

    def lines(self, keys: Sequence[str]) -> dict[str, list[tuple[str, int, str, str | None, str]]]:
        """Per key: (job id, sample, state, value, error) of every line recorded for it."""
        out: dict[str, list] = {}
        with self.cache.transaction() as db:
            for k in range(0, len(keys), 500):
                chunk = list(keys[k : k + 500])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    "SELECT key, job_id, sample, state, value, error FROM batch_lines "
                    f"WHERE key IN ({marks}) ORDER BY rowid",
                    chunk,
                ).fetchall()
                for key, *rest in rows:
                    out.setdefault(key, []).append(tuple(rest))
        return out

    def settle(self, job_id: str, outcomes: Sequence[Outcome], state: str = "ended") -> None:
        """Record an ended job's outcomes; its lines the outcomes do not name become ``retry``."""
        with self.cache.transaction() as db:
            db.executemany(
                "UPDATE batch_lines SET state = ?, value = ?, error = ? "
                "WHERE job_id = ? AND custom_id = ?",
                [
                    (
                        o.state,
                        None if o.value is None else json.dumps(o.value),
                        o.error,
                        job_id,
                        o.custom_id,
                    )
                    for o in outcomes
                ],
            )
            db.execute(
                "UPDATE batch_lines SET state = 'retry', error = 'not in the job''s results' "
                "WHERE job_id = ? AND state = 'pending'",
                (job_id,),
            )
            db.execute(
                "UPDATE batch_jobs SET state = ?, updated = ? WHERE job_id = ?",
                (state, time.time(), job_id),
            )

    def fail(self, job_id: str, message: str) -> None:
        """The provider refused the whole job: every line of it is to be submitted again."""
        with self.cache.transaction() as db:
            db.execute(
                "UPDATE batch_lines SET state = 'retry', error = ? WHERE job_id = ? AND "
                "state = 'pending'",
                (message, job_id),
            )
            db.execute(
                "UPDATE batch_jobs SET state = 'failed', updated = ? WHERE job_id = ?",
                (time.time(), job_id),
            )

    def jobs(self) -> list[dict[str, Any]]:
        """Every recorded job, oldest first (``synthpref`` reports and tests read it)."""
        with self.cache.transaction() as db:
            rows = db.execute(
                "SELECT job_id, provider, identity, lines, state, created, updated FROM batch_jobs "
                "ORDER BY created"
            ).fetchall()
        names = ("job_id", "provider", "identity", "lines", "state", "created", "updated")
        return [dict(zip(names, row, strict=True)) for row in rows]


def custom_id(key: str, sample: int) -> str:
    """A line's id: unique within a job, and within Anthropic's ``[a-zA-Z0-9_-]{1,64}``."""
    return f"{key[:48]}-{sample}"


async def run_batch(
    provider: BatchProvider,
    identity: str,
    requests: Sequence[GenerationRequest],
    keys: Sequence[str],
    cache: RequestCache | None,
    on_result: OnGenerated | None,
    submissions: dict[tuple[str, int], int],
) -> list[GenerationResult]:
    """One pass over ``requests`` (cache misses, ``keys`` their cache keys); see the module text.

    ``submissions`` counts, per (key, sample), the lines submitted in this invocation (the backend
    keeps it, so resubmissions are bounded across passes). Returns every result when all are in;
    else reports those that are, and raises :class:`BatchPending` (or the first request's
    :class:`RequestError` whose line the provider rejected as invalid).
    """
    from synthpref.backends.base import BackendError, TransientBackendError

    if cache is None:
        raise BackendError("mode: batch needs the run's request cache to keep its job ids")
    if not requests:
        return []
    store = BatchJobs(cache)
    bodies = [provider.bodies(i, r) for i, r in enumerate(requests)]

    # 1. collect the jobs that hold these requests' pending lines and have ended
    recorded = store.lines(keys)
    live = {job for rows in recorded.values() for job, _, state, _, _ in rows if state == "pending"}
    progress: list[str] = []
    for job in sorted(live):
        status = await provider.poll(job)
        if status.failed is not None:
            log.warning(
                "%s batch %s failed: %s; its lines are submitted again",
                provider.name,
                job,
                status.failed,
            )
            store.fail(job, status.failed)
        elif status.ended:
            store.settle(job, await provider.outcomes(job))
        else:
            progress.append(f"{job} ({status.progress})" if status.progress else job)
    recorded = store.lines(keys)

    # 2. what each request has: answered samples, held samples, samples to (re)submit
    results: list[GenerationResult | None] = [None] * len(requests)
    to_submit: list[Line] = []
    invalid: list[tuple[int, str]] = []
    pending_jobs: set[str] = set()
    for i, key in enumerate(keys):
        answered: dict[int, str] = {}
        held: set[int] = set()
        errors: dict[int, str] = {}
        rejected = False
        for job, sample, state, value, error in recorded.get(key, []):
            if state == "done" and value is not None:
                answered[sample] = value
            elif state == "pending":
                held.add(sample)
                pending_jobs.add(job)
            elif state == "invalid":
                invalid.append((i, error))
                rejected = True
            else:
                errors[sample] = error
        if rejected:
            continue
        if len(answered) == len(bodies[i]):
            values = [json.loads(answered[k]) for k in range(len(bodies[i]))]
            results[i] = provider.result(i, requests[i], values)
            continue
        for sample, body in enumerate(bodies[i]):
            if sample in answered or sample in held:
                continue
            done = submissions.get((key, sample), 0)
            if done >= MAX_SUBMISSIONS:
                raise TransientBackendError(
                    f"request {i}: its batch line was submitted {done} times and came back "
                    f"unanswered each time (last: {errors.get(sample) or 'no answer'}); the run "
                    "stops here, and running it again submits it again (or use mode: online)"
                )
            to_submit.append(Line(custom_id(key, sample), key, sample, body))

    # 3. submit what no job holds, in jobs within the provider's limits
    new_jobs = []
    for chunk in _chunks(to_submit, provider.max_lines, provider.max_bytes):

        async def submit(chunk: list[Line] = chunk) -> str:
            job = await provider.submit(chunk)
            store.record(job, provider.name, identity, chunk)
            return job

        # A stage may abandon this call (a sibling call raised BatchPending first) and the run may
        # end: the submission goes on as its own task, shielded, and the executor waits for every
        # such task (drain_submissions) before a pass ends, so an accepted job is always recorded.
        task = asyncio.get_running_loop().create_task(submit())
        _SUBMITTING.add(task)
        task.add_done_callback(_SUBMITTING.discard)
        job = await asyncio.shield(task)
        for line in chunk:
            submissions[line.key, line.sample] = submissions.get((line.key, line.sample), 0) + 1
        new_jobs.append(job)
        log.info("%s batch %s submitted: %d lines", provider.name, job, len(chunk))

    # 4. report what is complete (the client caches it), then say what is not
    for i, result in enumerate(results):
        if result is not None and on_result is not None:
            on_result(i, result)
    if invalid:
        i, error = invalid[0]
        raise RequestError(
            f"request {i}: the {provider.name} batch API rejected its line: {error}", index=i
        )
    waiting = sorted(pending_jobs | set(new_jobs))
    if waiting:
        done = sum(r is not None for r in results)
        detail = "; ".join(progress) if progress else ""
        raise BatchPending(
            f"{len(requests) - done} of {len(requests)} requests are in {len(waiting)} "
            f"{provider.name} batch job(s) still running ({', '.join(waiting[:3])}"
            f"{', ...' if len(waiting) > 3 else ''}){': ' + detail if detail else ''}",
            jobs=waiting,
            done=done,
            total=len(requests),
        )
    return results  # type: ignore[return-value]


#: job submissions in flight (see run_batch): a pass ends only when none is
_SUBMITTING: set[asyncio.Task] = set()


async def drain_submissions() -> None:
    """Wait until every batch job submission in flight has been answered and recorded (or has
    failed); the executor calls it before it ends a pass or the run."""
    while _SUBMITTING:
        await asyncio.gather(*list(_SUBMITTING), return_exceptions=True)


def _chunks(lines: Sequence[Line], max_lines: int, max_bytes: int) -> list[list[Line]]:
    out: list[list[Line]] = []
    size = 0
    for line in lines:
        n = len(json.dumps(line.body)) + 200
        if not out or len(out[-1]) >= max_lines or size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(line)
        size += n
    return out


async def admin_call(what: str, fn, is_transient, retries: int = 5, first_wait: float = 1.0):
    """A batch API call (upload, create, poll, download) with retries on transient failures; a
    failure after them is a :class:`TransientBackendError` (a rerun resumes: job ids are kept), any
    other a :class:`BackendError` quoting the provider."""
    import asyncio

    from synthpref.backends.base import BackendError, TransientBackendError

    for attempt in range(retries + 1):
        try:
            return await fn()
        except BackendError:
            raise
        except Exception as exc:
            transient = is_transient(exc)
            if transient and attempt < retries:
                await asyncio.sleep(min(60.0, first_wait * 2**attempt))
                continue
            kind = TransientBackendError if transient else BackendError
            said = getattr(exc, "message", None) or str(exc)
            raise kind(f"{what} failed: {type(exc).__name__}: {said}") from exc
    raise AssertionError("unreachable")
