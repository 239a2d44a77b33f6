"""Printing through Rich without letting user text act as markup.

Recipe paths, stage names, YAML snippets and error messages are user-controlled: as Rich markup, a
folder named ``[draft]`` would vanish and ``[/x]`` would crash the printer. Everything here prints such
text as plain :class:`~rich.text.Text`, styled only by the label in front of it.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text


def literal(text: object, style: str = "") -> Text:
    """``text`` exactly as given, never parsed as markup (for table cells and titles)."""
    return Text(str(text), style=style)


def say(console: Console, message: object, *, label: str = "", style: str = "") -> None:
    """One message, literally; ``label`` (``error:``, ``warning:``) carries the style. Long lines are
    not broken, so a path in the message can still be copied."""
    line = Text()
    if label:
        line.append(label, style=style)
        line.append(" ")
        line.append(str(message))
    else:
        line.append(str(message), style=style)
    console.print(line, soft_wrap=True, highlight=False)
