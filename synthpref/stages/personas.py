"""Persona-driven prompts (``persona_prompts``): user prompts written in the voice of a persona.

After Persona Hub (Ge et al., 2024): a persona (who the user is, and optionally what they want)
steers a model to write prompts that a one-size-fits-all instruction would not. Personas come from

- a file, ``personas: <file>``: JSONL rows with a ``persona`` text field (``persona_field``) and
  optional ``goal`` (``goal_field``) and ``id``, or a ``.txt`` file with one persona per line (blank
  lines and lines starting with ``#`` skipped); found like every file a recipe names (beside the
  recipe, then among the shipped prompts), its content hashed into the stage fingerprint; or
- the records themselves, ``from_source: true`` (Persona Hub's text-to-persona): each input record's
  text is a source text, and the model first writes the persona of someone who would read or write
  it (``persona_template``); a persona reply that is empty or cut at ``persona_max_tokens`` drops
  the record (counted).

**Which persona.** With a file, record number ``k`` (``metadata.seed`` on a ``source.seeds``
record, else its source row) gets persona ``k mod P`` (round-robin, P personas): every persona is
used equally often once there are at least P records, the choice depends on the record alone (so a
rerun or a resume chooses the same), and ``seed-000003`` has persona 3 whatever else is in its shard.

**Prompts.** For each record the model is asked once for ``n`` samples of ``template`` (the persona,
the goal, and the record's own text as ``source_text`` when it has one); each sample is one prompt.
The sampling seed derives from the stage ``seed`` and the record id, so records that share a persona
still get different prompts. A prompt that is empty (after stripping a ``Prompt:``-style label and
enclosing quotes), cut at ``max_tokens``, or the persona's own text repeated (a small model's
favourite failure) is dropped and counted (``dropped_empty``, ``dropped_cut``, ``dropped_echo``). Each kept prompt becomes a record ``<parent id>.p<k>`` (``k`` the sample number,
stable even when a sibling is dropped) whose metadata is the parent's plus ``parent``, ``operation:
persona``, ``persona``, ``goal`` (when there is one), ``persona_id`` (the row's ``id``, when given),
``persona_row`` (its line in the file) or ``persona_from: source``; later stages carry metadata
unchanged, so the persona stays with the prompt (and the ``user_turn`` stage reads it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from synthpref.backends.types import GenerationRequest, SamplingParams
from synthpref.errors import ConfigError, TemplateError
from synthpref.records import Message, Record
from synthpref.stages.base import Stage, StageParams
from synthpref.stages.generate import MAX_SAMPLES, MAX_TOKENS
from synthpref.stages.registry import register_stage
from synthpref.templates import find_recipe_file, load_template


class PersonaFileError(ConfigError, ValueError):
    """A persona file that is missing, empty or has a malformed row; the message names the file and
    the line."""


@dataclass(frozen=True)
class Persona:
    text: str
    goal: str | None = None
    row: int | None = None  # 1-based line in the file
    id: str | None = None


def read_personas(path: Path, persona_field: str = "persona", goal_field: str = "goal"):
    """Every persona of a ``.jsonl`` or ``.txt`` file, in file order; :class:`PersonaFileError`
    naming the line for a malformed row, and for a file with none."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise PersonaFileError(
            f"{path}: expected a .jsonl file (one JSON object with a {persona_field!r} field per "
            "line) or a .txt file (one persona per line)"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaFileError(f"{path}: cannot be read: {exc}") from None
    out: list[Persona] = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if suffix == ".txt":
            if not text.startswith("#"):
                out.append(Persona(text=text, row=number))
            continue
        out.append(_json_persona(path, number, text, persona_field, goal_field))
    if not out:
        raise PersonaFileError(f"{path}: no personas in the file (it is empty)")
    return out


def _json_persona(path: Path, number: int, text: str, field: str, goal_field: str) -> Persona:
    where = f"{path} line {number}"
    try:
        row = json.loads(text)
    except ValueError as exc:
        raise PersonaFileError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(row, dict):
        raise PersonaFileError(f"{where}: expected a JSON object with a {field!r} field")
    if field not in row:
        has = ", ".join(map(repr, row)) or "no fields"
        raise PersonaFileError(f"{where}: no {field!r} field (the row has {has})")
    persona = row[field]
    if not isinstance(persona, str) or not persona.strip():
        raise PersonaFileError(f"{where}: field {field!r} must be a non-empty string")
    goal = row.get(goal_field)
    if goal is not None and not isinstance(goal, str):
        raise PersonaFileError(f"{where}: field {goal_field!r} must be a string")
    ident = row.get("id")
    return Persona(
        text=persona.strip(),
        goal=goal.strip() if goal and goal.strip() else None,
        row=number,
        id=None if ident is None else str(ident),
    )


