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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepmri", description="Deep learning for MRI: the headless front door of DeepMRI."
    )
    parser.add_argument("--version", action="version", version=f"deepmri {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"deepmri.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"deepmri.cli.{name}":
                continue  # that feature is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
