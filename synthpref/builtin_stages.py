"""Importing this module registers every stage and judge that ships with synthpref."""

from synthpref.filters import consistency, decontaminate, dedup, length_bias, margin  # noqa: F401
from synthpref.filters import reliability as _reliability  # noqa: F401
from synthpref.judges import checklist, jury, pairwise, prometheus, rubric  # noqa: F401
from synthpref.judges import code_verifier as _code_verifier  # noqa: F401
from synthpref.judges import density_ratio as _density_ratio  # noqa: F401
from synthpref.judges import followup as _followup  # noqa: F401
from synthpref.judges import ifeval_verifier as _ifeval_verifier  # noqa: F401
from synthpref.judges import math_verifier as _math_verifier  # noqa: F401
from synthpref.judges import reward_model as _reward_model  # noqa: F401
from synthpref.stages import evol_instruct as _evol_instruct  # noqa: F401
from synthpref.stages import generate, pairs, personas, user_turn  # noqa: F401
from synthpref.stages import inject_errors as _inject_errors  # noqa: F401
from synthpref.stages import magpie as _magpie  # noqa: F401
from synthpref.stages import refine as _refine  # noqa: F401
from synthpref.stages import router as _router  # noqa: F401
from synthpref.stages import self_correct as _self_correct  # noqa: F401
from synthpref.stages import self_instruct as _self_instruct  # noqa: F401
