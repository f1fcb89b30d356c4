"""The console bespoke prints to: rich on a terminal; plain whole lines in a log file or a pipe;
and the one way its tables are drawn."""

from __future__ import annotations

from typing import Any

from rich.box import Box
from rich.console import Console

# A rule of ASCII dashes under the header and nothing else: reads the same in a terminal, a log
# file and a mail, and takes no columns for vertical rules.
PLAIN_HEAD = Box("    \n"
                 "    \n"
                 " -- \n"
                 "    \n"
                 "    \n"
                 "    \n"
                 "    \n"
                 "    \n", ascii=True)


def make_console(stderr: bool = False) -> Console:
    """A rich console. When the output is not a terminal (a log file, a pipe, CI), long lines are
    written whole (``soft_wrap``), never wrapped mid-sentence at an assumed width, so that logs
    read as sentences and text searches in them do not depend on a width or a path's length."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def table(title: str | None, *columns: str | tuple[str, str]) -> Any:
    """A table in bespoke's one style: a left-aligned title, short headers (units go in a legend
    line under the table), a dashed rule under the header, one space between columns, no
    vertical rules. Every column folds a long value onto a second line instead of cutting it to
    "...", so nothing is lost at 80 columns. A column is a name (right-aligned: numbers) or
    ``(name, "left")``."""
    from rich.table import Table

    t = Table(title=title, box=PLAIN_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False,
              title_justify="left")
    for col in columns:
        name, justify = (col, "right") if isinstance(col, str) else col
        t.add_column(name, justify=justify, overflow="fold")
    return t


class LineProgress:
    """Progress for a log file or a pipe: plain lines, at most one per task every ``every_s``
    seconds, and one when a task completes (or is left unfinished at the end). The subset of
    :class:`rich.progress.Progress` bespoke uses: ``add_task``, ``update``, ``remove_task``, and
    a context manager. ``line`` formats a task: ``description``, ``completed``, ``total``,
    ``elapsed`` (s), ``eta`` (h:mm:ss left at the pace so far, ``?`` before the first step or
    without a total) and its fields."""

    def __init__(self, console: Console, line: str, every_s: float = 60.0, clock: Any = None):
        import time

        self.console, self.line, self.every_s = console, line, every_s
        self.clock = clock or time.monotonic
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> bool:
        for task in list(self.tasks):
            self._finish(task)
        return False

    def __bool__(self) -> bool:
        return True

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        task = max(self.tasks, default=-1) + 1
        now = self.clock()
        self.tasks[task] = {"description": description, "total": total, "completed": completed,
                            "fields": fields, "started": now, "printed": now, "final": False}
        return task

    def update(self, task: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        t = self.tasks.get(task)
        if t is None:
            return
        if description is not None:
            t["description"] = description
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        t["fields"].update(fields)
        now = self.clock()
        if t["total"] is not None and t["completed"] >= t["total"]:
            self._finish(task)
        elif now - t["printed"] >= self.every_s:
            self._print(t, now)

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)

    def _finish(self, task: int) -> None:
        t = self.tasks.get(task)
        if t is not None and not t["final"]:
            t["final"] = True
            self._print(t, self.clock())

    def _print(self, t: dict[str, Any], now: float) -> None:
        t["printed"] = now
        total = "?" if t["total"] is None else f"{t['total']:g}"
        elapsed = now - t["started"]
        eta = "?"
        if t["total"] is not None and t["completed"] and t["total"] > t["completed"]:
            left = elapsed / t["completed"] * (t["total"] - t["completed"])
            eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        elif t["total"] is not None and t["completed"] >= t["total"]:
            eta = "0:00:00"
        try:
            text = self.line.format(description=t["description"], completed=f"{t['completed']:g}", total=total,
                                    elapsed=elapsed, eta=eta, **t["fields"])
        except (KeyError, ValueError, IndexError):  # a field not given yet: the bare count
            text = f"{t['description']}: {t['completed']:g}/{total}"
        self.console.print(text, highlight=False, markup=False)


class _NoProgress:
    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def __bool__(self) -> bool:
        return False

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass

    def remove_task(self, *a: Any, **k: Any) -> None:
        pass


def progress(console: Console | None, *columns: Any, line: str, every_s: float = 60.0) -> Any:
    """A progress display: rich's bar (``columns``) on a terminal; :class:`LineProgress`
    (``line``, at most one line a minute) in a log file or a pipe; nothing without a console."""
    if console is None:
        return _NoProgress()
    if console.is_terminal:
        from rich.progress import Progress

        return Progress(*columns, console=console, transient=False)
    return LineProgress(console, line, every_s)


__all__ = ["LineProgress", "PLAIN_HEAD", "make_console", "progress", "table"]
