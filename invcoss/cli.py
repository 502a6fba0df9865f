"""The installed `invcoss` command: the method's commands (`invcoss_core.cli`) and `demo`, assembled on call."""

from __future__ import annotations

import typer

HELP = (
    "InvCoSS: inversion-driven continual self-supervised pre-training for multi-modal medical images.\n\n"
    "Run one local stage (`stage`), extract frozen-encoder features (`embed`), export an encoder (`export`), fetch "
    "real sample images (`samples fetch`), check a site folder (`data check`), compare methods (`bench`) or run the "
    "whole federation on this machine (`demo`)."
)


def build_app() -> typer.Typer:
    """A new typer app holding the method's commands and `demo` (importing this module registers nothing)."""
    from invcoss.demo import demo_command
    from invcoss_core.cli import app as core_app

    app = typer.Typer(
        name="invcoss", help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False
    )
    app.registered_commands.extend(core_app.registered_commands)
    app.registered_groups.extend(core_app.registered_groups)
    app.command("demo")(demo_command)
    return app


def main() -> None:
    """Console-script entry point of `invcoss`."""
    build_app()()


if __name__ == "__main__":
    main()
