"""Any registered DeepMRI task from Slicer: nodes in by the task's declared kinds, new nodes out.

`TaskLogic(task_name)` knows no task: it reads each declared input from its node (a volume, a
segmentation or labelmap, a linear or grid transform), runs the task in this process (`run`, for
the console) or in a background worker (`start`, for the panels), and adds every output as a new
node by its kind, all or nothing. An optional markups ROI limits the work to a box of the input.

Examples (Slicer's Python console):
    >>> logic = TaskLogic("segment")  # doctest: +SKIP
    >>> outputs = logic.run(slicer.util.getNode("MRHead"), model="brain-tissue")  # doctest: +SKIP
    >>> outputs.segmentation.GetName()  # doctest: +SKIP
    'MRHead segmentation (brain tissue)'
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
from deepmri import roi as core_roi
from deepmri.errors import DeepMRIError
from deepmri.progress import (
    CancelLike,
    ProgressCallback,
    check_cancel,
    no_progress,
    sub_progress,
)
from deepmri.runconfig import RunConfig
from deepmri.tasks import BUILTIN_TASKS, Kind, OutputSpec, RunContext, Task, TaskResult, get_task
from deepmri.tasks.base import slug

from DeepMRILib import jobs, mrml, roi

TASK_ATTRIBUTE = "DeepMRI.task"
OUTPUT_ATTRIBUTE = "DeepMRI.output"
MODEL_ATTRIBUTE = "DeepMRI.model"
PROVENANCE_ATTRIBUTE = "DeepMRI.provenance"


@dataclass
class TaskOutputs:
    """The nodes one run added (result key -> node, in the task's output order) and its result.

    `labelmaps` holds the labelmap nodes made on request next to the segmentations; `result` is
    the task's `TaskResult` on the full input grid (pasted back from an ROI, if one was used).
    """

    result: TaskResult
    nodes: dict[str, Any] = field(default_factory=dict)
    labelmaps: dict[str, Any] = field(default_factory=dict)
    reference_node: Any = None

    @property
    def all_nodes(self) -> list[Any]:
        return [*self.nodes.values(), *self.labelmaps.values()]

    @property
    def segmentation(self) -> Any | None:
        """The first segmentation node added (the main output of a segmentation task)."""
        return next((n for n in self.nodes.values() if n.IsA("vtkMRMLSegmentationNode")), None)

    def nodes_of(self, output: str) -> dict[str, Any]:
        """Nodes of one declared output: {"probability-csf": node, ...} for a `many` output."""
        return {k: n for k, n in self.nodes.items() if k == output or k.startswith(output + "-")}

    def summary(self) -> str:
        """The result's measures as one line ("CSF 312 mL, Grey matter 702 mL"), for a status.

        A unit in brackets at the end of a measure's name ("CSF (mL)") goes after its value.
        """
        measures = dict(self.result.measures)
        if not measures:
            measures = {f"{name} (mL)": ml for name, ml in label_volumes_ml(self.result).items()}
        parts = []
        for name, value in measures.items():
            unit = re.fullmatch(r"(.*) \((.+)\)", name)
            name, unit = (unit.group(1), " " + unit.group(2)) if unit else (name, "")
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            parts.append(f"{name} {shown}{unit}")
        return ", ".join(parts)


def label_volumes_ml(result: TaskResult, key: str = "labels") -> dict[str, float]:
    """Volume of each labelled structure of `result.images[key]`, in millilitres."""
    labels = result.images.get(key)
    if labels is None:
        return {}
    array = sitk.GetArrayViewFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {
        str(info["name"]): float((array == int(info["value"])).sum()) * voxel_ml
        for info in _label_info(result, key)
    }


def _label_info(result: TaskResult, key: str) -> list[dict[str, Any]]:
    """The label list of one LABELS output: info["label_info"] as a list, or a dict by key."""
    info = result.info.get("label_info") or []
    if isinstance(info, Mapping):
        info = info.get(key, [])
    return list(info)


@dataclass
class _Crop:
    """What an ROI did to the inputs, so the outputs can be put back on the full grid."""

    box: core_roi.CropBox
    full_grid: sitk.Image
    cropped_grid: sitk.Image

    def paste_back(self, result: TaskResult) -> TaskResult:
        return core_roi.paste_result(result, self.full_grid, self.box, self.cropped_grid)


class TaskLogic:
    """Run one registered task on MRML nodes and add its outputs to the scene as new nodes.

    `scene` defaults to `slicer.mrmlScene`. `store` (a `deepmri.models.ModelStore`, or one
    made from `core_settings` at the first run) is where in-process runs find models;
    `worker_environment` is added to a background worker's environment (extra model folders,
    a PYTHONPATH for plug-in tasks); `config` is the `RunConfig` of runs that are given none.
    """

    output_names: Mapping[str, str] = {}
    label_grids: Mapping[str, str] = {}
    not_in_scene: tuple[str, ...] = ()

    def __init__(
        self,
        task_name: str,
        scene: Any | None = None,
        *,
        store: Any = None,
        worker_environment: Mapping[str, str] | None = None,
    ) -> None:
        self.task_name = task_name
        self._scene = scene
        self.store = store
        self.worker_environment = dict(worker_environment or {})
        self.config: RunConfig | None = None
        self.core_settings: Any = None  # deepmri.settings.Settings for a store made on first use

    @property
    def scene(self) -> Any:
        return self._scene if self._scene is not None else slicer.mrmlScene

    @property
    def task(self) -> Task:
        return get_task(self.task_name)

    def model_store(self) -> Any:
        """The store in-process runs use: `store`, else one from `core_settings` (made here, on
        first use, as it loads torch), else None (the task's default store)."""
        if self.store is None and self.core_settings is not None:
            from deepmri.models import ModelStore

            self.store = ModelStore(settings=self.core_settings)
        return self.store

    def default_config(self) -> RunConfig:
        """The run configuration when a run is given none: `self.config` (the Slicer modules set
        it from the saved settings, `SavedSettings.apply_to`), else auto device and precision."""
        return self.config or RunConfig()

    # --- running ----------------------------------------------------------------------------

    def run(
        self,
        inputs: Any,
        options: Mapping[str, Any] | None = None,
        *,
        wanted: Iterable[str] = (),
        config: RunConfig | None = None,
        roi_node: Any | None = None,
        labelmap: bool = False,
        show: bool = False,
        leave_out: Iterable[str] = (),
        progress: ProgressCallback | None = None,
        cancel: CancelLike | None = None,
        **more_options: Any,
    ) -> TaskOutputs:
        """Run the task in this process (blocks until done) and add its outputs as new nodes.

        `inputs` is {input name: node} or, for a task with one required input, the node itself;
        options come as a dict and/or keywords (`model="brain-tissue"`). `wanted` names optional
        outputs ("probability", "uncertainty"); `leave_out` names outputs not to add as nodes (a
        displacement field the transform node already holds). On an error or a cancel nothing is
        added.
        """
        progress = progress or no_progress
        nodes, options, wanted = self._checked(inputs, options, more_options, wanted)
        images, crop = self.read_inputs(nodes, roi_node)
        context = RunContext(
            config=config or self.default_config(),
            progress=sub_progress(progress, 0.0, 0.95),
            cancel=cancel,
            wanted=wanted,
            store=self.model_store(),
        )
        result = self.task(images, options, context)
        check_cancel(cancel)
        progress(0.96, "Adding the results to the scene")
        outputs = self._add(nodes, result, crop, labelmap, leave_out)
        if show:
            self.show(outputs)
        progress(1.0, f"{self.task.title or self.task.name} finished")
        return outputs

    def start(
        self,
        inputs: Any,
        options: Mapping[str, Any] | None = None,
        *,
        wanted: Iterable[str] = (),
        config: RunConfig | None = None,
        roi_node: Any | None = None,
        labelmap: bool = False,
        show: bool = False,
        leave_out: Iterable[str] = (),
        **more_options: Any,
    ) -> jobs.WorkerJob:
        """Start the task in a background worker; poll the job, then `job.result()` adds the nodes.

        Inputs and options are checked here, before the worker starts, as `run` checks them.
        """
        nodes, options, wanted = self._checked(inputs, options, more_options, wanted)
        images, crop = self.read_inputs(nodes, roi_node)

        def add_nodes(result: TaskResult) -> TaskOutputs:
            outputs = self._add(nodes, result, crop, labelmap, leave_out)
            if show:
                self.show(outputs)
            return outputs

        return jobs.start_job(
            _worker_task_name(self.task),
            images,
            _json_ready(options),
            config=config or self.default_config(),
            wanted=wanted,
            then=add_nodes,
            environment=self.worker_environment,
        )

    def _checked(
        self,
        inputs: Any,
        options: Mapping[str, Any] | None,
        more_options: Mapping[str, Any],
        wanted: Iterable[str],
    ) -> tuple[dict[str, Any], dict[str, Any], frozenset[str]]:
        """Inputs by name, options given (checked and typed) and wanted outputs, or a TaskError."""
        task = self.task
        if not isinstance(inputs, Mapping):
            required = [spec.name for spec in task.inputs if not spec.optional]
            if len(required) != 1:
                raise DeepMRIError(
                    f"Task '{task.name}' takes the inputs {', '.join(required)}: "
                    "give them as a dict {name: node}."
                )
            inputs = {required[0]: inputs}
        nodes = task.check_inputs(inputs)
        given = {**dict(options or {}), **more_options}
        resolved = task.resolve_options(given)
        wanted = frozenset(wanted)
        task.check_wanted(wanted)
        return nodes, {name: resolved[name] for name in given}, wanted

    # --- nodes in ---------------------------------------------------------------------------

    def read_inputs(
        self, nodes: Mapping[str, Any], roi_node: Any | None = None
    ) -> tuple[dict[str, Any], _Crop | None]:
        """Images and transforms for the task's inputs, read from their nodes by declared kind.

        SimpleITK images and transforms given instead of nodes are passed on as they are. With
        `roi_node`, image inputs on the reference volume's grid are cropped to the ROI's box.
        """
        specs = {spec.name: spec for spec in self.task.inputs}
        reference = _reference_node(nodes, specs)
        values = {
            name: self._read(
                node, specs[name].kind, nodes.get(self.label_grids.get(name), reference)
            )
            for name, node in nodes.items()
        }
        if roi_node is None:
            return values, None
        full = next((values[n] for n, node in nodes.items() if node is reference), None)
        if not isinstance(full, sitk.Image):
            raise roi.ROIError("A region of interest needs a volume node as the first input.")
        box = roi.crop_box_from_roi(full, roi_node, reference)
        cropped = core_roi.crop(full, box)
        for name, value in values.items():
            if isinstance(value, sitk.Image) and core_roi.same_grid(value, full):
                values[name] = core_roi.crop(value, box)
        return values, _Crop(box, full, cropped)

    @staticmethod
    def _read(node: Any, kind: Kind, reference: Any) -> Any:
        if isinstance(node, (sitk.Image, sitk.Transform)):
            return node
        if kind is Kind.TRANSFORM:
            return mrml.transform_from_node(node)
        if kind is Kind.LABELS and node is not None and node.IsA("vtkMRMLSegmentationNode"):
            if reference is None or reference is node:
                raise mrml.MRMLConversionError(
                    f"The segmentation '{node.GetName()}' needs a volume input to give its grid."
                )
            return mrml.labels_from_segmentation_node(node, reference)
        if kind is Kind.LABELS and node is not None and node.IsA("vtkMRMLLabelMapVolumeNode"):
            return mrml.image_from_volume_node(node)
        if kind is Kind.KSPACE:
            raise mrml.MRMLConversionError("k-space inputs are read from files, not from nodes.")
        return mrml.image_from_volume_node(node)

    # --- nodes out --------------------------------------------------------------------------

    def _add(
        self,
        nodes: Mapping[str, Any],
        result: TaskResult,
        crop: _Crop | None,
        labelmap: bool,
        leave_out: Iterable[str] = (),
    ) -> TaskOutputs:
        if crop is not None:
            result = crop.paste_back(result)
        specs = {spec.name: spec for spec in self.task.inputs}
        if "label_info" not in result.info:  # labels carried through keep their names, colours
            carried = [_segment_info(node) for node in nodes.values() if _is_segmentation(node)]
            if carried:
                result.info["label_info"] = carried[0]
        names = {name: node.GetName() for name, node in nodes.items() if hasattr(node, "GetName")}
        return self.add_outputs(
            result,
            _reference_node(nodes, specs),
            labelmap=labelmap,
            leave_out=leave_out,
            input_names=names,
        )

    def add_outputs(
        self,
        result: TaskResult,
        reference_node: Any | None,
        *,
        labelmap: bool = False,
        leave_out: Iterable[str] = (),
        input_names: Mapping[str, str] | None = None,
    ) -> TaskOutputs:
        """Add a node for every output of `result` but those in `leave_out`, next to
        `reference_node`; all or nothing. `input_names` (input -> node name) fill in the
        `output_names` templates."""
        outputs = TaskOutputs(result, reference_node=reference_node)
        leave_out = {*leave_out, *self.not_in_scene}
        reference_image = None
        if reference_node is not None and reference_node.IsA("vtkMRMLScalarVolumeNode"):
            reference_image = mrml.image_from_volume_node(reference_node)
        try:
            for spec in self.task.outputs:
                if spec.name in leave_out:
                    continue
                for key, value in _in_label_order(result, spec):
                    name = self.output_title(result, spec, key, reference_node, input_names)
                    node = self._write(
                        value, spec, key, name, result, reference_node, reference_image
                    )
                    outputs.nodes[key] = node
                    self._tag(node, result, key)
                    if labelmap and spec.kind is Kind.LABELS:
                        labels_name = name.replace(" segmentation", " labels", 1)
                        outputs.labelmaps[key] = mrml.labelmap_node_from_image(
                            value, self.scene, labels_name, reference_node
                        )
                        self._tag(outputs.labelmaps[key], result, key)
        except Exception:
            mrml.remove_nodes(self.scene, outputs.all_nodes)
            raise
        return outputs

    def _write(
        self,
        value: Any,
        spec: OutputSpec,
        key: str,
        name: str,
        result: TaskResult,
        reference_node: Any,
        reference_image: sitk.Image | None,
    ) -> Any:
        scene = self.scene
        if spec.kind is Kind.LABELS:
            return mrml.segmentation_node_from_labels(
                value, _label_info(result, key), scene, name, reference_node=reference_node
            )
        if spec.kind is Kind.TRANSFORM:
            return mrml.transform_node_from_transform(
                value, scene, name, reference_image=reference_image, reference_node=reference_node
            )
        if value.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
            value = sitk.ComplexToModulus(value)
        return mrml.volume_node_from_image(value, scene, name, reference_node=reference_node)

    def _tag(self, node: Any, result: TaskResult, key: str) -> None:
        if key == self.task.outputs[0].name and result.info.get("description"):
            node.SetDescription(str(result.info["description"]))  # "SYNTHETIC T2w: ..."
        node.SetAttribute(TASK_ATTRIBUTE, self.task_name)
        node.SetAttribute(OUTPUT_ATTRIBUTE, key)
        if result.info.get("model_id"):
            node.SetAttribute(MODEL_ATTRIBUTE, str(result.info["model_id"]))
        provenance = {k: v for k, v in result.info.items() if k != "label_info"}
        node.SetAttribute(PROVENANCE_ATTRIBUTE, json.dumps(provenance, default=str))

    def output_title(
        self,
        result: TaskResult,
        spec: OutputSpec,
        key: str,
        reference_node: Any,
        input_names: Mapping[str, str] | None = None,
    ) -> str:
        """A node name from the input and the output: "MRHead segmentation (brain tissue)",
        "MRHead Grey matter probability (brain tissue)"; a task's own `info["name_suffix"]`
        names its main (first) output: "T1 -> T2w (synthetic)"; `output_names` come first."""
        template = self.output_names.get(key)
        if template is not None:
            return template.format_map(_Default(input_names or {}, reference_node))
        if spec is self.task.outputs[0] and result.info.get("name_suffix"):
            base = reference_node.GetName() if reference_node is not None else "DeepMRI"
            return f"{base}{result.info['name_suffix']}"
        if spec.many:
            part = key[len(spec.name) + 1 :]
            names = {slug(str(i["name"])): str(i["name"]) for i in _label_info(result, "labels")}
            what = f"{names.get(part, part.replace('-', ' '))} {spec.name}"
        elif spec.kind is Kind.LABELS:
            what = "segmentation" if spec.name == "labels" else f"{spec.name} segmentation"
        else:
            what = spec.name.replace("_", " ").replace("-", " ")
        return mrml.output_name(reference_node, what, result.info.get("model_id"))

    # --- showing ----------------------------------------------------------------------------

    def show(self, outputs: TaskOutputs) -> None:
        """Segmentations in 2D and 3D over the input; a new main volume (a synthetic image) as
        the slice views' background, else the input; optional maps are left for the user. The
        slice views and the 3D view are centred on what was segmented (the first segmentation's
        extent), else on the background volume, so the result is in view without searching."""
        background = outputs.reference_node
        optional = {spec.name for spec in self.task.outputs if spec.optional}
        for key, node in outputs.nodes.items():
            if node.IsA("vtkMRMLSegmentationNode"):
                node.CreateClosedSurfaceRepresentation()
                display = node.GetDisplayNode()
                if display is not None:
                    display.SetVisibility(True)
                    display.SetVisibility2DFill(True)
                    display.SetVisibility2DOutline(True)
            elif (
                node.IsA("vtkMRMLScalarVolumeNode")
                and self.task.output_spec(key).name not in optional
                and background is outputs.reference_node
            ):
                background = node  # the first main volume (a warped image before its Jacobian)
        if background is not None and background.IsA("vtkMRMLVolumeNode"):
            for composite in _nodes_of_class(self.scene, "vtkMRMLSliceCompositeNode"):
                composite.SetBackgroundVolumeID(background.GetID())
        centre = _segmented_centre(outputs.result, self.task) or _node_centre(background)
        if centre is not None:
            centre_views(self.scene, centre)


def centre_views(scene: Any, centre_ras: Sequence[float]) -> None:
    """Every slice view through `centre_ras` with it in the middle, every 3D camera moved (not
    turned) to look at it: MRML only, so the desktop's views follow and headless scenes too."""
    for slice_node in _nodes_of_class(scene, "vtkMRMLSliceNode"):
        slice_node.JumpSliceByCentering(*centre_ras)
    for camera in _nodes_of_class(scene, "vtkMRMLCameraNode"):
        shift = np.subtract(centre_ras, camera.GetFocalPoint())
        camera.SetPosition(*(np.add(camera.GetPosition(), shift)))
        camera.SetFocalPoint(*centre_ras)


def _segmented_centre(result: TaskResult, task: Task) -> list[float] | None:
    """RAS centre of the extent of the first label output with any label, or None."""
    for spec in task.outputs:
        image = result.images.get(spec.name)
        if spec.kind is not Kind.LABELS or not isinstance(image, sitk.Image):
            continue
        indices = np.argwhere(sitk.GetArrayViewFromImage(image) > 0)
        if indices.size:
            middle = (indices.min(axis=0) + indices.max(axis=0)) / 2.0  # (k, j, i)
            lps = image.TransformContinuousIndexToPhysicalPoint(middle[::-1].tolist())
            return (mrml.LPS_TO_RAS @ np.asarray(lps)).tolist()
    return None


def _node_centre(node: Any | None) -> list[float] | None:
    """RAS centre of a volume node's bounds, or None."""
    if node is None or not node.IsA("vtkMRMLVolumeNode"):
        return None
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return [(bounds[2 * axis] + bounds[2 * axis + 1]) / 2 for axis in range(3)]


def show_overlay(scene: Any, volume: Any | None, show: bool = True) -> None:
    """A map (a probability 0..1, an uncertainty) half-transparent over the slice views, Iron
    colours over the map's whole range, near-zero values not drawn; with `show` False, a DeepMRI
    map shown there is taken away (others are kept)."""
    composites = _nodes_of_class(scene, "vtkMRMLSliceCompositeNode")
    if not show or volume is None:
        for composite in composites:
            shown = scene.GetNodeByID(composite.GetForegroundVolumeID() or "")
            if shown is not None and shown.GetAttribute(TASK_ATTRIBUTE):
                composite.SetForegroundVolumeID(None)
        return
    display = volume.GetDisplayNode()
    if display is not None:
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeIron")
        shown_range = overlay_range(volume.GetAttribute(OUTPUT_ATTRIBUTE) or "")
        if shown_range is not None:
            low, high = shown_range
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(low, high)
            # Near-zero voxels (most of the head) left transparent: the scan shows through and
            # only where the map says something is coloured.
            display.SetApplyThreshold(True)
            display.SetThreshold(low + 0.05 * (high - low), high)
    for composite in composites:
        composite.SetForegroundVolumeID(volume.GetID())
        composite.SetForegroundOpacity(0.5)


def overlay_range(output: str) -> tuple[float, float] | None:
    """The values a map can take, by its output name: a probability 0-1; the segment task's
    uncertainty, a probability's standard deviation, 0-0.5. None for other maps."""
    if output.startswith("probability"):
        return 0.0, 1.0
    if output == "uncertainty":
        return 0.0, 0.5
    return None


def _is_segmentation(node: Any) -> bool:
    return hasattr(node, "IsA") and node.IsA("vtkMRMLSegmentationNode")


def _segment_info(node: Any) -> list[dict[str, Any]]:
    """Name and colour of each segment by its label value, as a task's label_info lists them."""
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    return [
        {"value": s.GetLabelValue(), "name": s.GetName(), "color": list(s.GetColor())}
        for s in segments
    ]


class _Default(dict):
    """Input names for a name template; an input not given reads as the reference's name."""

    def __init__(self, names: Mapping[str, str], reference_node: Any) -> None:
        super().__init__(names)
        self.fallback = reference_node.GetName() if reference_node is not None else "DeepMRI"

    def __missing__(self, key: str) -> str:
        return self.fallback


def _reference_node(nodes: Mapping[str, Any], specs: Mapping[str, Any]) -> Any | None:
    """The node outputs go next to: the first volume input given, else the first input node."""
    candidates = [
        node for node in nodes.values() if not isinstance(node, (sitk.Image, sitk.Transform))
    ]
    for name, node in nodes.items():
        if specs[name].kind is Kind.VOLUME and node in candidates:
            return node
    return candidates[0] if candidates else None


def _in_label_order(result: TaskResult, spec: OutputSpec) -> list[tuple[str, Any]]:
    """A declared output's (key, value) pairs; a `many` family in the order of its labels
    (files read back come sorted by name)."""
    items = list(result.outputs_of(spec).items())
    if spec.many:
        order = [f"{spec.name}-{slug(str(i['name']))}" for i in _label_info(result, "labels")]
        items.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    return items


def _worker_task_name(task: Task) -> str:
    """How the worker finds the task: its name if built in, else "module:Class" to import."""
    if task.name in BUILTIN_TASKS:
        return task.name
    return f"{type(task).__module__}:{type(task).__qualname__}"


def _nodes_of_class(scene: Any, class_name: str) -> list[Any]:
    return [
        scene.GetNthNodeByClass(index, class_name)
        for index in range(scene.GetNumberOfNodesByClass(class_name))
    ]


def _json_ready(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as the request file holds them (tuples as lists)."""
    return {
        name: list(value) if isinstance(value, tuple) else value for name, value in options.items()
    }
