"""Background worker: `python -m deepmri.worker request.json` runs one task in its own process.

Slicer (or any caller) writes the inputs and a JSON request to a folder; the worker streams progress
as JSON lines on stdout, writes its outputs to the same folder and stops cleanly on SIGTERM.

Request: {"task": "smooth" | "segment", "inputs": {name: image path}, "options": {...},
"output_dir": folder}. Events, one JSON object per stdout line:
{"event": "progress", "fraction": 0.4, "message": "..."}, {"event": "result", "outputs":
{name: file name in output_dir}, "info": {...}}, {"event": "error", "message": "...", "kind":
"InvalidImageError"}, {"event": "cancelled", "message": "..."}.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import SimpleITK as sitk

from deepmri.errors import Cancelled, DeepMRIError, InvalidImageError
from deepmri.io import read_image, write_image
from deepmri.progress import CancelToken, ProgressCallback, check_cancel

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3
OUTPUT_SUFFIX = ".nrrd"  # uncompressed: the parent reads it back at once, speed beats size

TaskOutputs = tuple[dict[str, sitk.Image], dict[str, Any]]
Task = Callable[[dict[str, sitk.Image], dict[str, Any], ProgressCallback, CancelToken], TaskOutputs]


class RequestError(DeepMRIError):
    """The request file is missing, unreadable or names an unknown task or input."""


def smooth_task(
    inputs: dict[str, sitk.Image],
    options: dict[str, Any],
    progress: ProgressCallback,
    cancel: CancelToken,
) -> TaskOutputs:
    """A diagnostic task: in-plane Gaussian smoothing, slice by slice, `passes` times over.

    Real work with a progress report and a cancel check per slice, so a caller's progress bar,
    Cancel button and error path can be checked without a model.
    """
    image = _require(inputs, "image")
    sigma = float(options.get("sigma_mm", 1.0))
    passes = int(options.get("passes", 1))
    if image.GetDimension() != 3:
        raise InvalidImageError(
            f"The input is {image.GetDimension()}D; smoothing works on 3D volumes."
        )
    if sigma <= 0 or passes < 1:
        raise InvalidImageError("sigma_mm must be positive and passes at least 1.")
    # Slices go through as plain 2D images (in-plane spacing only): the 2D part of an oblique
    # 3D direction matrix is not a valid 2D direction.
    volume = sitk.GetArrayFromImage(image).astype(np.float32)
    in_plane_spacing = image.GetSpacing()[:2]
    depth = volume.shape[0]
    for current_pass in range(passes):
        for k in range(depth):
            check_cancel(cancel)
            plane = sitk.GetImageFromArray(volume[k])
            plane.SetSpacing(in_plane_spacing)
            volume[k] = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(plane, sigma))
            done = (current_pass * depth + k + 1) / (passes * depth)
            progress(done, f"Smoothing slice {k + 1}/{depth} (pass {current_pass + 1}/{passes})")
    working = sitk.GetImageFromArray(volume)
    working.CopyInformation(image)
    return {"image": working}, {"sigma_mm": sigma, "passes": passes}


def segment_task(
    inputs: dict[str, sitk.Image],
    options: dict[str, Any],
    progress: ProgressCallback,
    cancel: CancelToken,
) -> TaskOutputs:
    """Run `deepmri.tasks.segment.segment` (or `options["function"]`, "module:name") on `image`.

    Outputs: "labels", "probability_<value>" per label, "uncertainty"; info carries the label
    list, model id, provenance and which probability file belongs to which label.
    """
    # Importing torch and MONAI takes seconds: say so before the first real progress report.
    progress(0.0, "Loading PyTorch and the model libraries")
    function = _load_function(options.get("function", "deepmri.tasks.segment:segment"))
    result = function(
        _require(inputs, "image"),
        options.get("model", "brain-tissue"),
        device=options.get("device"),
        probabilities=bool(options.get("probabilities", False)),
        uncertainty=bool(options.get("uncertainty", False)),
        progress=progress,
        cancel=cancel,
    )
    outputs = {"labels": result.labels}
    probability_names = {}
    by_name = {info["name"]: info["value"] for info in result.label_info}
    for name, probability in (result.probabilities or {}).items():
        key = f"probability_{by_name.get(name, len(probability_names) + 1)}"
        outputs[key] = probability
        probability_names[key] = name
    if result.uncertainty is not None:
        outputs["uncertainty"] = result.uncertainty
    info = {
        "label_info": result.label_info,
        "model_id": result.model_id,
        "provenance": result.provenance,
        "probability_names": probability_names,
    }
    return outputs, info


TASKS: dict[str, Task] = {"smooth": smooth_task, "segment": segment_task}


def _require(inputs: Mapping[str, sitk.Image], name: str) -> sitk.Image:
    if name not in inputs:
        raise RequestError(f"The request has no input named '{name}'.")
    return inputs[name]


def _load_function(reference: str) -> Callable[..., Any]:
    """Import "package.module:function"; lets a caller (or a test) plug in its own segmenter."""
    module_name, _, attribute = reference.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise RequestError(f"Cannot load the function '{reference}': {error}") from error


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
    if request.get("task") not in TASKS:
        raise RequestError(
            f"Unknown task '{request.get('task')}'; known tasks: {', '.join(sorted(TASKS))}."
        )
    return request


def run_request(path: Path, events: _Events, cancel: CancelToken) -> None:
    """Read inputs, run the task, write outputs atomically, then report the result event."""
    request = _read_request(path)
    output_dir = Path(request.get("output_dir") or path.parent)
    inputs = {name: read_image(file) for name, file in request.get("inputs", {}).items()}
    outputs, info = TASKS[request["task"]](
        inputs, dict(request.get("options", {})), events.progress, cancel
    )
    check_cancel(cancel)
    written = {}
    for name, image in outputs.items():
        check_cancel(cancel)
        written[name] = write_image(image, output_dir / f"{name}{OUTPUT_SUFFIX}", False).name
    events.send("result", outputs=written, info=info)


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
