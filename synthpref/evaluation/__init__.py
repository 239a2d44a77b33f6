"""Measuring judges against human-labelled preference pairs (``synthpref eval-judges``)."""

from synthpref.evaluation.run import EvalError, EvalResult, default_output_dir, evaluate_judges

__all__ = ["EvalError", "EvalResult", "default_output_dir", "evaluate_judges"]
