"""tests/fake_batch_server.py through the official ``openai`` and ``anthropic`` SDKs: the batch
endpoints, job progression, failed and expired lines, usage with the simulated prompt cache, and
the embedded-model answerer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.fake_batch_server import API_KEY, Ask, FakeBatchProvider, embedded_answerer

ROOT = Path(__file__).resolve().parents[2]


def chat_line(custom_id: str, text: str, model: str = "gpt-test", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def oai(server: FakeBatchProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key="sk-test", max_retries=0)


def ant(server: FakeBatchProvider) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.anthropic_base_url, api_key=API_KEY, max_retries=0)


def submit(client: openai.OpenAI, rows: list[dict]):
    upload = client.files.create(file=("input.jsonl", jsonl(rows)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def poll(client: openai.OpenAI, batch_id: str, most: int = 10):
    for _ in range(most):
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
    raise AssertionError(f"batch {batch_id} did not end in {most} polls")


def lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def messages_request(custom_id: str, text: str, **params) -> dict:
    body = {"model": "claude-test", "max_tokens": 50, **params}
    body.setdefault("messages", [{"role": "user", "content": text}])
    return {"custom_id": custom_id, "params": body}


# OpenAI -------------------------------------------------------------------------------------------


def test_openai_batch_completes_after_polls_and_its_output_parses():
    with FakeBatchProvider(polls_to_finish=2) as server:
        client = oai(server)
        rows = [chat_line("a", "hello"), chat_line("b", "world", n=2, max_tokens=2)]
        batch = submit(client, rows)
        assert batch.status == "validating"  # what the API's create answers
        assert client.batches.retrieve(batch.id).status == "in_progress"
        assert server.lines_answered == []  # lines run only when the job ends
        done = poll(client, batch.id)
        assert done.status == "completed" and done.error_file_id is None
        assert done.request_counts.model_dump() == {"total": 2, "completed": 2, "failed": 0}
        out = {row["custom_id"]: row for row in lines(client, done.output_file_id)}
        assert set(out) == {"a", "b"}
        for row in out.values():
            assert row["error"] is None and row["response"]["status_code"] == 200
            assert row["id"].startswith("batch_req_") and row["response"]["request_id"]
        a = ChatCompletion.model_validate(out["a"]["response"]["body"])
        b = ChatCompletion.model_validate(out["b"]["response"]["body"])
        assert a.choices[0].message.content.startswith("answer 0 to ")
        assert a.choices[0].finish_reason == "stop"
        assert [c.message.content for c in b.choices] == ["answer 0", "answer 1"]
        assert {c.finish_reason for c in b.choices} == {"length"}
        assert b.usage.completion_tokens == 4 and b.usage.prompt_tokens == 2
        assert done.usage.output_tokens == a.usage.completion_tokens + 4
        job = server.jobs[batch.id]
        assert (job.provider, job.status, job.custom_ids) == ("openai", "completed", ["a", "b"])
        assert server.batch_creations == {"openai": 1}
        assert server.lines_answered == [(batch.id, "a"), (batch.id, "b")]
        # input files stay private, as on the API
        with pytest.raises(openai.BadRequestError):
            client.files.content(done.input_file_id)


def test_openai_expired_job_keeps_answered_lines_and_expires_the_rest():
    with FakeBatchProvider(hold=True) as server:
        client = oai(server)
        batch = submit(client, [chat_line(c, c) for c in "xyz"])
        assert client.batches.retrieve(batch.id).status == "in_progress"
        assert client.batches.retrieve(batch.id).status == "in_progress"  # held
        server.expire(batch.id, keep=1)
        done = client.batches.retrieve(batch.id)
        assert done.status == "expired" and done.expired_at is not None
        assert done.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
        assert [r["custom_id"] for r in lines(client, done.output_file_id)] == ["x"]
        errors = lines(client, done.error_file_id)
        assert [r["custom_id"] for r in errors] == ["y", "z"]
        assert all(r["response"] is None for r in errors)
        assert {r["error"]["code"] for r in errors} == {"batch_expired"}
        assert server.lines_answered == [(batch.id, "x")]
        with pytest.raises(ValueError, match="already ended"):
            server.finish(batch.id)


def test_openai_line_error_lands_in_the_error_file_with_its_status():
    def line_error(custom_id, body):
        if custom_id == "bad":
            return 400, "invalid_request_error", "this prompt is refused"
        if custom_id == "flaky":
            return 500, "server_error", "try again"
        return None

    with FakeBatchProvider(line_error=line_error) as server:
        client = oai(server)
        batch = submit(client, [chat_line(c, c) for c in ("ok", "bad", "flaky")])
        done = poll(client, batch.id)
        assert done.status == "completed"
        assert done.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
        assert [r["custom_id"] for r in lines(client, done.output_file_id)] == ["ok"]
        errors = {r["custom_id"]: r for r in lines(client, done.error_file_id)}
        assert errors["bad"]["response"]["status_code"] == 400
        assert errors["bad"]["response"]["body"]["error"]["type"] == "invalid_request_error"
        assert errors["bad"]["response"]["body"]["error"]["message"] == "this prompt is refused"
        assert errors["flaky"]["response"]["status_code"] == 500
        assert all(r["error"] is None for r in errors.values())
        assert server.lines_answered == [(batch.id, "ok")]


@pytest.mark.parametrize(
    ("rows", "code", "line"),
    [
        ([chat_line("a", "1"), chat_line("a", "2")], "duplicate_custom_id", 2),
        ([chat_line("a", "1"), chat_line("b", "2", model="other")], "mismatched_model", 2),
        ([{**chat_line("a", "1"), "url": "/v1/completions"}], "invalid_url", 1),
        ([{**chat_line("a", "1"), "method": "GET"}], "invalid_method", 1),
    ],
)
def test_openai_invalid_input_fails_the_batch(rows, code, line):
    with FakeBatchProvider() as server:
        client = oai(server)
        batch = submit(client, rows)
        done = client.batches.retrieve(batch.id)
        assert done.status == "failed" and done.failed_at is not None
        assert [(e.code, e.line) for e in done.errors.data] == [(code, line)]
        assert done.output_file_id is None and done.error_file_id is None
        assert server.lines_answered == []


def test_openai_fail_batch_and_cancel_from_the_test():
    with FakeBatchProvider(hold=True) as server:
        client = oai(server)
        failed = submit(client, [chat_line("a", "1")])
        server.fail_batch(failed.id, "the input was refused")
        got = client.batches.retrieve(failed.id)
        assert got.status == "failed" and got.errors.data[0].message == "the input was refused"

        cancelled = submit(client, [chat_line("a", "1"), chat_line("b", "2")])
        assert client.batches.cancel(cancelled.id).status == "cancelling"
        done = client.batches.retrieve(cancelled.id)
        assert done.status == "cancelled" and done.output_file_id is None
        assert {r["error"]["code"] for r in lines(client, done.error_file_id)} == {
            "batch_cancelled"
        }
        assert server.lines_answered == []


def test_openai_list_pages_newest_first():
    with FakeBatchProvider() as server:
        client = oai(server)
        ids = [submit(client, [chat_line("a", str(i))]).id for i in range(3)]
        page = client.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[:0:-1] and page.has_more
        assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # the SDK pages on
        assert server.batch_creations["openai"] == 3


def test_online_chat_and_async_client_share_the_server():
    async def main(server: FakeBatchProvider) -> tuple:
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0)
        online = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], n=3
        )
        upload = await client.files.create(
            file=("in.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = await client.batches.retrieve(batch.id)
        content = await client.files.content(batch.output_file_id)
        return online, json.loads(content.text)

    with FakeBatchProvider() as server:
        online, row = asyncio.run(main(server))
        assert len(online.choices) == 3
        assert row["response"]["body"]["choices"][0]["message"]["content"] == (
            online.choices[0].message.content
        )
        assert [path for path, _ in server.online_requests] == ["/v1/chat/completions"]
        with pytest.raises(openai.BadRequestError):
            oai(server).chat.completions.create(model="gpt-test", messages=[])


def test_a_job_is_collected_from_another_process():
    with FakeBatchProvider() as server:
        batch = submit(oai(server), [chat_line("a", "hi")])
        script = (
            "import json, sys, openai\n"
            "c = openai.OpenAI(base_url=sys.argv[1], api_key='k', max_retries=0)\n"
            "b = c.batches.retrieve(sys.argv[2])\n"
            "print(b.status, json.loads(c.files.content(b.output_file_id).text)['custom_id'])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, server.openai_base_url, batch.id],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        assert out.stdout.split() == ["completed", "a"]
        assert server.jobs[batch.id].status == "completed"


# Anthropic ----------------------------------------------------------------------------------------


def test_anthropic_batch_results_are_typed_by_outcome():
    def line_error(custom_id, body):
        return (500, "overloaded_error", "busy") if custom_id == "err-1" else None

    with FakeBatchProvider(hold=True, line_error=line_error) as server:
        client = ant(server)
        created = client.messages.batches.create(
            requests=[
                messages_request("ok_1", "hello"),
                messages_request("err-1", "hello"),
                messages_request("late", "hello"),
            ]
        )
        assert created.id.startswith("msgbatch_") and created.processing_status == "in_progress"
        assert created.request_counts.processing == 3 and created.results_url is None
        server.expire(created.id, keep=2)
        ended = client.messages.batches.retrieve(created.id)
        assert ended.processing_status == "ended" and ended.ended_at is not None
        counts = ended.request_counts
        assert (counts.succeeded, counts.errored, counts.expired, counts.processing) == (1, 1, 1, 0)
        results = {r.custom_id: r.result for r in client.messages.batches.results(created.id)}
        assert [results[c].type for c in ("ok_1", "err-1", "late")] == [
            "succeeded",
            "errored",
            "expired",
        ]
        message = results["ok_1"].message
        assert message.content[0].text.startswith("answer 0 to ")
        assert message.stop_reason == "end_turn" and message.usage.output_tokens == 4
        assert message.usage.service_tier == "batch"
        assert results["err-1"].error.error.type == "overloaded_error"
        assert server.jobs[created.id].provider == "anthropic"
        assert server.batch_creations == {"anthropic": 1}


def test_anthropic_auto_mode_cancel_and_list():
    with FakeBatchProvider() as server:
        client = ant(server)
        first = client.messages.batches.create(
            requests=[messages_request("a", "one two three", max_tokens=2)]
        )
        done = client.messages.batches.retrieve(first.id)  # the first poll ends it
        assert done.processing_status == "ended"
        (result,) = client.messages.batches.results(first.id)
        assert result.result.message.stop_reason == "max_tokens"
        assert result.result.message.content[0].text == "answer 0"

        second = client.messages.batches.create(requests=[messages_request("b", "x")])
        canceling = client.messages.batches.cancel(second.id)
        assert canceling.processing_status == "canceling"
        assert canceling.cancel_initiated_at is not None
        assert client.messages.batches.retrieve(second.id).request_counts.canceled == 1
        assert [r.result.type for r in client.messages.batches.results(second.id)] == ["canceled"]
        assert [b.id for b in client.messages.batches.list(limit=1)] == [second.id, first.id]


def test_anthropic_invalid_params_error_the_line():
    with FakeBatchProvider() as server:
        client = ant(server)
        batch = client.messages.batches.create(
            requests=[messages_request("a", "x", temperature=1.5)]
        )
        client.messages.batches.retrieve(batch.id)
        (line,) = client.messages.batches.results(batch.id)
        assert line.result.type == "errored"
        assert line.result.error.error.type == "invalid_request_error"


@pytest.mark.parametrize("custom_ids", [["has space"], ["x" * 65], [""], ["a", "a"]])
def test_anthropic_bad_custom_id_is_refused(custom_ids):
    with FakeBatchProvider() as server:
        with pytest.raises(anthropic.BadRequestError) as caught:
            ant(server).messages.batches.create(
                requests=[messages_request(c, "x") for c in custom_ids]
            )
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        assert server.jobs == {}


def test_anthropic_key_is_required():
    with FakeBatchProvider() as server:
        wrong = anthropic.Anthropic(
            base_url=server.anthropic_base_url, api_key="sk-wrong", max_retries=0
        )
        with pytest.raises(anthropic.AuthenticationError):
            wrong.messages.batches.create(requests=[messages_request("a", "x")])


# usage and the prompt cache -----------------------------------------------------------------------

PREFIX = " ".join(f"w{i}" for i in range(10))


def test_openai_prompt_cache_counts_whole_blocks_of_a_shared_prefix():
    rows = [
        chat_line("first", f"{PREFIX} alpha beta"),  # 13 tokens: <user>, 10 words, 2 more
        chat_line("second", f"{PREFIX} gamma delta"),  # shares 11 tokens with the first
        chat_line("short", "w0 w1"),  # under cache_min_tokens: never cached
        chat_line("short2", "w0 w1"),
    ]
    with FakeBatchProvider(cache_block=4, cache_min_tokens=8) as server:
        client = oai(server)
        done = poll(client, submit(client, rows).id)
        usage = {
            r["custom_id"]: r["response"]["body"]["usage"]
            for r in lines(client, done.output_file_id)
        }
        cached = {k: u["prompt_tokens_details"]["cached_tokens"] for k, u in usage.items()}
        assert cached == {"first": 0, "second": 8, "short": 0, "short2": 0}
        assert usage["second"]["prompt_tokens"] == 13
        assert done.usage.input_tokens_details.cached_tokens == 8
        # an online request reads what the batch wrote
        again = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"{PREFIX} alpha beta"}]
        )
        assert again.usage.prompt_tokens_details.cached_tokens == 12
        other = client.chat.completions.create(
            model="other-model", messages=[{"role": "user", "content": f"{PREFIX} alpha beta"}]
        )
        assert other.usage.prompt_tokens_details.cached_tokens == 0  # caches are per model


def test_anthropic_prompt_cache_follows_cache_control_breakpoints():
    system = [{"type": "text", "text": PREFIX, "cache_control": {"type": "ephemeral"}}]
    with FakeBatchProvider(cache_min_tokens=8) as server:
        client = ant(server)
        batch = client.messages.batches.create(
            requests=[
                messages_request("one", "first question", system=system),
                messages_request("two", "second question", system=system),
                messages_request("plain", "first question", system=PREFIX),
            ]
        )
        client.messages.batches.retrieve(batch.id)
        usage = {
            r.custom_id: r.result.message.usage for r in client.messages.batches.results(batch.id)
        }
        split = {
            k: (u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens)
            for k, u in usage.items()
        }
        # 14 tokens: <system>, 10 words, <user>, 2 words; the 10 system words are the prefix
        assert split == {"one": (4, 10, 0), "two": (4, 0, 10), "plain": (14, 0, 0)}
        online = client.messages.create(
            model="claude-test",
            max_tokens=5,
            system=system,
            messages=[{"role": "user", "content": "third"}],
        )
        assert online.usage.cache_read_input_tokens == 10
        assert online.usage.service_tier == "standard"


def test_a_plain_function_answers_and_the_server_cuts_at_stop_strings():
    def reply(ask: Ask, index: int) -> str:
        return f"Rating: {index + 4}\nEND of reply"

    with FakeBatchProvider(reply) as server:
        client = oai(server)
        completion = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "rate"}], n=2, stop=["\nEND"]
        )
        assert [c.message.content for c in completion.choices] == ["Rating: 4", "Rating: 5"]
        message = ant(server).messages.create(
            model="c",
            max_tokens=9,
            messages=[{"role": "user", "content": "rate"}],
            stop_sequences=["\nEND"],
        )
        assert message.content[0].text == "Rating: 4"
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "\nEND")


# the embedded model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_answerer_answers_a_line_with_the_real_model():
    answerer = embedded_answerer()
    with FakeBatchProvider(answerer) as server:
        client = oai(server)
        row = chat_line("a", "Name a colour.", max_tokens=8, temperature=0)
        done = poll(client, submit(client, [row]).id)
        (line,) = lines(client, done.output_file_id)
        body = ChatCompletion.model_validate(line["response"]["body"])
        text = body.choices[0].message.content
        assert text.strip()
        assert 0 < body.usage.completion_tokens <= 8
        ask_tokens = answerer.prompt_tokens(
            Ask("openai", "gpt-test", [{"role": "user", "content": "Name a colour."}])
        )
        assert body.usage.prompt_tokens == len(ask_tokens) > 5
        # the same request online: same text (temperature 0), same counts
        online = client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8,
            temperature=0,
        )
        assert online.choices[0].message.content == text
        assert online.usage.completion_tokens == body.usage.completion_tokens


def test_an_answerer_that_raises_leaves_the_job_running_and_the_poll_gets_a_500():
    broken = [True]

    def reply(ask: Ask, index: int) -> str:
        if broken[0]:
            raise RuntimeError("model crashed")
        return "fine"

    with FakeBatchProvider(reply) as server:
        client = oai(server)
        batch = submit(client, [chat_line("a", "x")])
        with pytest.raises(openai.InternalServerError, match="model crashed"):
            client.batches.retrieve(batch.id)
        assert server.jobs[batch.id].status == "in_progress" and server.lines_answered == []
        broken[0] = False
        assert client.batches.retrieve(batch.id).status == "completed"


def test_an_unreadable_body_is_a_400_in_the_api_shape():
    with FakeBatchProvider() as server:
        with pytest.raises(openai.BadRequestError, match="not JSON"):
            oai(server).post("/batches", cast_to=dict, content=b"{oops")
        with pytest.raises(anthropic.BadRequestError) as caught:
            ant(server).post("/v1/messages/batches", cast_to=dict, content=b"[]")
        assert caught.value.body["error"]["type"] == "invalid_request_error"
