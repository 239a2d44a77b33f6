"""The one error every check before an upload raises: the push stops and nothing is sent."""

from __future__ import annotations

from synthpref.errors import SynthprefError


class PushError(SynthprefError, ValueError):
    """``synthpref push`` refused (a failed check of the run, a contradictory option) or failed to upload."""
