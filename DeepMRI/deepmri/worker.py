"""Background worker: `python -m deepmri.worker request.json` runs one task in its own process.

Slicer (or any caller) writes the inputs and a JSON request to a folder; the worker streams
progress as JSON lines on stdout, writes the `TaskResult` to the output folder and stops cleanly
on SIGTERM. It knows no task: any registered one (or "module:Class" for one that is not) runs.

Request:
    {"task": "segment" (or "package.module:Class"), "inputs": {name: file},
     "options": {name: value}, "config": RunConfig.to_dict(), "wanted": [optional outputs],
     "output_dir": folder (default: the request's folder)}
Events, one JSON object per stdout line:
    {"event": "progress", "fraction": 0.4, "message": "..."}
    {"event": "result", "task": "segment", "folder": output_dir, "files": {key: file name}}
        (read it back with `deepmri.tasks.TaskResult.read(folder)`)
    {"event": "error", "message": "...", "kind": "InvalidImageError"}
    {"event": "cancelled", "message": "..."}
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from deepmri.errors import Cancelled, DeepMRIError
from deepmri.progress import CancelToken, check_cancel

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3
OUTPUT_SUFFIX = ".nrrd"  # uncompressed: the parent reads it back at once, speed beats size


class RequestError(DeepMRIError):
    """The request file is missing, unreadable or malformed."""


class _Events:
    """Writes events as JSON lines, flushed at once so the parent sees them as they happen."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def send(self, event: str, **fields: Any) -> None:
        self._stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
        self._stream.flush()

    def progress(self, fraction: float, message: str) -> None:
        self.send("progress", fraction=round(float(fraction), 4), message=message)


def _read_request(path: Path) -> dict[str, Any]:
    try:
        request = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RequestError(f"Cannot read the job request '{path}': {error}") from error
    if not isinstance(request, dict) or not isinstance(request.get("task"), str):
        raise RequestError(f"The job request '{path}' names no task.")
    return request


def read_inputs(task: Any, files: dict[str, str]) -> dict[str, Any]:
    """Each input file read by its declared kind (images, or transforms)."""
    from deepmri.io import read_image, read_transform
    from deepmri.tasks import Kind

    kinds = {spec.name: spec.kind for spec in task.inputs}
    inputs = {}
    for name, file in files.items():
        reader = read_transform if kinds.get(name) is Kind.TRANSFORM else read_image
        inputs[name] = reader(file)
    return inputs


def run_request(path: Path, events: _Events, cancel: CancelToken) -> None:
    """Read the inputs, run the task, write its result, then report the result event."""
    from deepmri.runconfig import RunConfig
    from deepmri.tasks import RunContext, get_task

    request = _read_request(path)
    output_dir = Path(request.get("output_dir") or path.parent)
    task = get_task(request["task"])
    options = task.resolve_options(dict(request.get("options") or {}))
    task.check_inputs(request.get("inputs") or {})
    config = RunConfig.from_dict(request.get("config"))
    context = RunContext(
        config=config,
        progress=events.progress,
        cancel=cancel,
        wanted=frozenset(request.get("wanted") or ()),
    )
    task.check_wanted(context.wanted)
    config.resolve_device()  # a missing GPU is reported before the inputs are read
    # Importing torch and MONAI takes seconds: say so before the first real progress report.
    events.progress(0.0, f"Starting {task.title or task.name}")
    inputs = read_inputs(task, dict(request.get("inputs") or {}))
    result = task(inputs, options, context)
    check_cancel(cancel)
    files = result.write(output_dir, OUTPUT_SUFFIX)
    events.send("result", task=result.task, folder=str(output_dir), files=files)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 done, 1 error, 3 cancelled)."""
    argv = sys.argv[1:] if argv is None else argv
    events = _Events(sys.stdout)
    if len(argv) != 1:
        events.send("error", message="Usage: python -m deepmri.worker request.json", kind="usage")
        return EXIT_ERROR
    cancel = CancelToken()
    # Terminate from the parent = cancel: stop at the next check and exit cleanly.
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.cancel())
    try:
        run_request(Path(argv[0]), events, cancel)
    except Cancelled as error:
        events.send("cancelled", message=str(error))
        return EXIT_CANCELLED
    except DeepMRIError as error:
        events.send("error", message=str(error), kind=type(error).__name__)
        return EXIT_ERROR
    except MemoryError:
        events.send("error", message="The computer ran out of memory.", kind="MemoryError")
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
