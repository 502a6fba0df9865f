"""The installed `invcoss` command: the method core's CLI plus `demo` (the federation on one machine)."""

from __future__ import annotations

import typer

from invcoss_core.cli import app as core_app
from server.demo import demo_command


def build_app() -> typer.Typer:
    """The core typer app with the `demo` command added."""
    core_app.command("demo")(demo_command)
    return core_app


def main() -> None:
    """Console-script entry point of `invcoss`."""
    build_app()()


if __name__ == "__main__":
    main()
