"""The root of synthpref's own exceptions.

Callers that must tell synthpref's failures apart from bugs and library errors catch
:class:`SynthprefError`; each area (backends now, recipes and data later) hangs its own subtree under
it, and code that must react differently to different failures branches on those types, never on
message text.
"""

from __future__ import annotations


class SynthprefError(Exception):
    """A failure synthpref detected and explained; the message names what failed and why."""
