"""The `deepmri` command line: one sub-command per feature, errors on one line, never a traceback.

Each sub-command lives in its own module here with a `register(subparsers)` function that adds
its parser and sets `handler`; `main` dispatches and turns `DeepMRIError` into exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deepmri import __version__
from deepmri.errors import Cancelled, DeepMRIError

# "tasks" adds one sub-command per registered task (segment, segment-classical, ...).
COMMAND_MODULES = ("demo", "models", "batch", "train", "tasks")
# `deepmri train ...` builds its own parser alone: training from a sources file then needs no
# SimpleITK (which the task commands import), so it runs on a machine without it (a GPU machine).
STANDALONE_COMMANDS = ("train",)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or only the `only` command's module (one of STANDALONE_COMMANDS)."""
    parser = argparse.ArgumentParser(
        prog="deepmri", description="Deep learning for MRI: the headless front door of DeepMRI."
    )
    parser.add_argument("--version", action="version", version=f"deepmri {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only else COMMAND_MODULES:
        try:
            module = importlib.import_module(f"deepmri.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"deepmri.cli.{name}":
                continue  # that feature is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in STANDALONE_COMMANDS else None)
    arguments = parser.parse_args(argv)
    if not getattr(arguments, "handler", None):
        parser.print_help()
        return 1
    try:
        return int(arguments.handler(arguments) or 0)
    except Cancelled as error:
        print(f"deepmri: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("deepmri: interrupted; no output was written.", file=sys.stderr)
        return 130
    except DeepMRIError as error:
        print(f"deepmri: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
