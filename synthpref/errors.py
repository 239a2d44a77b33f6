"""The root of synthpref's own exceptions, and the subsystem bases below it.

Every exception class synthpref defines derives from :class:`SynthprefError`: a failure synthpref
detected and explained, whose message names the file, YAML path, row or field at fault. Anything else
that escapes synthpref is a bug or a library's error. The CLI prints a SynthprefError's message without
a traceback (exit status 2 for a :class:`ConfigError`, 1 for the rest) and lets everything else keep
its traceback. Code that must react differently to different failures branches on these types, never
on message text. The concrete classes live beside the code that raises them (import them from there);
each keeps the builtin base it always had (``ValueError``, ``FileNotFoundError``...), so code that
catches the builtin still does.

The tree, and what each branch means to a caller:

- :class:`ConfigError`: what the recipe (or a command's options) asks for cannot be done; fix the
  recipe and run again. ``recipes.loader.RecipeError`` (every problem of a recipe, by YAML path),
  ``stages.registry.UnknownStage`` (a stage type that cannot be found or loaded),
  ``export.ExportError`` (an output format that is not registered), ``stages.pre_query.PreQueryError``
  (a model whose chat template has no user-turn start, for Magpie).
- :class:`TemplateError`: a Jinja template or a file a recipe names. ``templates.RecipeFileNotFound``
  (in none of the places the path rule looks) and ``templates.MissingInclude`` (a template it extends
  or includes is not found), both also ``FileNotFoundError``; ``templates.InvalidTemplate`` (not
  valid Jinja) and ``templates.UnsafeTemplate`` (the sandbox refused it), both also ``ValueError``.
- :class:`DataError`: data synthpref reads or writes is missing, malformed or inconsistent.
  ``sources.SourceError`` (an input source as a whole), ``sources.RowError`` (one input row; collected
  into ``errors.jsonl``, never raised out of a read), ``executor.checkpoints.CheckpointError`` (an
  unreadable checkpoint: the executor recomputes that shard), ``executor.run_dir.RunDirError`` (a
  folder that may not be used or cleared as a run dir), ``executor.run_meta.RunMetaError`` (a
  ``run.json``/``summary.json`` that is missing or malformed), ``checks.OutputDirError`` (a run dir
  that cannot be created or written), ``export.needs.MissingData`` (a format needs data the run did not
  produce), ``report.collect.ReportError`` (a folder that is not a finished, intact run).
- ``backends.base.BackendError``: a model backend could not answer. Its subclasses say why:
  ``TransientBackendError`` (429, 5xx, timeout: the shard stops and a rerun retries),
  ``RequestError`` (one request's content: that judgment fails; ``backends.segments.SegmentError`` is
  one), ``CapabilityError`` (the backend cannot do this at all; ``backends.decode_loop.NotStackable``
  is one, caught inside the transformers backend), and
  ``backends.embedded.EmbeddedModelMissing`` (the embedded model's package is not installed).
- ``hub.errors.PushError``: ``synthpref push`` refused or failed; nothing was uploaded unless the
  message says otherwise.
- ``executor.common.RunError``: a run stopped (its cause's message, with the stage and shard).
- :class:`RunPaused`: a run stopped cleanly before finishing, everything finished kept, and the same
  command resumes it (the CLI exits 3): ``backends.cost.BudgetExceeded`` (``settings.max_cost_usd``
  reached) and ``backends.batch.BatchPending`` (provider batch jobs still running, with
  ``settings.batch.wait: false``).
- ``evaluation.run.EvalError``: ``eval-judges`` has nothing to evaluate (no judge stage, no usable
  labelled pair).
- ``judges.parsing.ParseError``: a judge's reply does not parse; judges catch it, re-ask, and record
  a failed judgment, so it reaches a user only through the Python API.
"""

from __future__ import annotations


class SynthprefError(Exception):
    """A failure synthpref detected and explained; the message names what failed and why."""


class ConfigError(SynthprefError):
    """The recipe or a command's options ask for something that cannot be done (the CLI exits 2)."""


class TemplateError(SynthprefError):
    """A template or a file a recipe names cannot be found, or the sandbox refused it."""


class RunPaused(SynthprefError):
    """The run stopped cleanly before finishing; everything finished is checkpointed or cached and
    running the same command again resumes it (the CLI exits 3)."""


class DataError(SynthprefError):
    """Data synthpref reads or writes (input rows, checkpoints, run directories and their metadata,
    a finished run's records) is missing, malformed or inconsistent."""
