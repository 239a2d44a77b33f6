"""Progress bars per stage (records/s, tokens/s and dollars so far) on the terminal, quiet elsewhere.

The callbacks (``tokens``, ``cost``) may come from backend threads as results arrive; each keeps its
running total under a lock and hands the bar the new total.
"""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from synthpref.executor.run_meta import format_usd


class _Rates(ProgressColumn):
    """Records/s and tokens/s of a started stage, and what its model calls have cost so far in
    this invocation (shown once non-zero)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        parts = []
        if elapsed > 0:
            tokens = task.fields.get("tokens", 0)
            parts.append(f"{task.completed / elapsed:.2f} rec/s")
            if tokens:
                parts.append(f"{tokens / elapsed:.0f} tok/s")
        dollars = task.fields.get("dollars", 0.0)
        if dollars:
            parts.append(format_usd(dollars))
        return Text(" · ".join(parts), style="cyan")


class StageProgress:
    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<24}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            _Rates(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}", markup=False),
            console=console,
            disable=not enabled,
        )
        self._tasks: dict[str, int] = {}
        self._tokens: dict[str, int] = {}
        self._dollars: dict[str, float] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> StageProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def add(self, stage: str, total: int) -> None:
        self._tasks[stage] = self.progress.add_task(
            stage, total=total, tokens=0, dollars=0.0, note="", start=False
        )

    def start(self, stage: str) -> None:
        self.progress.start_task(self._tasks[stage])

    def advance(self, stage: str, records: int, note: str = "") -> None:
        task = self._tasks[stage]
        self.progress.start_task(task)
        self.progress.update(task, advance=records, note=note)

    def tokens(self, stage: str, n: int) -> None:
        with self._lock:
            total = self._tokens[stage] = self._tokens.get(stage, 0) + n
            self.progress.update(self._tasks[stage], tokens=total)

    def cost(self, stage: str, dollars: float) -> None:
        """A model call of ``stage`` was billed ``dollars``: the stage's rate column shows its total
        for this invocation."""
        with self._lock:
            total = self._dollars[stage] = self._dollars.get(stage, 0.0) + dollars
            self.progress.update(self._tasks[stage], dollars=total)

    def note(self, stage: str, text: str) -> None:
        """Set the stage's note (e.g. batch jobs waiting); the next shard it finishes replaces it."""
        self.progress.update(self._tasks[stage], note=text)
