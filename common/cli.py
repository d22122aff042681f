"""Command lines of the scripts that run another script once per row and seed (the benchmarks' tables)."""

from __future__ import annotations

from typing import Sequence, TypeVar

import tyro

ArgsT = TypeVar("ArgsT")


def parse_with_run_flags(args_class: type[ArgsT], argv: Sequence[str] | None = None) -> ArgsT:
    """The script's own flags, with every flag it does not know added to `.extra`, the flags passed to each run.

    tyro alone reads `--extra --total-steps 40` as an empty `--extra` and refuses `--total-steps`; here it
    means what it says, and so does `--total-steps 40` without `--extra`. A flag neither the script nor the run
    knows is refused by the run's own parser, with its name."""
    args, unknown = tyro.cli(args_class, args=argv, return_unknown_args=True)
    args.extra = [*args.extra, *unknown]
    return args
