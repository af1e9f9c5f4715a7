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
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TextIO

import SimpleITK as sitk

from deepmri.errors import Cancelled, DeepMRIError
from deepmri.io import read_image, write_image
from deepmri.progress import (
    CancelLike,
    ProgressCallback,
    check_cancel,
    no_progress,
    sub_progress,
)

DONE_MARKER = "done.json"
FAILED_MARKER = "failed.json"
CASE_LOG = "log.txt"
SUMMARY_FILE = "summary.csv"
_STATUSES = ("done", "failed", "pending")
REQUIRED_COLUMNS = ("id", "input")
# Case ids become folder names, so they are kept to characters that are safe on every file system.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CaseListError(DeepMRIError):
    """The case list (CSV) is malformed: missing column, duplicate or unsafe id, bad shard."""


@dataclass(frozen=True)
class Case:
    """One row of the case list: an id (also its output folder name), an input and an optional model."""

    id: str
    input: Path
    model: str | None = None
    index: int = 0  # 0-based row number in the case list, the number `--case-index` takes


@dataclass
class TaskOutput:
    """What a task gives the batch: images to write (file stem -> image) and summary columns."""

    images: dict[str, sitk.Image]
    measures: dict[str, float | str] = field(default_factory=dict)
    model: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


class TaskRunner(Protocol):
    """A batch task: one image in, a `TaskOutput` out; long work reports progress and obeys cancel."""

    def __call__(
        self,
        image: sitk.Image,
        *,
        model: str | None,
        device: str | None,
        options: dict[str, Any],
        progress: ProgressCallback,
        cancel: CancelLike | None,
    ) -> TaskOutput: ...


_TASKS: dict[str, TaskRunner] = {}


def register_task(name: str, runner: TaskRunner, *, replace: bool = False) -> None:
    """Make a task available to `run_batch` and `deepmri batch --task NAME`."""
    if name in _TASKS and not replace:
        raise ValueError(f"A batch task named '{name}' is already registered.")
    _TASKS[name] = runner


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> TaskRunner:
    try:
        return _TASKS[name]
    except KeyError:
        raise DeepMRIError(
            f"Unknown batch task '{name}'; choose one of: {', '.join(available_tasks())}."
        ) from None


def _segment_task(
    image: sitk.Image,
    *,
    model: str | None,
    device: str | None,
    options: dict[str, Any],
    progress: ProgressCallback,
    cancel: CancelLike | None,
) -> TaskOutput:
    """Learned segmentation (deepmri.tasks.segment): labels, plus probabilities/uncertainty on request."""
    from deepmri.tasks.segment import segment

    result = segment(
        image,
        model or "brain-tissue",
        device=device,
        probabilities=bool(options.get("probabilities")),
        uncertainty=bool(options.get("uncertainty")),
        progress=progress,
        cancel=cancel,
    )
    images = {"labels": result.labels}
    for name, probability in (result.probabilities or {}).items():
        images["probability-" + _file_stem(name)] = probability
    if result.uncertainty is not None:
        images["uncertainty"] = result.uncertainty
    measures = {f"{name} (mL)": round(ml, 2) for name, ml in result.volumes_ml().items()}
    return TaskOutput(images, measures, result.model_id, result.provenance)


def _classical_brain_mask_task(
    image: sitk.Image,
    *,
    model: str | None,
    device: str | None,
    options: dict[str, Any],
    progress: ProgressCallback,
    cancel: CancelLike | None,
) -> TaskOutput:
    """Brain mask by thresholding and morphology: no weights, works on day one, seconds per case."""
    import numpy as np

    from deepmri.tasks.segment_classical import classical_brain_mask

    check_cancel(cancel)
    progress(0.1, "Thresholding the brain")
    mask = classical_brain_mask(image)
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    brain_ml = float(sitk.GetArrayViewFromImage(mask).sum()) * voxel_ml
    return TaskOutput({"labels": mask}, {"Brain (mL)": round(brain_ml, 2)}, "classical")


register_task("segment", _segment_task)
register_task("brain-mask-classical", _classical_brain_mask_task)


