"""Publishing a run to the Hugging Face Hub: ``synthpref push RUN_DIR REPO_ID``."""

from synthpref.hub.push import PushError, PushResult, push, stage_folder

__all__ = ["PushError", "PushResult", "push", "stage_folder"]
