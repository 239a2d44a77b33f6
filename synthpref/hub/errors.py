"""The one error every check before an upload raises: the push stops and nothing is sent."""

from __future__ import annotations


class PushError(ValueError):
    pass
