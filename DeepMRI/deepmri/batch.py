"""Batch processing of a cohort: one task over a CSV list of cases, resumable and shardable.

Each case is independent (its own folder, log and done-marker), so an existing scheduler (a SLURM
job array, Dask, Ray) spreads a cohort over a cluster by running `run_case` or one shard per worker.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import SimpleITK as sitk

from deepmri.errors import Cancelled, DeepMRIError
from deepmri.io import atomic_path, read_image, read_transform
from deepmri.progress import (
    CancelLike,
    ProgressCallback,
    check_cancel,
    no_progress,
    sub_progress,
)
from deepmri.runconfig import RunConfig
from deepmri.tasks import Kind, RunContext, Task, TaskResult, get_task
from deepmri.tasks.base import RESULT_FILE

DONE_MARKER = "done.json"
FAILED_MARKER = "failed.json"
CASE_LOG = "log.txt"
SUMMARY_FILE = "summary.csv"
OUTPUT_SUFFIX = ".nii.gz"
_STATUSES = ("done", "failed", "pending")
# A task with one input also takes it from a column named "input" (the case lists written
# before tasks declared their inputs).
SINGLE_INPUT_ALIAS = "input"
# Case ids become folder names, so they are kept to characters that are safe on every file system.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CaseListError(DeepMRIError):
    """The case list (CSV) is malformed: missing column, duplicate or unsafe id, bad shard."""


@dataclass(frozen=True)
class Case:
    """One row of the case list: an id (its output folder name), input files, option overrides."""

    id: str
    inputs: Mapping[str, Path] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    index: int = 0  # 0-based row number in the case list, the number `--case-index` takes

    @property
    def model(self) -> str | None:
        """The row's `model` column, if any (a common override, shown in the summary)."""
        return self.options.get("model") or None


def read_cases(csv_path: str | os.PathLike, task: str | Task = "segment") -> list[Case]:
    """Read one row per case: `id`, a column per input of `task`, optional option columns.

    Required inputs are required columns; a column named like an option (`model`, or
    `sigma_mm` / `sigma-mm`) overrides that option for its row when not empty. Relative input
    paths are taken relative to the CSV's folder.
    """
    task = get_task(task) if isinstance(task, str) else task
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CaseListError(f"The case list '{csv_path}' does not exist.")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    input_columns = _input_columns(task, columns)
    required = ["id"] + [
        spec.name for spec in task.inputs if not spec.optional and spec.name not in input_columns
    ]
    missing = [name for name in required if name not in columns]
    if missing:
        example = ",".join(["id"] + [spec.name for spec in task.inputs])
        raise CaseListError(
            f"The case list '{csv_path.name}' has no column {', '.join(missing)}; "
            f"its first line must name the columns, e.g. '{example}' for task '{task.name}'."
        )
    option_columns = _option_columns(task, columns)
    cases = [
        _case_from_row(row, index, csv_path, task, input_columns, option_columns)
        for index, row in enumerate(rows)
    ]
    _check_unique_ids(cases, csv_path)
    return cases


def _input_columns(task: Task, columns: Sequence[str]) -> dict[str, str]:
    """input name -> the column holding it."""
    found = {spec.name: spec.name for spec in task.inputs if spec.name in columns}
    if len(task.inputs) == 1 and not found and SINGLE_INPUT_ALIAS in columns:
        found[task.inputs[0].name] = SINGLE_INPUT_ALIAS
    return found


def _option_columns(task: Task, columns: Sequence[str]) -> dict[str, str]:
    """option name -> the column holding it (`sigma_mm` or `sigma-mm`)."""
    found = {}
    for spec in task.options:
        for column in (spec.name, spec.name.replace("_", "-")):
            if column in columns:
                found[spec.name] = column
    return found


def _case_from_row(
    row: dict[str, str],
    index: int,
    csv_path: Path,
    task: Task,
    input_columns: dict[str, str],
    option_columns: dict[str, str],
) -> Case:
    line = index + 2  # the header is line 1
    case_id = row.get("id", "")
    if not _SAFE_ID.fullmatch(case_id):
        raise CaseListError(
            f"Line {line} of '{csv_path.name}': the id '{case_id}' must start with a letter or digit "
            "and use only letters, digits, '.', '_' and '-' (it names the output folder)."
        )
    inputs = {}
    for spec in task.inputs:
        text = row.get(input_columns.get(spec.name, spec.name), "")
        if not text:
            if spec.optional:
                continue
            raise CaseListError(
                f"Line {line} of '{csv_path.name}': case '{case_id}' has no input "
                f"'{input_columns.get(spec.name, spec.name)}'."
            )
        path = Path(text).expanduser()
        inputs[spec.name] = path if path.is_absolute() else csv_path.parent / path
    options = {name: row[column] for name, column in option_columns.items() if row.get(column)}
    return Case(case_id, inputs, options, index)


