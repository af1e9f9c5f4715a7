"""`deepmri batch CASES.csv --task segment -o DIR`: one task over a cohort, resumable and shardable.

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
    from deepmri.batch import available_tasks

    parser = subparsers.add_parser(
        "batch",
        help="run a task over a CSV list of cases (resumable; --case-index/--shard for clusters)",
        description=(
            "Run one task over every case of a CSV with columns id,input[,model]. Each case writes "
            "DIR/<id>/ (outputs, log.txt, done.json); finished cases are skipped when run again, so "
            "an interrupted batch resumes where it stopped. DIR/summary.csv lists every case."
        ),
        epilog=(
            "cluster: run one case per job-array task with --case-index $SLURM_ARRAY_TASK_ID "
            "(0-based CSV row), or split the list with --shard i/n (rows i, i+n, ...)."
        ),
    )
    parser.add_argument("cases", type=Path, help="CSV with columns id,input[,model]")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--task", default="segment", choices=available_tasks(), help="task (default: segment)"
    )
    parser.add_argument("--model", default=None, help="model for rows without a model column")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (default: best)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--case-index", type=int, default=None, help="run only this 0-based row (job arrays)"
    )
    which.add_argument("--shard", default=None, help="run shard i of n, written i/n (0-based)")
    parser.add_argument(
        "--probabilities", action="store_true", help="also write per-label probability maps"
    )
    parser.add_argument(
        "--uncertainty", action="store_true", help="also write the test-time-flip uncertainty map"
    )
    parser.add_argument("--force", action="store_true", help="redo cases that are already done")
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    from deepmri.batch import format_summary, read_cases, run_batch, select_cases

    cases = read_cases(arguments.cases)
    selected = select_cases(cases, case_index=arguments.case_index, shard=arguments.shard)
    print(
        f"deepmri batch: {len(selected)} of {len(cases)} cases, task {arguments.task}, "
        f"output {arguments.output}",
        file=sys.stderr,
    )
    try:
        with _sigterm_as_interrupt():
            report = run_batch(
                cases,
                arguments.task,
                arguments.output,
                selected=selected,
                model=arguments.model,
                device=arguments.device,
                options={
                    "probabilities": arguments.probabilities,
                    "uncertainty": arguments.uncertainty,
                },
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