def _file_stem(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "output"


def read_cases(csv_path: str | os.PathLike) -> list[Case]:
    """Read `id,input[,model]` rows; relative inputs are taken relative to the CSV's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CaseListError(f"The case list '{csv_path}' does not exist.")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise CaseListError(
                f"The case list '{csv_path.name}' has no column {', '.join(missing)}; "
                f"its first line must name the columns, e.g. 'id,input,model'."
            )
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    cases = [_case_from_row(row, index, csv_path) for index, row in enumerate(rows)]
    _check_unique_ids(cases, csv_path)
    return cases


def _case_from_row(row: dict[str, str], index: int, csv_path: Path) -> Case:
    line = index + 2  # the header is line 1
    case_id, input_text = row.get("id", ""), row.get("input", "")
    if not _SAFE_ID.fullmatch(case_id):
        raise CaseListError(
            f"Line {line} of '{csv_path.name}': the id '{case_id}' must start with a letter or digit "
            "and use only letters, digits, '.', '_' and '-' (it names the output folder)."
        )
    if not input_text:
        raise CaseListError(f"Line {line} of '{csv_path.name}': case '{case_id}' has no input.")
    input_path = Path(input_text).expanduser()
    if not input_path.is_absolute():
        input_path = csv_path.parent / input_path
    return Case(case_id, input_path, row.get("model") or None, index)


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


def is_done(output_dir: str | os.PathLike, case: Case, task: str) -> bool:
    """A case is done when its done-marker names this task and every output it lists exists."""
    marker = _read_json(case_folder(output_dir, case) / DONE_MARKER)
    if marker is None or marker.get("task") != task:
        return False
    if case.model and marker.get("requested_model") != case.model:
        return False
    folder = case_folder(output_dir, case)
    return all((folder / name).is_file() for name in marker.get("outputs", []))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_text_atomic(path: Path, text: str) -> None:
    """Temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
    task: str,
    output_dir: str | os.PathLike,
    *,
    model: str | None = None,
    device: str | None = None,
    options: dict[str, Any] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
) -> CaseResult:
    """Run one case into `output_dir/<id>/`; a finished case is skipped unless `force`.

    Never raises for a bad case (the error goes to its log, `failed.json` and the result), so one
    corrupt scan cannot stop a cohort; only `Cancelled` and KeyboardInterrupt stop the caller.
    """
    from deepmri import __version__

    progress = progress or no_progress
    case = case if case.model or not model else Case(case.id, case.input, model, case.index)
    if not force and is_done(output_dir, case, task):
        return CaseResult(case, "skipped")
    runner = get_task(task)
    folder = case_folder(output_dir, case)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (DONE_MARKER, FAILED_MARKER):
        (folder / stale).unlink(missing_ok=True)
    for partial in folder.glob(".partial-*"):  # left by a run killed in the middle of a write
        partial.unlink(missing_ok=True)
    log = _CaseLog(folder / CASE_LOG)
    log.write(
        f"=== case {case.id}: task {task}, model {case.model or 'default'}, deepmri {__version__}"
    )
    log.write(f"input {case.input}")
    started = time.perf_counter()

    def report(fraction: float, message: str) -> None:
        log.progress(fraction, message)
        progress(fraction, message)

    try:
        image = read_image(case.input)
        report(0.02, f"Read {image.GetSize()} voxels at {_spacing_text(image)} mm")
        output = runner(
            image,
            model=case.model,
            device=device,
            options=dict(options or {}),
            progress=sub_progress(report, 0.03, 0.97),
            cancel=cancel,
        )
        check_cancel(cancel)
        report(0.98, "Writing the outputs")
        written = _write_outputs(output, folder)
        seconds = time.perf_counter() - started
        marker = {
            "id": case.id,
            "task": task,
            "requested_model": case.model,
            "model": output.model,
            "input": str(case.input),
            "outputs": written,
            "seconds": round(seconds, 2),
            "measures": output.measures,
            "provenance": output.provenance,
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
        failure = {"id": case.id, "task": task, "error": message, "seconds": round(seconds, 2)}
        _write_text_atomic(folder / FAILED_MARKER, json.dumps(failure, indent=2))
        return CaseResult(case, "failed", seconds, message)
    finally:
        log.close()


def _spacing_text(image: sitk.Image) -> str:
    return "x".join(f"{value:.2g}" for value in image.GetSpacing())


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, DeepMRIError) else f"{type(error).__name__}: {text}"


def _write_outputs(output: TaskOutput, folder: Path) -> list[str]:
    written = []
    for stem, image in output.images.items():
        name = f"{stem}.nii.gz"
        write_image(image, folder / name)
        written.append(name)
    return written


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
    task: str,
    output_dir: str | os.PathLike,
    *,
    selected: Sequence[Case] | None = None,
    model: str | None = None,
    device: str | None = None,
    options: dict[str, Any] | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
) -> BatchReport:
    """Run `selected` cases (default: all) one after another, then write the cohort summary.

    The summary covers every case in `cases`, read back from the case folders, so the last shard
    to finish leaves a complete table. It is also written when the run is cancelled.
    """
    progress = progress or no_progress
    get_task(task)  # an unknown task fails before any case starts
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
                model=model,
                device=device,
                options=options,
                force=force,
                progress=case_progress,
                cancel=cancel,
            )
            case_progress(1.0, _status_text(result))
            results.append(result)
    finally:
        rows = summary_rows(cases, output_dir, task, model=model)
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
    cases: Iterable[Case], output_dir: str | os.PathLike, task: str, *, model: str | None = None
) -> list[dict[str, Any]]:
    """One row per case from its markers: status done, failed or pending, time, model, measures."""
    rows = []
    for case in cases:
        case = case if case.model or not model else Case(case.id, case.input, model, case.index)
        folder = case_folder(output_dir, case)
        row: dict[str, Any] = {"id": case.id, "status": "pending", "seconds": "", "model": ""}
        row["message"] = ""
        if is_done(output_dir, case, task):
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
