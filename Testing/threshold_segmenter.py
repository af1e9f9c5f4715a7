"""A small real segmenter with the signature of `deepmri.tasks.segment.segment`, and as a task.

Intensity thresholds (multi-Otsu) give classes 1..3 slice by slice, with progress and cancel checks,
so Slicer-side logic and the worker can be tested before, and independently of, trained models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
from deepmri.errors import InvalidImageError
from deepmri.progress import check_cancel, no_progress
from deepmri.results import SegmentationResult
from deepmri.tasks.base import (
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    RunContext,
    Task,
    TaskResult,
    slug,
)

LABELS = [
    {"value": 1, "name": "Dark", "color": [0.1, 0.2, 0.8], "terminology": None},
    {
        "value": 2,
        "name": "Middle",
        "color": [0.5, 0.5, 0.5],
        "terminology": {
            "category": ["SCT", "85756007", "Tissue"],
            "type": ["SCT", "389082009", "Grey matter"],
        },
    },
    {"value": 3, "name": "Bright", "color": [0.95, 0.9, 0.7], "terminology": None},
]


def threshold_segment(
    image: sitk.Image,
    model: str = "threshold",
    *,
    device: str | None = None,
    probabilities: bool = False,
    uncertainty: bool = False,
    progress=None,
    cancel=None,
    store=None,
) -> SegmentationResult:
    """Classes 1..3 above the background by thresholds at the 25/50/75th percentiles of foreground."""
    progress = progress or no_progress
    if image.GetDimension() != 3:
        raise InvalidImageError(f"The input is {image.GetDimension()}D; this needs a 3D volume.")
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    foreground = values > values.min()
    if not foreground.any():
        raise InvalidImageError("The input is constant; there is nothing to segment.")
    limits = np.percentile(values[foreground], [25, 50, 75])
    labels = np.zeros(values.shape, dtype=np.uint8)
    for k in range(values.shape[0]):
        check_cancel(cancel)
        plane = values[k]
        labels[k] = np.where(foreground[k], np.digitize(plane, limits[1:]) + 1, 0)
        progress((k + 1) / values.shape[0], f"Thresholding slice {k + 1}")
    result = SegmentationResult(_like(labels, image), LABELS, model, provenance={"model": model})
    if probabilities:
        # Soft class memberships from the distance to each class's threshold band.
        width = max(float(limits[2] - limits[0]), 1e-6) / 2
        centres = [limits[0], limits[1], limits[2]]
        weights = np.stack([np.exp(-(((values - c) / width) ** 2)) for c in centres])
        weights = weights * foreground / np.clip(weights.sum(axis=0), 1e-6, None)
        result.probabilities = {
            label["name"]: _like(weights[i].astype(np.float32), image)
            for i, label in enumerate(LABELS)
        }
    if uncertainty:
        distance = np.min([np.abs(values - limit) for limit in limits[1:]], axis=0)
        result.uncertainty = _like(np.exp(-distance / 10.0).astype(np.float32) * foreground, image)
    return result


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def failing_segment(image: sitk.Image, model: str = "x", **kwargs: Any) -> SegmentationResult:
    """Fails the way a real model does on unusable input: halfway through, with a DeepMRIError."""
    progress = kwargs.get("progress") or no_progress
    progress(0.5, "Halfway")
    raise InvalidImageError("No brain was found in the input; is this a brain MRI?")


class ThresholdSegmentTask(Task):
    """`threshold_segment` as a task with the segmentation task's declarations and result keys."""

    name = "test-threshold"
    title = "Threshold segmentation (test)"
    help = "three intensity classes by percentiles of the foreground"
    inputs = (InputSpec("image", Kind.VOLUME, "a 3D volume"),)
    options = (
        OptionSpec("model", str, "threshold", "a name recorded as the model id"),
        OptionSpec("fail", bool, False, "fail halfway, as a model does on unusable input"),
    )
    outputs = (
        OutputSpec("labels", Kind.LABELS, "classes 1..3"),
        OutputSpec("probability", Kind.VOLUME, "per class", optional=True, many=True),
        OutputSpec("uncertainty", Kind.VOLUME, "near a threshold", optional=True),
    )

    def run(self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext):
        function = failing_segment if options["fail"] else threshold_segment
        result = function(
            inputs["image"],
            options["model"],
            probabilities=context.wants("probability"),
            uncertainty=context.wants("uncertainty"),
            progress=context.progress,
            cancel=context.cancel,
        )
        images = {"labels": result.labels}
        for name, probability in (result.probabilities or {}).items():
            images[f"probability-{slug(name)}"] = probability
        if result.uncertainty is not None:
            images["uncertainty"] = result.uncertainty
        info = {
            "label_info": result.label_info,
            "model_id": result.model_id,
            "provenance": result.provenance,
        }
        measures = {f"{name} (mL)": round(ml, 2) for name, ml in result.volumes_ml().items()}
        return TaskResult(self.name, images=images, measures=measures, info=info)
