"""The OpenAI Batch API as a :class:`~synthpref.backends.batch.BatchProvider`: a JSONL file of
chat-completion bodies uploaded (``purpose: batch``), one batch per file, the output and error files
read back when it ends.

Bodies are the online backend's own (``OpenAIBackend._chat_kwargs``), so structured output,
``logprobs``/``top_logprobs`` and ``n`` behave as online, and answers are parsed by the online parser.
A server that does not take ``n > 1`` (``supports_n: false``) gets ``n`` lines of one sample each,
seeds ``seed + k``, as the online split sends them. Line outcomes: an answer with status 200 is
``done``; an expired or cancelled line, or one answered 408/429/5xx, is submitted again; any other
4xx is the request's own (``invalid``: the request fails as it would online).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from synthpref.backends.batch import BatchProvider, JobStatus, Line, Outcome, admin_call
from synthpref.backends.types import GenerationRequest, GenerationResult, Usage

if TYPE_CHECKING:
    from synthpref.backends.openai_backend import OpenAIBackend

ENDPOINT = "/v1/chat/completions"
ENDED = {"completed", "expired", "cancelled"}


class OpenAIBatches(BatchProvider):
    name: ClassVar[str] = "openai"
    max_lines: ClassVar[int] = 50_000
    max_bytes: ClassVar[int] = 190_000_000  # the API takes files up to 200 MB

    def __init__(self, backend: OpenAIBackend) -> None:
        self.backend = backend

    def _split(self, request: GenerationRequest) -> bool:
        return request.params.n > 1 and self.backend.supports_n is False

    def _singles(self, request: GenerationRequest) -> list[GenerationRequest]:
        p = request.params
        return [
            request.model_copy(
                update={
                    "params": p.model_copy(
                        update={"n": 1, "seed": None if p.seed is None else p.seed + k}
                    )
                }
            )
            for k in range(p.n)
        ]

    def bodies(self, i: int, request: GenerationRequest) -> list[dict[str, Any]]:
        if request.continue_final_message:
            from synthpref.backends.base import CapabilityError

            raise CapabilityError(
                f"request {i} asks to continue a final assistant message (prefill), which the "
                "OpenAI chat API cannot do, in batch mode as online"
            )
        parts = self._singles(request) if self._split(request) else [request]
        return [self.backend._chat_kwargs(r) for r in parts]

    async def submit(self, lines: Sequence[Line]) -> str:
        data = "".join(
            json.dumps(
                {"custom_id": ln.custom_id, "method": "POST", "url": ENDPOINT, "body": ln.body}
            )
            + "\n"
            for ln in lines
        ).encode()
        where = self.backend.where
        async with self.backend._client() as client:
            upload = await self._call(
                f"uploading a batch file of {len(lines)} lines to {where}",
                lambda: client.files.create(file=("synthpref-batch.jsonl", data), purpose="batch"),
            )
            job = await self._call(
                f"creating a batch at {where}",
                lambda: client.batches.create(
                    input_file_id=upload.id,
                    endpoint=ENDPOINT,
                    completion_window="24h",
                    metadata={"created_by": "synthpref"},
                ),
            )
        return job.id

    async def poll(self, job_id: str) -> JobStatus:
        async with self.backend._client() as client:
            job = await self._call(
                f"checking batch {job_id} at {self.backend.where}",
                lambda: client.batches.retrieve(job_id),
            )
        counts = job.request_counts
        progress = (
            f"{job.status}, {counts.completed + counts.failed}/{counts.total} lines"
            if counts is not None
            else job.status
        )
        if job.status == "failed":
            errors = getattr(job.errors, "data", None) or []
            said = "; ".join(f"{e.code}: {e.message}" for e in errors) or "no reason given"
            return JobStatus(ended=True, failed=said, progress=progress)
        return JobStatus(ended=job.status in ENDED, progress=progress)

    async def outcomes(self, job_id: str) -> list[Outcome]:
        async with self.backend._client() as client:
            job = await self._call(
                f"checking batch {job_id} at {self.backend.where}",
                lambda: client.batches.retrieve(job_id),
            )
            out: list[Outcome] = []
            for file_id in (job.output_file_id, job.error_file_id):
                if not file_id:
                    continue
                content = await self._call(
                    f"downloading file {file_id} of batch {job_id} from {self.backend.where}",
                    lambda f=file_id: client.files.content(f),
                )
                for raw in content.text.splitlines():
                    if raw.strip():
                        out.append(_outcome(json.loads(raw)))
        return out

    def result(
        self, i: int, request: GenerationRequest, values: list[dict[str, Any]]
    ) -> GenerationResult:
        from openai.types.chat import ChatCompletion

        if not self._split(request):
            parsed = [
                self.backend._parse_chat(i, request, ChatCompletion.model_validate(values[0]))
            ]
        else:
            parsed = [
                self.backend._parse_chat(i, single, ChatCompletion.model_validate(value))
                for single, value in zip(self._singles(request), values, strict=True)
            ]
        usage = Usage(batch=True)
        for part in parsed:
            usage = usage + part.billed()
        return GenerationResult(
            completions=[c for part in parsed for c in part.completions],
            prompt_tokens=parsed[0].prompt_tokens,
            usage=usage,
        )

    async def _call(self, what: str, fn):
        from synthpref.backends.openai_backend import is_transient

        return await admin_call(what, fn, is_transient, self.backend.max_retries)


def _outcome(line: dict[str, Any]) -> Outcome:
    """One line of an output or error file."""
    cid = str(line.get("custom_id"))
    response = line.get("response") or {}
    status = response.get("status_code")
    if status == 200 and isinstance(response.get("body"), dict):
        return Outcome(cid, "done", value=response["body"])
    error = line.get("error") or (response.get("body") or {}).get("error") or {}
    message = error.get("message") if isinstance(error, dict) else str(error)
    code = error.get("code") if isinstance(error, dict) else None
    said = f"{f'HTTP {status}: ' if status else ''}{code + ': ' if code else ''}{message or 'no answer'}"
    if status is None or status in (408, 409, 429) or status >= 500:
        return Outcome(cid, "retry", error=said)  # expired, cancelled, or the provider's trouble
    return Outcome(cid, "invalid", error=said)
