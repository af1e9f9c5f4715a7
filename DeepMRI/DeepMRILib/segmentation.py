"""Segmentation from Slicer: volume node (and optional ROI) in, new segmentation and volume nodes out.

The same logic runs in the Python console (synchronous `run`) and behind the module's Apply button
(`start` in a background process, then `finish`); the input node is only read, never changed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from deepmri.errors import DeepMRIError
from deepmri.progress import (
    CancelLike,
    ProgressCallback,
    check_cancel,
    no_progress,
    sub_progress,
)
from deepmri.results import SegmentationResult

from DeepMRILib import jobs, mrml

DEFAULT_MODEL = "brain-tissue"
PROVENANCE_ATTRIBUTE = "DeepMRI.provenance"
MODEL_ATTRIBUTE = "DeepMRI.model"


class ROIError(DeepMRIError):
    """The region of interest does not overlap the input volume."""


@dataclass(frozen=True)
class CropBox:
    """A box of voxels of the input, [start, stop) per axis in (i, j, k) order."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def slices(self) -> tuple[slice, slice, slice]:
        """Numpy slices of a (k, j, i) array."""
        return tuple(slice(a, b) for a, b in zip(self.start[::-1], self.stop[::-1], strict=True))


@dataclass
class SegmentationOutputs:
    """The nodes a run added to the scene, and the result (on the full input grid) they hold."""

    segmentation: Any
    labelmap: Any | None = None
    probabilities: dict[str, Any] = field(default_factory=dict)
    uncertainty: Any | None = None
    result: Any = None

    @property
    def nodes(self) -> list[Any]:
        """Every node added, segmentation first."""
        added = [self.segmentation, self.labelmap, *self.probabilities.values(), self.uncertainty]
        return [node for node in added if node is not None]


def _default_segment_function() -> Callable[..., Any]:
    # Imported on first use: it loads torch, which the Slicer GUI should not pay for at start-up.
    from deepmri.tasks.segment import segment

    return segment


def crop_box_from_roi(image: sitk.Image, roi_node: Any, volume_node: Any | None = None) -> CropBox:
    """The voxels of `image` inside a markups ROI (its bounding box in voxel space).

    The ROI's corners go to world RAS, into the volume's own frame (undoing the volume's parent
    transform, if any), to LPS and to voxel indices; the box is rounded outwards and clipped.
    """
    bounds = [0.0] * 6
    roi_node.GetObjectBounds(bounds)
    object_to_node = slicer.util.arrayFromVTKMatrix(roi_node.GetObjectToNodeMatrix())
    corners_world = []
    for x in bounds[0:2]:
        for y in bounds[2:4]:
            for z in bounds[4:6]:
                # Box frame -> ROI node frame (its orientation and centre) -> world (parents).
                in_node = (object_to_node @ [x, y, z, 1.0])[:3]
                world = [0.0, 0.0, 0.0]
                roi_node.TransformPointToWorld(list(in_node), world)
                corners_world.append(world)
    parent = volume_node.GetParentTransformNode() if volume_node is not None else None
    if parent is not None:
        world_to_local = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, world_to_local)
        corners_world = [world_to_local.TransformPoint(corner) for corner in corners_world]
    indices = np.array(
        [
            image.TransformPhysicalPointToContinuousIndex(
                tuple(float(v) for v in mrml.LPS_TO_RAS @ np.asarray(corner))
            )
            for corner in corners_world
        ]
    )
    size = np.array(image.GetSize())
    start = np.clip(np.floor(indices.min(axis=0) + 0.5).astype(int), 0, size)
    stop = np.clip(np.floor(indices.max(axis=0) + 0.5).astype(int) + 1, 0, size)
    if np.any(stop <= start):
        raise ROIError(
            f"The region of interest '{roi_node.GetName()}' does not overlap the input volume; "
            "move it over the anatomy to segment."
        )
    return CropBox(tuple(int(v) for v in start), tuple(int(v) for v in stop))


def crop(image: sitk.Image, box: CropBox) -> sitk.Image:
    """The sub-image in `box`, with its origin moved so it stays in place in physical space."""
    (i0, j0, k0), (i1, j1, k1) = box.start, box.stop
    return image[i0:i1, j0:j1, k0:k1]


