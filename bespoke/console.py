"""The console bespoke prints to: rich on a terminal; plain whole lines in a log file or a pipe."""

from __future__ import annotations

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    """A rich console. When the output is not a terminal (a log file, a pipe, CI), long lines are
    written whole (``soft_wrap``), never wrapped mid-sentence at an assumed width, so that logs
    read as sentences and text searches in them do not depend on a width or a path's length."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
    return console


__all__ = ["make_console"]
