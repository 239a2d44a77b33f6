"""Anthropic's Message Batches as a :class:`~synthpref.backends.batch.BatchProvider`: each line is
the ``params`` of one Messages API call, built by the online backend
(``AnthropicBackend._message_call``: system prompt with its ``cache_control`` breakpoint, stop
sequences, prefill, thinking), and each answer is parsed by the online parser, thinking blocks and
all. The API has no ``n``: a request for ``n`` samples is ``n`` lines.

Line outcomes: ``succeeded`` is done; ``expired``, ``canceled`` and an ``errored`` line whose error is
the API's (``api_error``, ``overloaded_error``, ``rate_limit_error``...) are submitted again; an
``errored`` ``invalid_request_error`` is the request's own (it fails as it would online).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from synthpref.backends.batch import BatchProvider, JobStatus, Line, Outcome, admin_call
from synthpref.backends.types import GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from synthpref.backends.anthropic_backend import AnthropicBackend

#: errors that say the request itself is wrong; any other ``errored`` line is tried again
REQUEST_ERRORS = {"invalid_request_error", "request_too_large"}


class AnthropicBatches(BatchProvider):
    name: ClassVar[str] = "anthropic"
    max_lines: ClassVar[int] = 100_000
    max_bytes: ClassVar[int] = 250_000_000  # the API takes batches up to 256 MB

    def __init__(self, backend: AnthropicBackend) -> None:
        self.backend = backend

    def bodies(self, i: int, request: GenerationRequest) -> list[dict[str, Any]]:
        kwargs, _, _ = self.backend._message_call(i, request)
        params = {k: v for k, v in kwargs.items() if k != "extra_body"}
        params.update(kwargs.get("extra_body") or {})
        return [params] * request.params.n

    async def submit(self, lines: Sequence[Line]) -> str:
        requests = [{"custom_id": ln.custom_id, "params": ln.body} for ln in lines]
        async with self.backend._client() as client:
            job = await self._call(
                f"creating a message batch of {len(lines)} requests at {self.backend.where}",
                lambda: client.messages.batches.create(requests=requests),
            )
        return job.id

    async def poll(self, job_id: str) -> JobStatus:
        async with self.backend._client() as client:
            job = await self._call(
                f"checking message batch {job_id} at {self.backend.where}",
                lambda: client.messages.batches.retrieve(job_id),
            )
        c = job.request_counts
        finished = c.succeeded + c.errored + c.canceled + c.expired
        progress = f"{job.processing_status}, {finished}/{finished + c.processing} requests"
        return JobStatus(ended=job.processing_status == "ended", progress=progress)

    async def outcomes(self, job_id: str) -> list[Outcome]:
        out: list[Outcome] = []
        async with self.backend._client() as client:

            async def read() -> None:
                out.clear()
                async for line in await client.messages.batches.results(job_id):
                    out.append(_outcome(line))

            await self._call(
                f"reading the results of message batch {job_id} from {self.backend.where}", read
            )
        return out

    def result(
        self, i: int, request: GenerationRequest, values: list[dict[str, Any]]
    ) -> GenerationResult:
        from anthropic.types import Message

        _, stripped, _ = self.backend._message_call(i, request)
        result = self.backend._result(i, [Message.model_validate(v) for v in values], stripped)
        return result.model_copy(
            update={"usage": result.billed().model_copy(update={"batch": True})}
        )

    async def _call(self, what: str, fn):
        from synthpref.backends.anthropic_backend import is_transient

        return await admin_call(what, fn, is_transient, self.backend.max_retries)


def _outcome(line: Any) -> Outcome:
    cid = str(line.custom_id)
    result = line.result
    kind = getattr(result, "type", None)
    if kind == "succeeded":
        return Outcome(cid, "done", value=result.message.model_dump(mode="json"))
    if kind == "errored":
        err = getattr(getattr(result, "error", None), "error", None)
        etype = getattr(err, "type", None) or "error"
        said = f"{etype}: {getattr(err, 'message', '') or 'no message'}"
        return Outcome(cid, "invalid" if etype in REQUEST_ERRORS else "retry", error=said)
    return Outcome(cid, "retry", error=f"{kind or 'no result'}")