def paste(part: sitk.Image, full_grid: sitk.Image, box: CropBox, pixel_type: int) -> sitk.Image:
    """`part` placed back at `box` in a zero image on `full_grid`'s grid."""
    array = np.zeros(full_grid.GetSize()[::-1], dtype=sitk.GetArrayViewFromImage(part).dtype)
    array[box.slices()] = sitk.GetArrayViewFromImage(part)
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel_type)
    image.CopyInformation(full_grid)
    return image


def to_full_grid(result: Any, full_grid: sitk.Image, box: CropBox | None) -> Any:
    """The result as it would be on the whole input: outside the ROI, background and zeros."""
    if box is None:
        return result

    def back(image: sitk.Image | None) -> sitk.Image | None:
        return None if image is None else paste(image, full_grid, box, image.GetPixelID())

    probabilities = None
    if result.probabilities:
        probabilities = {name: back(image) for name, image in result.probabilities.items()}
    return dataclasses.replace(
        result,
        labels=back(result.labels),
        probabilities=probabilities,
        uncertainty=back(result.uncertainty),
        provenance={**dict(result.provenance or {}), "crop_box": [box.start, box.stop]},
    )


class SegmentationLogic:
    """Segment a volume node with a DeepMRI model and add the results as new nodes.

    Examples:
        >>> logic = SegmentationLogic()  # doctest: +SKIP
        >>> outputs = logic.run(slicer.util.getNode("MRHead"), "brain-tissue")  # doctest: +SKIP
        >>> outputs.segmentation.GetName()  # doctest: +SKIP
        'MRHead segmentation (brain tissue)'
    """

    def __init__(
        self,
        scene: Any | None = None,
        segment_function: Callable[..., Any] | None = None,
        worker_function: str | None = None,
        worker_environment: dict[str, str] | None = None,
    ) -> None:
        """`scene` defaults to `slicer.mrmlScene`; `segment_function` to
        `deepmri.tasks.segment.segment` (same signature). `worker_function` ("module:name") and
        `worker_environment` choose what the background worker runs, for plug-ins and tests.
        """
        self._scene = scene
        self._segment_function = segment_function
        self._worker_function = worker_function
        self._worker_environment = worker_environment

    @property
    def scene(self) -> Any:
        return self._scene if self._scene is not None else slicer.mrmlScene

    def prepare(
        self, input_node: Any, roi_node: Any | None = None
    ) -> tuple[sitk.Image, sitk.Image, CropBox | None]:
        """(whole input image, the part to segment, crop box or None) read from the nodes."""
        full = mrml.image_from_volume_node(input_node)
        if roi_node is None:
            return full, full, None
        box = crop_box_from_roi(full, roi_node, input_node)
        return full, crop(full, box), box

    def run(
        self,
        input_node: Any,
        model: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        roi_node: Any | None = None,
        probabilities: bool = False,
        uncertainty: bool = False,
        labelmap: bool = False,
        progress: ProgressCallback | None = None,
        cancel: CancelLike | None = None,
    ) -> SegmentationOutputs:
        """Segment in this process (blocks until done) and add the output nodes.

        On an error or a cancel nothing is added to the scene.
        """
        progress = progress or no_progress
        full, part, box = self.prepare(input_node, roi_node)
        segment = self._segment_function or _default_segment_function()
        result = segment(
            part,
            model,
            device=device,
            probabilities=probabilities,
            uncertainty=uncertainty,
            progress=sub_progress(progress, 0.0, 0.95),
            cancel=cancel,
        )
        check_cancel(cancel)
        progress(0.96, "Adding the results to the scene")
        outputs = self.add_nodes(input_node, to_full_grid(result, full, box), labelmap=labelmap)
        progress(1.0, "Segmentation finished")
        return outputs

    def start(
        self,
        input_node: Any,
        model: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        roi_node: Any | None = None,
        probabilities: bool = False,
        uncertainty: bool = False,
        labelmap: bool = False,
    ) -> SegmentationJob:
        """Start segmenting in a background process; poll the job, then call `job.finish()`."""
        full, part, box = self.prepare(input_node, roi_node)
        options: dict[str, Any] = {
            "model": model,
            "device": device,
            "probabilities": probabilities,
            "uncertainty": uncertainty,
        }
        if self._worker_function:
            options["function"] = self._worker_function
        job = jobs.start_job(
            "segment", {"image": part}, options, environment=self._worker_environment
        )
        return SegmentationJob(self, job, input_node, full, box, labelmap)

    def add_nodes(
        self, input_node: Any, result: Any, *, labelmap: bool = False
    ) -> SegmentationOutputs:
        """Add the nodes for a result on the input's grid; all or nothing."""
        scene = self.scene
        model_id = result.model_id
        added: list[Any] = []
        try:
            segmentation = mrml.segmentation_node_from_labels(
                result.labels,
                result.label_info,
                scene,
                mrml.output_name(input_node, "segmentation", model_id),
                reference_node=input_node,
            )
            added.append(segmentation)
            segmentation.SetAttribute(MODEL_ATTRIBUTE, model_id)
            segmentation.SetAttribute(
                PROVENANCE_ATTRIBUTE, json.dumps(result.provenance or {}, default=str)
            )
            outputs = SegmentationOutputs(segmentation=segmentation, result=result)
            if labelmap:
                outputs.labelmap = mrml.labelmap_node_from_image(
                    result.labels,
                    scene,
                    mrml.output_name(input_node, "labels", model_id),
                    input_node,
                )
                added.append(outputs.labelmap)
            for name, image in (result.probabilities or {}).items():
                node = mrml.volume_node_from_image(
                    image,
                    scene,
                    mrml.output_name(input_node, f"{name} probability", model_id),
                    reference_node=input_node,
                )
                added.append(node)
                outputs.probabilities[name] = node
            if result.uncertainty is not None:
                outputs.uncertainty = mrml.volume_node_from_image(
                    result.uncertainty,
                    scene,
                    mrml.output_name(input_node, "uncertainty", model_id),
                    reference_node=input_node,
                )
                added.append(outputs.uncertainty)
        except Exception:
            mrml.remove_nodes(scene, added)
            raise
        return outputs


