"""Avalanche loggers by recipe name (``evaluation.loggers``)."""

from __future__ import annotations

from avalanche.logging import InteractiveLogger, TextLogger

from cl_ext.context import BuildContext
from cl_ext.registry import register


@register("logger", "text")
def build_text_logger(ctx: BuildContext, filename: str = "avalanche_log.txt") -> TextLogger:
    """Avalanche's text log of every metric value, written into the run directory."""
    return TextLogger(open(ctx.run_dir / filename, "a"))


@register("logger", "interactive")
def build_interactive_logger(ctx: BuildContext) -> InteractiveLogger:
    """Avalanche's console logger (verbose; cl-ext already prints a per-experience table)."""
    return InteractiveLogger()
