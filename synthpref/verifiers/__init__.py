"""Deterministic checkers behind the verifier judges (:mod:`synthpref.judges.verifier`): what runs
inside worker processes, apart from any stage or record. ``pool.py`` runs checks in parallel.
"""