_LABEL = re.compile(
    r"^\s*\**\s*(?:persona|person|prompt|message|user|question|request|query)\s*\**\s*:\s*\**\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}


def clean_reply(text: str) -> str:
    """A model's reply as a prompt or persona: whitespace, one leading ``Prompt:``-style label and
    quotes enclosing the whole reply removed."""
    text = _LABEL.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _folded(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def derived_seed(*parts: object) -> int:
    """A sampling seed from the stage seed and a record's identity: stable across reruns."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def record_text(record: Record) -> str:
    """The record's own text: its user turns (a source text, for ``from_source``)."""
    return "\n\n".join(m.content for m in record.prompt if m.role == "user").strip()


class PersonaPromptsParams(StageParams):
    model: str = Field("default", description="the model that writes personas and prompts")
    personas: str | None = Field(
        None,
        description="persona file: .jsonl rows with a 'persona' field (and optional 'goal', 'id'), "
        "or .txt with one persona per line; relative to the recipe",
    )
    from_source: bool = Field(
        False,
        description="generate each record's persona from its text (Persona Hub text-to-persona) "
        "instead of reading a file",
    )
    persona_field: str = Field("persona", description="the persona's field in a .jsonl file")
    goal_field: str = Field("goal", description="the optional goal's field in a .jsonl file")
    n: int = Field(2, ge=1, le=MAX_SAMPLES, description="prompts written per input record")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the prompts")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling of the prompts")
    max_tokens: int = Field(
        128, ge=1, le=MAX_TOKENS, description="longest prompt, in tokens (longer ones are dropped)"
    )
    seed: int = Field(0, description="seed from which every record's sampling seed is derived")
    template: str = Field(
        "personas/prompt.jinja", description="asks for one prompt from a persona (and goal)"
    )
    persona_template: str = Field(
        "personas/from_text.jinja",
        description="from_source: asks for the persona of who would read or write a text",
    )
    persona_temperature: float = Field(0.7, ge=0, description="from_source: persona sampling")
    persona_max_tokens: int = Field(
        64, ge=1, le=MAX_TOKENS, description="from_source: longest persona (longer ones dropped)"
    )
    source_chars: int = Field(
        4000, ge=1, description="from_source: characters of the source text the model reads"
    )

    @model_validator(mode="after")
    def _one_origin(self) -> PersonaPromptsParams:
        if self.from_source and self.personas is not None:
            raise ValueError("give either personas: <file> or from_source: true, not both")
        if not self.from_source and self.personas is None:
            raise ValueError(
                "where do the personas come from? give personas: <file> (.jsonl or .txt) or "
                "from_source: true (each record's text is a source text)"
            )
        return self


@register_stage
class PersonaPrompts(Stage):
    """Writes n prompts per record in the voice of a persona (from a file, or from the record's text)."""

    type_name = "persona_prompts"
    kind = "generator"
    Params = PersonaPromptsParams
    params: PersonaPromptsParams
    model_params = ("model",)
    writes_prompts = True
    creates_prompts = True

    def __init__(self, name: str, params: PersonaPromptsParams, ctx=None) -> None:
        super().__init__(name, params, ctx)
        self._personas: list[Persona] | None = None

    # files --------------------------------------------------------------------------------------

    def persona_path(self) -> Path:
        assert self.params.personas is not None
        try:
            return find_recipe_file(self.params.personas, self.base_dir)
        except TemplateError as exc:
            raise PersonaFileError(f"persona file {exc}") from None

    def personas(self) -> list[Persona]:
        if self._personas is None:
            self._personas = read_personas(
                self.persona_path(), self.params.persona_field, self.params.goal_field
            )
        return self._personas

    def _templates(self) -> dict[str, str]:
        out = {"template": self.params.template}
        if self.params.from_source:
            out["persona_template"] = self.params.persona_template
        return out

    def check(self, previous: list[Stage]) -> list[str]:
        problems = []
        for key, name in self._templates().items():
            try:
                load_template(name, self.base_dir)
            except TemplateError as exc:
                problems.append(f"{key}: {exc}")
        if self.params.personas is not None:
            try:
                self.personas()
            except PersonaFileError as exc:
                problems.append(f"personas: {exc}")
        return problems

    def fingerprint(self) -> dict:
        out = {k: load_template(v, self.base_dir).hash for k, v in self._templates().items()}
        if self.params.personas is not None:
            out["personas"] = hashlib.sha256(self.persona_path().read_bytes()).hexdigest()[:16]
        return out

    prepare_streams = True  # its pre-pass checks the recipe and reads no record

    def prepare(self, records: Iterable[Record], recipe=None) -> None:
        if self.params.from_source and recipe is not None and recipe.source.seeds is not None:
            raise ConfigError(
                f"stage {self.name!r} (persona_prompts): from_source: true writes each persona "
                "from a record's text, but source.seeds gives records with no text; read texts "
                "with source.path, or give personas: <file>"
            )

    # work ---------------------------------------------------------------------------------------

    def _number(self, record: Record) -> int:
        seed = record.metadata.get("seed")
        return seed if isinstance(seed, int) else max(record.source_row, 0)

    async def process(self, records: list[Record]) -> list[Record]:
        if self.params.from_source:
            chosen = await self._personas_from_text(records)
        else:
            personas = self.personas()
            chosen = [(r, personas[self._number(r) % len(personas)]) for r in records]
        return await self._write_prompts(chosen)

    async def _personas_from_text(self, records: list[Record]) -> list[tuple[Record, Persona]]:
        p = self.params
        template = load_template(p.persona_template, self.base_dir)
        todo, requests = [], []
        for record in records:
            text = record_text(record)
            if not text:
                self.counters["dropped_no_source_text"] += 1
                continue
            prompt = template.render(text=text[: p.source_chars])
            params = SamplingParams(
                n=1,
                temperature=p.persona_temperature,
                top_p=p.top_p,
                max_tokens=p.persona_max_tokens,
                seed=derived_seed(p.seed, "persona", record.id),
            )
            todo.append(record)
            message = Message(role="user", content=prompt)
            requests.append(GenerationRequest(messages=[message], params=params))
        results = await self.model_client(p.model).generate(requests) if requests else []
        out = []
        for record, result in zip(todo, results, strict=True):
            completion = result.completions[0]
            text = clean_reply(completion.text)
            if not text:
                self.counters["dropped_persona_empty"] += 1
            elif completion.finish_reason == "length":
                self.counters["dropped_persona_cut"] += 1
            else:
                self.counters["personas_written"] += 1
                out.append((record, Persona(text=text)))
        return out

    async def _write_prompts(self, chosen: list[tuple[Record, Persona]]) -> list[Record]:
        p = self.params
        template = load_template(p.template, self.base_dir)
        requests = []
        for record, persona in chosen:
            prompt = template.render(
                persona=persona.text, goal=persona.goal, source_text=record_text(record)
            )
            params = SamplingParams(
                n=p.n,
                temperature=p.temperature,
                top_p=p.top_p,
                max_tokens=p.max_tokens,
                seed=derived_seed(p.seed, record.id),
            )
            message = Message(role="user", content=prompt)
            requests.append(GenerationRequest(messages=[message], params=params))
        results = await self.model_client(p.model).generate(requests) if requests else []
        out: list[Record] = []
        for (record, persona), result in zip(chosen, results, strict=True):
            for k, completion in enumerate(result.completions):
                text = clean_reply(completion.text)
                if not text:
                    self.counters["dropped_empty"] += 1
                    continue
                if completion.finish_reason == "length":
                    self.counters["dropped_cut"] += 1
                    continue
                if _folded(text) == _folded(persona.text):
                    self.counters["dropped_echo"] += 1  # the persona repeated, not a prompt
                    continue
                self.counters["prompts"] += 1
                out.append(
                    Record(
                        id=f"{record.id}.p{k}",
                        prompt=[Message(role="user", content=text)],
                        source_row=record.source_row,
                        metadata={**record.metadata, **self._lineage(record, persona)},
                    )
                )
        return out

    def _lineage(self, record: Record, persona: Persona) -> dict:
        meta: dict = {"parent": record.id, "operation": "persona", "persona": persona.text}
        if persona.goal:
            meta["goal"] = persona.goal
        if persona.id is not None:
            meta["persona_id"] = persona.id
        if self.params.from_source:
            meta["persona_from"] = "source"
        else:
            meta["persona_row"] = persona.row
        return meta
