"""Shared by the `explore_*.py` scripts: run `invcoss bench` with one extra method registered in this process only.

The product's method list is unchanged; every command-line argument is passed to `invcoss bench`.
"""

from __future__ import annotations

import sys

from invcoss_core.evaluation.settings import METHODS, MethodSpec


def register(spec: MethodSpec) -> None:
    """Add `spec` to this process's benchmark methods (an ablation: run with `--ablation-seeds`)."""
    METHODS[spec.name] = spec


def bench_main() -> None:
    """`invcoss bench` with this process's arguments."""
    from invcoss.cli import main

    sys.argv = ["invcoss", "bench", *sys.argv[1:]]
    main()
