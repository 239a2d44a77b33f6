"""The stage interface. Generators, judges, filters and pair builders are all stages.

A stage receives one shard (a list of :class:`~synthpref.records.Record`) and returns the shard with its
contribution added. Its parameters are a pydantic model, validated from the recipe before anything runs,
so a typo in a judge's option is reported with its YAML path instead of failing an hour in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import ConfigDict

from synthpref.recipes.numbers import RecipeNumbers

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from synthpref.backends.base import Capability
    from synthpref.backends.client import ModelClient
    from synthpref.recipes.schema import Recipe
    from synthpref.records import Record

StageKind = Literal["generator", "judge", "filter", "pairs", "annotator"]


def duplicate_candidate_ids(records: list[Record]) -> dict[str, list[str]]:
    """Record id -> candidate ids it holds more than once.

    Judges and pair builders match answers to candidates by id, so a shared id would hand one text
    another's score; the executor refuses such a shard rather than write it.
    """
    out: dict[str, list[str]] = {}
    for record in records:
        counts = Counter(c.id for c in record.candidates)
        dups = [cid for cid, n in counts.items() if n > 1]
        if dups:
            out[record.id] = dups
    return out


def candidate_id_problem(records: list[Record]) -> str | None:
    """The message for :func:`duplicate_candidate_ids`, or None when every id is unique."""
    dups = duplicate_candidate_ids(records)
    if not dups:
        return None
    record_id, ids = next(iter(dups.items()))
    return (
        f"record {record_id!r} has several candidates with id {', '.join(map(repr, ids))} "
        f"({len(dups)} record(s) affected); every candidate of a record needs its own id "
        "(a custom generator reusing ids?)"
    )


class StageParams(RecipeNumbers):
    """Base for every stage's parameters: unknown keys are errors, not silently ignored; numbers
    are finite and whole where an int is meant (see :mod:`synthpref.recipes.numbers`)."""

    model_config = ConfigDict(extra="forbid")


class StageContext:
    """What a running stage may use: named models, a counter of events, and a warning channel."""

    def __init__(self, clients: dict[str, ModelClient], warn=print) -> None:
        self._clients = clients
        self.warn = warn

    def model(self, name: str) -> ModelClient:
        try:
            return self._clients[name]
        except KeyError:
            raise KeyError(f"no model named {name!r} is declared in the recipe") from None


class Stage(ABC):
    type_name: ClassVar[str]
    kind: ClassVar[StageKind]
    Params: ClassVar[type[StageParams]] = StageParams
    base_dir: Path | None = None
    """The recipe's folder, set by the loader: files the parameters name are relative to it
    (see :func:`synthpref.templates.find_recipe_file`); None means the working directory."""
    model_params: ClassVar[tuple[str, ...]] = ()
    """The parameters that name recipe models (one left None names none): what the default
    :meth:`models_used` returns, so a stage told its models by name needs no method of its own."""
    #: whether this stage writes records' prompts from nothing (so it may come first on a
    #: ``source.seeds`` recipe, whose records start with none)
    writes_prompts: ClassVar[bool] = False
    #: whether records leave this stage with prompts that did not exist before it (new or rewritten
    #: prompts, a conversation grown by a turn): a de-duplication after it must look at them
    creates_prompts: ClassVar[bool] = False
    #: whether this stage adds candidate replies to the records' prompts (``generate``)
    writes_candidates: ClassVar[bool] = False
    model_capability: ClassVar[Capability] = "generate"
    """What the default :meth:`requirements` asks of each of those models."""

    def __init__(self, name: str, params: StageParams, ctx: StageContext | None = None) -> None:
        self.name = name
        self.params = params
        self.ctx = ctx
        self.counters: Counter[str] = Counter()

    def models_used(self) -> list[str]:
        """Names of recipe models this stage calls (they join its fingerprint); by default the
        values of :attr:`model_params`, each once."""
        names = (getattr(self.params, p) for p in self.model_params)
        return list(dict.fromkeys(n for n in names if n is not None))

    def requirements(self) -> dict[str, set[Capability]]:
        """Capabilities this stage needs from each model, checked when the recipe is validated; by
        default :attr:`model_capability` of every model it uses."""
        return {m: {self.model_capability} for m in self.models_used()}

    def model_client(self, name: str) -> ModelClient:
        """The client of the recipe model ``name``; the executor attaches them before ``process``."""
        assert self.ctx is not None, "stage used before the executor attached its context"
        return self.ctx.model(name)

    def check(self, previous: list[Stage]) -> list[str]:
        """Problems with this stage's place in the recipe (e.g. a pair builder with no judge before it).

        Only reports: it changes nothing on the stage, so it may be called any number of times, with
        any ``previous``. What the stage takes from the stages before it is stored by :meth:`bind`.
        """
        return []

    def bind(self, previous: list[Stage]) -> None:  # noqa: B027
        """Resolve and store what this stage takes from the stages before it (e.g. the judge a
        pair builder reads). The loader calls it once per stage, in order, after every check of the
        recipe passed; the default takes nothing."""

    def fingerprint(self) -> dict[str, Any]:
        """What, beyond its parameters and models, changes this stage's output (e.g. template hashes)."""
        return {}

    #: whether :meth:`prepare` takes its records as an iterable it reads once (a fresh read of the
    #: source, never all in memory) rather than a list. False by default, so a custom stage written
    #: for a list keeps getting one, which costs the whole input in memory for its pre-pass (a
    #: stage that keeps the default no-op ``prepare`` never costs that); set it True on a stage
    #: whose pre-pass only loops over the records once.
    prepare_streams: ClassVar[bool] = False

    def prepare(  # noqa: B027
        self, records: Iterable[Record], recipe: Recipe | None = None
    ) -> None:
        """Run-level pre-pass, called once per run with every input record, in input order, before
        any shard is processed (e.g. prompt de-duplication across shards; files relative to the
        recipe). ``records`` is a list unless the stage sets :attr:`prepare_streams`; keep what
        later shards need (signatures, ids), not the records."""

    #: whether this stage's output for a shard depends on the shards before it (a running
    #: de-duplication index, a growing pool of synthesized prompts): the local executor then
    #: processes its shards strictly in order and, on a resume, :meth:`replay` s the shards it
    #: finished earlier; the Ray executor refuses it. An instance may set it at :meth:`bind`.
    carries_state: bool = False

    def start(self) -> None:  # noqa: B027
        """A pass over the shards begins, from shard 0: clear state carried across shards."""

    def replay(self, records: list[Record]) -> None:  # noqa: B027
        """The output of a shard this stage finished in an earlier run (its checkpoint), in shard
        order, in place of processing it: rebuild the state the later shards depend on."""

    @abstractmethod
    async def process(self, records: list[Record]) -> list[Record]: ...

    def describe(self) -> dict[str, Any]:
        return {"type": self.type_name, "name": self.name, **self.params.model_dump()}
