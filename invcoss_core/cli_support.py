"""What every InvCoSS command line shares: the stderr console, logging set-up and the one-line operator error.

Used by `invcoss`, `invcoss-server` and `invcoss-client`; library modules never import it (they only get loggers).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

__all__ = ["console", "fail", "setup_logging", "timestamped"]

console = Console(stderr=True, soft_wrap=True)  # a line stays one line in log files (grep-able paths)


def setup_logging(level: str, quiet: Iterable[str] = ()) -> None:
    """Configure root logging once for a CLI process (library modules only get loggers).

    Args:
        level: a logging level name (`debug`, `info`, `warning`, ...); an unknown name means `info`.
        quiet: loggers held at WARNING whatever `level` is (chatty third-party clients).
    """
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        fmt = "%(message)s"
    else:  # a log file or `docker compose logs`: one plain line per record, never wrapped to a terminal width
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, handlers=[handler], force=True)
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
