"""What every InvCoSS command line shares: the stderr console, logging set-up and the one-line operator error.

Used by `invcoss`, `invcoss-server` and `invcoss-client`; library modules never import it (they only get loggers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import typer
from rich.console import Console
from rich.logging import RichHandler

__all__ = ["console", "fail", "setup_logging"]

console = Console(stderr=True)


def setup_logging(level: str, quiet: Iterable[str] = ()) -> None:
    """Configure root logging once for a CLI process (library modules only get loggers).

    Args:
        level: a logging level name (`debug`, `info`, `warning`, ...); an unknown name means `info`.
        quiet: loggers held at WARNING whatever `level` is (chatty third-party clients).
    """
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error for the operator and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)
