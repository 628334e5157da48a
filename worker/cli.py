"""The ``embedfleet`` entry point: the producer's commands (submit, status, plan) plus the
worker's (run, worker, serve, shard, models), registered on one Typer app by importing their modules."""

from __future__ import annotations

from producer.settings import keep_freed_memory, passive_openmp, use_switch_interval

passive_openmp()  # before the commands import torch: OpenMP reads it once, when torch loads it
use_switch_interval()  # process-wide: here, not per engine (EMBEDFLEET_SWITCH_INTERVAL)
keep_freed_memory()  # process-wide too (EMBEDFLEET_MALLOC_KEEP_MB)

from producer.cli import app  # noqa: E402
from worker.commands import models, run, serve, shard, worker  # noqa: E402,F401  (each registers its command)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
