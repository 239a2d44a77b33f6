"""Importing this module registers every stage and judge that ships with synthpref."""

from synthpref.filters import consistency, decontaminate, dedup, length_bias, margin  # noqa: F401
from synthpref.filters import reliability as _reliability  # noqa: F401
from synthpref.judges import checklist, jury, pairwise, prometheus, rubric  # noqa: F401
from synthpref.judges import density_ratio as _density_ratio  # noqa: F401
from synthpref.judges import followup as _followup  # noqa: F401
from synthpref.judges import reward_model as _reward_model  # noqa: F401
from synthpref.stages import generate, pairs  # noqa: F401
from synthpref.stages import router as _router  # noqa: F401