def _check_unique_ids(cases: Sequence[Case], csv_path: Path) -> None:
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise CaseListError(f"The id '{case.id}' appears twice in '{csv_path.name}'.")
        seen.add(case.id)


def select_cases(
    cases: Sequence[Case], *, case_index: int | None = None, shard: str | None = None
) -> list[Case]:
    """The cases one worker runs: all, one row (0-based, as a job array's task id), or shard `i/n`.

    Shard `i/n` (0 <= i < n) takes rows i, i+n, i+2n, ..., so n workers together cover every case
    exactly once and each gets a similar mix of the list.
    """
    if case_index is not None and shard is not None:
        raise CaseListError("Give either --case-index or --shard, not both.")
    if case_index is not None:
        if not 0 <= case_index < len(cases):
            raise CaseListError(
                f"--case-index {case_index} is outside the case list (0 to {len(cases) - 1})."
            )
        return [cases[case_index]]
    if shard is not None:
        part, count = _parse_shard(shard)
        return [case for case in cases if case.index % count == part]
    return list(cases)


def _parse_shard(shard: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise CaseListError(
            f"--shard '{shard}' must look like i/n with 0 <= i < n, e.g. 0/4 for the first of four."
        )
    return int(match[1]), int(match[2])


def case_folder(output_dir: str | os.PathLike, case: Case) -> Path:
    return Path(output_dir) / case.id


def case_options(task: Task, case: Case, options: Mapping[str, Any] | None = None) -> dict:
    """The options a case runs with: the batch's, overridden by the row's, typed and complete."""
    return task.resolve_options({**dict(options or {}), **dict(case.options)})


def is_done(
    output_dir: str | os.PathLike,
    case: Case,
    task: str | Task,
    options: Mapping[str, Any] | None = None,
    wanted: Iterable[str] = (),
) -> bool:
    """Done when the done-marker names this task, the same options, every wanted output, and
    every file it lists exists."""
    task = get_task(task) if isinstance(task, str) else task
    marker = _read_json(case_folder(output_dir, case) / DONE_MARKER)
    if marker is None or marker.get("task") != task.name:
        return False
    try:
        requested = json.loads(json.dumps(case_options(task, case, options), default=str))
    except DeepMRIError:
        return False
    if marker.get("options") != requested or not set(wanted) <= set(marker.get("wanted", [])):
        return False
    folder = case_folder(output_dir, case)
    return all((folder / name).is_file() for name in marker.get("outputs", []))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_text_atomic(path: Path, text: str) -> None:
    """Readers never see half a file (io.atomic_path, which also honours the umask)."""
    with atomic_path(path, path.suffix) as partial:
        partial.write_text(text, encoding="utf-8", newline="")


@dataclass
class CaseResult:
    """How one case went in this run: done (now or earlier), failed with a message, or skipped."""

    case: Case
    status: str  # "done", "skipped" (done in an earlier run) or "failed"
    seconds: float = 0.0
    message: str = ""


class _CaseLog:
    """The per-case log: one header per attempt, progress steps as they change, errors in full."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = path.open("a", encoding="utf-8")
        self._last_message = ""

    def write(self, text: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        self._stream.write(f"{stamp} {text}\n")
        self._stream.flush()

    def progress(self, fraction: float, message: str) -> None:
        if message != self._last_message:
            self._last_message = message
            self.write(f"[{100 * fraction:3.0f}%] {message}")

    def close(self) -> None:
        self._stream.close()


def run_case(
    case: Case,
    task: str | Task,
    output_dir: str | os.PathLike,
    *,
    options: Mapping[str, Any] | None = None,
    config: RunConfig | None = None,
    wanted: Iterable[str] = (),
    force: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
) -> CaseResult:
    """Run one case into `output_dir/<id>/`; a finished case is skipped unless `force`.

    Outputs are the task's `TaskResult.write` (one file per output key, and result.json).
    Never raises for a bad case (the error goes to its log, `failed.json` and the result), so one
    corrupt scan cannot stop a cohort; only `Cancelled` and KeyboardInterrupt stop the caller.
    """
    from deepmri import __version__

    task = get_task(task) if isinstance(task, str) else task
    progress = progress or no_progress
    wanted = frozenset(wanted)
    if not force and is_done(output_dir, case, task, options, wanted):
        return CaseResult(case, "skipped")
    folder = case_folder(output_dir, case)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (DONE_MARKER, FAILED_MARKER):
        (folder / stale).unlink(missing_ok=True)
    for partial in folder.glob(".partial-*"):  # left by a run killed in the middle of a write
        partial.unlink(missing_ok=True)
    log = _CaseLog(folder / CASE_LOG)
    log.write(
        f"=== case {case.id}: task {task.name}, options {dict(case.options) or 'default'}, "
        f"deepmri {__version__}"
    )
    for name, path in case.inputs.items():
        log.write(f"input {name}: {path}")
    started = time.perf_counter()

    def report(fraction: float, message: str) -> None:
        log.progress(fraction, message)
        progress(fraction, message)

    try:
        resolved = case_options(task, case, options)
        inputs = _read_inputs(task, case)
        for name, value in inputs.items():
            if isinstance(value, sitk.Image):
                report(0.02, f"Read {name}: {value.GetSize()} voxels at {_spacing_text(value)} mm")
        context = RunContext(
            config=config or RunConfig(),
            progress=sub_progress(report, 0.03, 0.97),
            cancel=cancel,
            wanted=wanted,
        )
        result = task(inputs, resolved, context)
        check_cancel(cancel)
        report(0.98, "Writing the outputs")
        written = _write_outputs(result, folder)
        seconds = time.perf_counter() - started
        marker = {
            "id": case.id,
            "task": task.name,
            "options": resolved,
            "wanted": sorted(wanted),
            "model": result.info.get("model_id"),
            "inputs": {name: str(path) for name, path in case.inputs.items()},
            "outputs": written,
            "seconds": round(seconds, 2),
            "measures": result.measures,
            "provenance": result.info.get("provenance", {}),
            "deepmri_version": __version__,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # The marker goes last: a case interrupted while writing outputs is simply run again.
        _write_text_atomic(folder / DONE_MARKER, json.dumps(marker, indent=2, default=str))
        log.write(f"done in {seconds:.1f} s: {', '.join(written)}")
        return CaseResult(case, "done", seconds)
    except (Cancelled, KeyboardInterrupt):
        log.write("cancelled; this case will run again on the next start")
        raise
    except Exception as error:  # noqa: BLE001 - one bad case must not stop the cohort
        seconds = time.perf_counter() - started
        message = _one_line(error)
        log.write(f"FAILED: {message}")
        if not isinstance(error, DeepMRIError):
            log.write(traceback.format_exc())
        failure = {"id": case.id, "task": task.name, "error": message, "seconds": round(seconds, 2)}
        _write_text_atomic(folder / FAILED_MARKER, json.dumps(failure, indent=2))
        return CaseResult(case, "failed", seconds, message)
    finally:
        log.close()


def _read_inputs(task: Task, case: Case) -> dict[str, Any]:
    kinds = {spec.name: spec.kind for spec in task.inputs}
    return {
        name: (read_transform if kinds[name] is Kind.TRANSFORM else read_image)(path)
        for name, path in case.inputs.items()
    }


def _spacing_text(image: sitk.Image) -> str:
    return "x".join(f"{value:.2g}" for value in image.GetSpacing())


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, DeepMRIError) else f"{type(error).__name__}: {text}"


def _write_outputs(result: TaskResult, folder: Path) -> list[str]:
    files = result.write(folder, OUTPUT_SUFFIX)
    return [*files.values(), RESULT_FILE]


@dataclass
class BatchReport:
    """The outcome of one `run_batch` call and the cohort-wide summary rows it wrote."""

    results: list[CaseResult]
    summary_rows: list[dict[str, Any]]
    summary_path: Path

    @property
    def failed(self) -> list[CaseResult]:
        return [result for result in self.results if result.status == "failed"]


def run_batch(
    cases: Sequence[Case],
    task: str | Task,
    output_dir: str | os.PathLike,
    *,
    selected: Sequence[Case] | None = None,
    options: Mapping[str, Any] | None = None,
    config: RunConfig | None = None,
    wanted: Iterable[str] = (),
    force: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
) -> BatchReport:
    """Run `selected` cases (default: all) one after another, then write the cohort summary.

    `options` apply to every case (a row's option columns override them); `config` is the
    device, precision and threads; `wanted` names optional outputs to write. The summary covers
    every case in `cases`, read back from the case folders, so the last shard to finish leaves
    a complete table. It is also written when the run is cancelled.
    """
    progress = progress or no_progress
    task = get_task(task) if isinstance(task, str) else task  # unknown: fails before any case
    task.resolve_options(dict(options or {}))  # so do unknown or mistyped options
    wanted = frozenset(wanted)
    task.check_wanted(wanted)
    if config is not None:
        config.resolve_device()  # and a missing GPU
    selected = list(cases if selected is None else selected)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    try:
        for number, case in enumerate(selected):
            check_cancel(cancel)
            case_progress = _case_progress(progress, number, len(selected), case)
            result = run_case(
                case,
                task,
                output_dir,
                options=options,
                config=config,
                wanted=wanted,
                force=force,
                progress=case_progress,
                cancel=cancel,
            )
            case_progress(1.0, _status_text(result))
            results.append(result)
    finally:
        rows = summary_rows(cases, output_dir, task, options=options, wanted=wanted)
        summary_path = write_summary(rows, output_dir / SUMMARY_FILE)
    return BatchReport(results, rows, summary_path)


def _case_progress(
    progress: ProgressCallback, number: int, total: int, case: Case
) -> ProgressCallback:
    def report(fraction: float, message: str) -> None:
        overall = (number + min(max(fraction, 0.0), 1.0)) / max(total, 1)
        progress(overall, f"case {number + 1}/{total} {case.id}: {message}")

    return report


def _status_text(result: CaseResult) -> str:
    if result.status == "skipped":
        return "already done, skipped"
    if result.status == "failed":
        return f"FAILED ({result.message})"
    return f"done in {result.seconds:.1f} s"


def summary_rows(
    cases: Iterable[Case],
    output_dir: str | os.PathLike,
    task: str | Task,
    *,
    options: Mapping[str, Any] | None = None,
    wanted: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """One row per case from its markers: status done, failed or pending, time, model, measures."""
    task = get_task(task) if isinstance(task, str) else task
    rows = []
    for case in cases:
        folder = case_folder(output_dir, case)
        row: dict[str, Any] = {"id": case.id, "status": "pending", "seconds": "", "model": ""}
        row["message"] = ""
        if is_done(output_dir, case, task, options, wanted):
            marker = _read_json(folder / DONE_MARKER) or {}
            row.update(status="done", seconds=marker.get("seconds", ""))
            row.update(model=marker.get("model") or "")
            row.update(marker.get("measures", {}))
        elif (failure := _read_json(folder / FAILED_MARKER)) is not None:
            row.update(status="failed", seconds=failure.get("seconds", ""))
            row["message"] = failure.get("error", "")
        rows.append(row)
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns = ["id", "status", "seconds", "model"]
    for row in rows:
        columns += [name for name in row if name not in columns and name != "message"]
    return columns + ["message"]


def write_summary(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """summary.csv, written atomically so shards finishing together never leave a torn file."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text_atomic(Path(path), buffer.getvalue())
    return Path(path)


def format_summary(
    rows: Sequence[dict[str, Any]], stream: TextIO | None = None, max_rows: int = 40
) -> str:
    """A fixed-width table of the summary rows with a count line, for the terminal.

    Beyond `max_rows` cases only the failed and pending ones are listed (summary.csv has all).
    """
    columns = _columns(rows)
    shown = rows if len(rows) <= max_rows else [r for r in rows if r["status"] != "done"]
    cells = [[str(row.get(name, "")) for name in columns] for row in shown]
    widths = [max([len(name)] + [len(line[i]) for line in cells]) for i, name in enumerate(columns)]
    lines = ["  ".join(name.ljust(width) for name, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} done cases not listed; see summary.csv")
    counts = {status: sum(row["status"] == status for row in rows) for status in _STATUSES}
    lines.append(", ".join(f"{count} {status}" for status, count in counts.items()))
    text = "\n".join(line.rstrip() for line in lines) + "\n"
    if stream is not None:
        stream.write(text)
    return text
