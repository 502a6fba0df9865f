"""What every InvCoSS command line shares: the consoles, logging set-up, tables and the one-line operator error.

Used by `invcoss`, `invcoss-server` and `invcoss-client`; library modules never import it (they only get loggers).
Output piped to a file or another program keeps every line whole: no table is drawn at 80 columns (rows become
tab-separated lines) and no log message is folded, so names and paths stay grep-able.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from rich.text import Text

__all__ = ["console", "fail", "log_handler", "out_console", "print_table", "setup_logging", "timestamped"]

console = Console(stderr=True, soft_wrap=True)  # a line stays one line in log files (grep-able paths)
out_console = Console(soft_wrap=True)  # stdout: a command's result (tables, written files)

Cell = str | Text  # a table cell: plain text is printed verbatim (never read as markup); Text carries its style


def log_handler() -> logging.Handler:
    """The stderr log handler of a CLI: rich on a terminal; one plain line per record when stderr is piped.

    RichHandler folds a message at the console's width (80 columns in a log file), which splits paths and names.
    """
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    return handler


def setup_logging(level: str, quiet: Iterable[str] = ()) -> None:
    """Configure root logging once for a CLI process (library modules only get loggers).

    Args:
        level: a logging level name (`debug`, `info`, `warning`, ...); an unknown name means `info`.
        quiet: loggers held at WARNING whatever `level` is (chatty third-party clients).
    """
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[log_handler()], force=True)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error for the operator and return the Exit to raise (the message is printed verbatim)."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def timestamped(label: str) -> Callable[[str], None]:
    """A `say(line)` that prints `HH:MM:SS LABEL line`; LABEL may use rich markup, the line is printed verbatim.

    Lines carry paths, peers' error messages and log excerpts: text such as `[/tmp/x]` must not be read as markup.
    """

    def say(line: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {label} {escape(line)}")

    return say


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Cell]],
    *,
    show_header: bool = True,
    target: Console | None = None,
) -> None:
    """A table on a terminal; plain lines when the output is piped, so that no name is wrapped.

    Piped, the title is one line, then (with `show_header`) the column names and one line per row, the cells
    separated by tabs (`cut -f` and `grep` work on them).

    Args:
        title: the table's title (plain text).
        columns: the column names.
        rows: one sequence of cells per row, as many as `columns`.
        show_header: print the column names.
        target: where to print; default the stdout console.
    """
    target = target or out_console
    cells = [[cell if isinstance(cell, Text) else Text(cell) for cell in row] for row in rows]
    if target.is_terminal:
        table = Table(title=title, show_header=show_header)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in cells:
            table.add_row(*row)
        target.print(table)
        return
    lines = [title, "\t".join(columns)] if show_header else [title]
    lines += ["\t".join(cell.plain.replace("\t", " ").replace("\n", " ") for cell in row) for row in cells]
    target.file.write("\n".join(lines) + "\n")  # not `print`: it would expand the tabs and read markup
