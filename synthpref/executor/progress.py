"""Progress bars per stage (records/s and tokens/s) on the terminal, quiet elsewhere."""

from __future__ import annotations

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


class _Rates(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        tokens = task.fields.get("tokens", 0)
        rec = task.completed / elapsed
        parts = [f"{rec:.2f} rec/s"]
        if tokens:
            parts.append(f"{tokens / elapsed:.0f} tok/s")
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

    def __enter__(self) -> StageProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def add(self, stage: str, total: int) -> None:
        self._tasks[stage] = self.progress.add_task(
            stage, total=total, tokens=0, note="", start=False
        )

    def start(self, stage: str) -> None:
        self.progress.start_task(self._tasks[stage])

    def advance(self, stage: str, records: int, note: str = "") -> None:
        task = self._tasks[stage]
        self.progress.start_task(task)
        self.progress.update(task, advance=records, note=note)

    def tokens(self, stage: str, n: int) -> None:
        task = self._tasks[stage]
        current = self.progress.tasks[self.progress.task_ids.index(task)].fields.get("tokens", 0)
        self.progress.update(task, tokens=current + n)
