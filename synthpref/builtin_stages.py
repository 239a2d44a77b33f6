"""Importing this module registers every stage and judge that ships with synthpref."""

from synthpref.judges import rubric  # noqa: F401
from synthpref.stages import generate, pairs  # noqa: F401
