"""Executors run a planned recipe: ``local`` (asyncio, one process) or ``ray`` (actors on a cluster)."""

from __future__ import annotations

EXECUTORS = ("local", "ray")


def create_executor(
    loaded,
    executor: str = "local",
    *,
    address: str | None = None,
    workers: int | None = None,
    **options,
):
    """The executor named ``executor`` for ``loaded``; ``options`` (run_dir, fresh, console,
    progress) go to either, ``address`` and ``workers`` only to Ray."""
    if executor == "local":
        if address is not None or workers is not None:
            raise ValueError("address and workers apply to the Ray executor only (executor='ray')")
        from synthpref.executor.local import LocalExecutor

        return LocalExecutor(loaded, **options)
    if executor == "ray":
        from synthpref.executor.ray_executor import RayExecutor

        return RayExecutor(loaded, address=address, workers=workers, **options)
    raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
