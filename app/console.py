"""Terminal output for long-running commands: rich progress bars on stderr and closing summary tables."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _plain_in_notebook() -> dict:
    """Rich draws live bars in Jupyter through ipywidgets only (else it warns, and redraws into the cell's stderr):
    in a notebook kernel without ipywidgets, print each bar once, when it ends, as in a log."""
    import importlib.util

    ipython = sys.modules.get("IPython")  # not imported: not in a kernel
    shell = ipython.get_ipython() if ipython is not None else None
    if type(shell).__name__ == "ZMQInteractiveShell" and importlib.util.find_spec("ipywidgets") is None:
        return {"force_jupyter": False, "force_terminal": False}
    return {}


# Progress goes to stderr so stdout stays clean for tables and for piping; rich drops the live bar by itself
# when stderr is not a terminal (CI logs, `ray job logs`).
err_console = Console(stderr=True, **_plain_in_notebook())
out_console = Console()


class _Bar:
    def __init__(self, progress: Progress, task: int) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, **fields) -> None:
        self._progress.update(self._task, **fields)


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, *, eta: bool = True) -> Iterator[_Bar]:
    """A bar with done / total, elapsed time and rich's time remaining (``eta=False`` leaves that column out,
    for work finishing in chunks too far apart for rich's 30-second speed window; put your own in ``status``)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *([TimeRemainingColumn()] if eta else []),
        TextColumn("{task.fields[status]}"),
        console=err_console,
        transient=False,
    )
    with progress:
        yield _Bar(progress, progress.add_task(description, total=total, status=""))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    # On a terminal the table fits the window; to a pipe or file (CI logs, `ray job logs`, benchmarks) rows stay whole.
    if not out_console.is_terminal:
        needed = out_console.measure(table, options=out_console.options.update(max_width=400)).maximum
        out_console.width = max(out_console.width, needed)
    out_console.print(table)


def short_path(path) -> str:
    """A path relative to the working directory when it lies inside it (shorter lines), else as given."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:.3e}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def html_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain HTML table for `_repr_html_` of result objects in notebooks."""
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