class SegmentationJob:
    """A segmentation running in the background; the widget polls it and then calls `finish()`."""

    def __init__(
        self,
        logic: SegmentationLogic,
        job: jobs.Job,
        input_node: Any,
        full_grid: sitk.Image,
        box: CropBox | None,
        labelmap: bool,
    ) -> None:
        self.job = job
        self._logic = logic
        self._input_node = input_node
        self._full_grid = full_grid
        self._box = box
        self._labelmap = labelmap

    def poll(self) -> list[jobs.ProgressEvent]:
        """New progress events (fraction, message); never blocks."""
        return self.job.poll()

    @property
    def done(self) -> bool:
        """True once the worker has ended (then call `finish()`)."""
        return self.job.done

    @property
    def state(self) -> str:
        """running, succeeded, failed or cancelled."""
        return self.job.state

    @property
    def fraction(self) -> float:
        """The latest progress fraction reported."""
        return self.job.fraction

    @property
    def message(self) -> str:
        """The latest progress message (or the error message once failed)."""
        return self.job.message

    def cancel(self) -> None:
        """Stop the worker promptly; nothing is added to the scene."""
        self.job.cancel()

    def finish(self) -> SegmentationOutputs:
        """Wait for the worker, then add the output nodes (raises the worker's error, or Cancelled)."""
        job_result = self.job.result()
        info = job_result.info
        names = info.get("probability_names", {})
        probabilities = {
            names[key]: image
            for key, image in job_result.outputs.items()
            if key.startswith("probability_")
        }
        result = SegmentationResult(
            labels=job_result.outputs["labels"],
            label_info=info["label_info"],
            model_id=info["model_id"],
            probabilities=probabilities or None,
            uncertainty=job_result.outputs.get("uncertainty"),
            provenance=info.get("provenance", {}),
        )
        full_result = to_full_grid(result, self._full_grid, self._box)
        return self._logic.add_nodes(self._input_node, full_result, labelmap=self._labelmap)
