"""`deepmri batch CASES.csv --task NAME -o DIR`: any registered task over a cohort, resumable, shardable.

Progress goes to stderr as plain text, the summary table to stdout and DIR/summary.csv; exit
status 1 when a case failed (the others still finish), 0 when every selected case is done.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from deepmri.cli.progress_bar import TextProgress
from deepmri.errors import Cancelled


def register(subparsers: argparse._SubParsersAction) -> None:
    from deepmri.runconfig import PRECISIONS
    from deepmri.tasks import available_tasks

    parser = subparsers.add_parser(
        "batch",
        help="run a task over a CSV list of cases (resumable; --case-index/--shard for clusters)",
        description=(
            "Run one task over every case of a CSV: an id column, one column per input of the "
            "task (id,input for a task with one input; id,fixed,moving for a pair), and "
            "optionally columns named like options (model, ...) that override them per row. "
            "Each case writes DIR/<id>/ (outputs, result.json, log.txt, done.json); finished "
            "cases are skipped when run again, so an interrupted batch resumes where it stopped. "
            "DIR/summary.csv lists every case with its measures. 'deepmri TASK --help' lists "
            "the inputs, options and outputs of a task."
        ),
        epilog=(
            "cluster: run one case per job-array task with --case-index $SLURM_ARRAY_TASK_ID "
            "(0-based CSV row), or split the list with --shard i/n (rows i, i+n, ...)."
        ),
    )
    parser.add_argument("cases", type=Path, help="CSV with an id column and one per input")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--task", default="segment", choices=available_tasks(), help="task (default: segment)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a task option for every case (repeatable); a CSV column of that name overrides it",
    )
    parser.add_argument("--model", default=None, help="same as --option model=MODEL")
    parser.add_argument(
        "--with",
        dest="wanted",
        action="append",
        default=[],
        metavar="OUTPUT",
        help="also write this optional output of the task (repeatable), e.g. uncertainty",
    )
    parser.add_argument(
        "--probabilities", action="store_true", help="same as --with probability (segment)"
    )
    parser.add_argument(
        "--uncertainty", action="store_true", help="same as --with uncertainty (segment)"
    )
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (or gpu), cuda:N or mps")
    parser.add_argument("--precision", default=None, choices=PRECISIONS, help="GPU arithmetic")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--case-index", type=int, default=None, help="run only this 0-based row (job arrays)"
    )
    which.add_argument("--shard", default=None, help="run shard i of n, written i/n (0-based)")
    parser.add_argument("--force", action="store_true", help="redo cases that are already done")
    parser.set_defaults(handler=run)


def _options(arguments: argparse.Namespace) -> dict[str, str]:
    from deepmri.tasks import TaskError

    options = {}
    for text in arguments.option:
        name, separator, value = text.partition("=")
        if not separator or not name.strip():
            raise TaskError(
                f"--option '{text}' must look like NAME=VALUE, e.g. model=brain-tissue."
            )
        options[name.strip().replace("-", "_")] = value.strip()
    if arguments.model:
        options["model"] = arguments.model
    return options


def run(arguments: argparse.Namespace) -> int:
    from deepmri.batch import format_summary, read_cases, run_batch, select_cases
    from deepmri.runconfig import RunConfig
    from deepmri.tasks import get_task

    task = get_task(arguments.task)
    config = RunConfig.from_settings(
        device=arguments.device, precision=arguments.precision, threads=arguments.threads
    )
    config.resolve_device()
    wanted = [name for text in arguments.wanted for name in text.replace(",", " ").split()]
    wanted += ["probability"] if arguments.probabilities else []
    wanted += ["uncertainty"] if arguments.uncertainty else []
    cases = read_cases(arguments.cases, task)
    selected = select_cases(cases, case_index=arguments.case_index, shard=arguments.shard)
    print(
        f"deepmri batch: {len(selected)} of {len(cases)} cases, task {task.name}, "
        f"output {arguments.output}",
        file=sys.stderr,
    )
    try:
        with _sigterm_as_interrupt():
            report = run_batch(
                cases,
                task,
                arguments.output,
                selected=selected,
                options=_options(arguments),
                config=config,
                wanted=wanted,
                force=arguments.force,
                progress=TextProgress(),
            )
    except (KeyboardInterrupt, Cancelled):
        print(
            "deepmri batch: interrupted; finished cases are kept and the unfinished one left no "
            "output. Run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    format_summary(report.summary_rows, sys.stdout)
    print(f"summary: {report.summary_path}", file=sys.stderr)
    for failure in report.failed:
        log = arguments.output / failure.case.id / "log.txt"
        print(f"FAILED {failure.case.id}: {failure.message} (log: {log})", file=sys.stderr)
    return 1 if report.failed else 0


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A scheduler's SIGTERM (SLURM time limit, scancel) stops the batch like Ctrl-C does.

    The running case is abandoned cleanly (temporary files removed, summary written) within the
    grace period before the scheduler's SIGKILL.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. called from a worker thread): leave it be
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
