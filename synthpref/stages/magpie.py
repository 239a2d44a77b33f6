"""Magpie prompt synthesis: an instruct model, shown only its chat template's text up to where a user
message starts, writes what a user would ask (Xu et al., 2024, "Magpie: Alignment Data Synthesis
from Scratch by Prompting Aligned LLMs with Nothing").

For each input record the stage writes ``n`` queries, each a new record ``<parent id>.m<k>`` whose
prompt is the query as a user message; ``metadata`` keeps the lineage (parent, model, the system
prompt used, the query's finish reason). The pre-query comes from the model's own template
(:mod:`synthpref.stages.pre_query`), optionally after a system prompt that steers the domain, and is
sent as raw text (``ModelClient.complete``, capability ``complete``). A query counts only if the model
ended its turn: one cut at ``max_tokens``, one that stopped for another reason, and an empty one are
dropped and counted by reason (``dropped:truncated``, ``dropped:no_end_of_turn``,
``dropped:empty``).

Every query has its own sampling seed, a hash of the stage's ``seed``, the parent id and ``k``: a
rerun or a resume asks exactly the same requests (the request cache answers those already made).

Input records are kept ahead of their queries (``keep_input``, default true), so a prompt file grows;
records without a prompt (``source: {seeds: N}``) have nothing to keep and are always replaced.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import Field

from synthpref.backends.base import TransientBackendError
from synthpref.backends.types import CompletionRequest, SamplingParams
from synthpref.errors import ConfigError, RunPaused
from synthpref.records import Message, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.generate import MAX_SAMPLES, MAX_TOKENS
from synthpref.stages.pre_query import RULE_VERSION, PreQuery, PreQueryError, pre_query
from synthpref.stages.registry import register_stage


class MagpieParams(StageParams):
    model: str = Field(
        "default",
        description="the instruct model that writes the queries; it must continue raw text "
        "(capability 'complete': embedded, transformers, vllm, or openai with a tokenizer)",
    )
    n: int = Field(1, ge=1, le=MAX_SAMPLES, description="queries written per input record")
    system_prompt: str | None = Field(
        None,
        description="a system message before the user turn that steers the queries' domain "
        "(default: the model spec's system_prompt, else none: the template's own default)",
    )
    keep_system: bool = Field(
        False,
        description="start each new record's prompt with that system message (responses are then "
        "generated under it); otherwise the prompt is the query alone",
    )
    keep_input: bool = Field(
        True,
        description="keep the input records, each ahead of its queries (a prompt file grows); "
        "records without a prompt (source.seeds) are never kept",
    )
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the queries")
    top_p: float = Field(
        1.0, gt=0, le=1, description="nucleus sampling: keep this probability mass"
    )
    max_tokens: int = Field(
        256,
        ge=1,
        le=MAX_TOKENS,
        description="longest query, in tokens; a query cut here is dropped (dropped:truncated)",
    )
    seed: int = Field(
        0, description="stage seed; each query's seed is a hash of it, the parent id and k"
    )


def query_seed(stage_seed: int, parent_id: str, k: int) -> int:
    """The sampling seed of query ``k`` of record ``parent_id`` (31 bits: every backend takes it)."""
    blob = json.dumps(["magpie", stage_seed, parent_id, k], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:4], "big") & 0x7FFF_FFFF


@register_stage
class Magpie(Stage):
    """Writes n user queries per record from the model's chat template alone (Magpie), each a new
    record with its lineage; queries cut at max_tokens, empty, or not ending the turn are dropped."""

    type_name = "magpie"
    kind = "generator"
    Params = MagpieParams
    params: MagpieParams
    model_params = ("model",)
    model_capability = "complete"
    writes_prompts = True
    creates_prompts = True

    def __init__(self, name: str, params: MagpieParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self.index: int | None = None
        self._pre_query: PreQuery | None = None

    def bind(self, previous: list[Stage]) -> None:
        self.index = len(previous)

    def where(self) -> str:
        """This stage's model as a YAML path, for errors."""
        at = f"stages[{self.index}] " if self.index is not None else ""
        return f"{at}({self.name}).model"

    def fingerprint(self) -> dict:
        return {"pre_query_rule": RULE_VERSION}

    def pre_query(self) -> PreQuery:
        """The model's pre-query (computed once): a ConfigError naming the YAML path when the model
        cannot continue raw text or its template has no recognisable user turn start."""
        if self._pre_query is not None:
            return self._pre_query
        p = self.params
        client = self.model_client(p.model)
        if not client.supports("complete"):
            raise ConfigError(
                f"{self.where()}: model {p.model!r} (backend {client.spec.backend}) cannot continue "
                "raw text (capability 'complete'), which Magpie needs; use the embedded, "
                "transformers or vllm backend, or openai with tokenizer: on a /v1/completions server"
            )
        system = p.system_prompt or client.spec.system_prompt or None
        try:
            self._pre_query = pre_query(client.render_chat, system)
        except (TransientBackendError, RunPaused):
            raise
        except PreQueryError as exc:
            raise ConfigError(f"{self.where()}: model {p.model!r}: {exc}") from exc
        except Exception as exc:  # a template that raises, a backend without one
            raise ConfigError(
                f"{self.where()}: model {p.model!r}: its chat template could not render "
                f"[system?, user] ({type(exc).__name__}: {exc})"
            ) from exc
        return self._pre_query

    def _request(self, pq: PreQuery, parent_id: str, k: int) -> CompletionRequest:
        p = self.params
        sampling = SamplingParams(
            n=1,
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            seed=query_seed(p.seed, parent_id, k),
            stop=pq.stop,
        )
        return CompletionRequest(prompt=pq.text, params=sampling)

    async def process(self, records: list[Record]) -> list[Record]:
        p = self.params
        pq = self.pre_query()
        requests = [self._request(pq, r.id, k) for r in records for k in range(p.n)]
        results = await self.model_client(p.model).complete(requests) if requests else []
        head = (
            [Message(role="system", content=pq.system_prompt)]
            if (p.keep_system and pq.system_prompt)
            else []
        )
        out: list[Record] = []
        for i, record in enumerate(records):
            if p.keep_input and record.prompt:
                out.append(record)
                self.counters["inputs_kept"] += 1
            for k in range(p.n):
                completion = results[i * p.n + k].completions[0]
                query = completion.text.strip()
                reason = _drop_reason(completion.finish_reason, query)
                if reason:
                    self.counters[f"dropped:{reason}"] += 1
                    continue
                self.counters["queries"] += 1
                out.append(
                    Record(
                        id=f"{record.id}.m{k}",
                        prompt=[*head, Message(role="user", content=query)],
                        source_row=record.source_row,
                        metadata={
                            "parent": record.id,
                            "operation": "magpie",
                            "query_index": k,
                            "model": p.model,
                            "system_prompt": pq.system_prompt,
                            "finish_reason": completion.finish_reason,
                        },
                    )
                )
        return out


def _drop_reason(finish_reason: str, query: str) -> str | None:
    if finish_reason == "length":
        return "truncated"
    if finish_reason != "stop":
        return "no_end_of_turn"
    if not query:
        return "empty"
    return None
