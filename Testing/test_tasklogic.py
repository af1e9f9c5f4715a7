"""The generic Slicer task logic on real slicer-core MRML, with a two-input task declared only here.

A task that knows nothing of Slicer (two volumes in; a difference volume, a transform, an optional
label map and a measure out) gets nodes in and nodes out, a background run with progress and
cancel, and an all-or-nothing scene, with no other file changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from deepmri.errors import Cancelled, InvalidImageError  # noqa: E402
from deepmri.progress import CancelToken, check_cancel  # noqa: E402
from deepmri.runconfig import RunConfig  # noqa: E402
from deepmri.tasks import (  # noqa: E402
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    RunContext,
    Task,
    TaskError,
    TaskResult,
    register_task,
    unregister_task,
)
from DeepMRILib import jobs, mrml, tasklogic  # noqa: E402
from mrml_helpers import fingerprint, mrml_scene, scene_state  # noqa: E402, F401 (fixture)

TESTING_DIR = str(Path(__file__).resolve().parent)
CHANGED = [{"value": 1, "name": "Changed", "color": [0.9, 0.2, 0.1], "terminology": None}]


class DifferenceTask(Task):
    """scale * (moving - fixed), slice by slice; the shift between their centres of mass."""

    name = "test-difference"
    title = "Difference (test)"
    help = "difference of two volumes on one grid"
    inputs = (
        InputSpec("fixed", Kind.VOLUME, "the reference volume"),
        InputSpec("moving", Kind.VOLUME, "the volume compared with it"),
    )
    options = (
        OptionSpec("scale", float, 1.0, "factor on the difference"),
        OptionSpec("passes", int, 1, "times the work is done (to make it last)"),
        OptionSpec("fail", bool, False, "fail halfway, as a model does on bad input"),
    )
    outputs = (
        OutputSpec("difference", Kind.VOLUME, "scale * (moving - fixed)"),
        OutputSpec("shift", Kind.TRANSFORM, "translation between the centres of mass"),
        OutputSpec("changed", Kind.LABELS, "voxels that changed", optional=True),
    )

    def run(self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext):
        fixed = sitk.GetArrayFromImage(inputs["fixed"]).astype(np.float32)
        moving = sitk.GetArrayFromImage(inputs["moving"]).astype(np.float32)
        difference = np.zeros_like(fixed)
        depth, passes = fixed.shape[0], options["passes"]
        for current in range(passes):
            for k in range(depth):
                check_cancel(context.cancel)
                difference[k] = options["scale"] * (moving[k] - fixed[k])
                context.progress((current * depth + k + 1) / (passes * depth), f"Slice {k + 1}")
                if options["fail"] and k == depth // 2:
                    raise InvalidImageError("The two volumes do not overlap; align them first.")
        images = {"difference": _like(difference, inputs["fixed"])}
        if context.wants("changed"):
            images["changed"] = _like((np.abs(difference) > 1).astype(np.uint8), inputs["fixed"])
        shift = sitk.TranslationTransform(3, _centre(inputs["moving"]) - _centre(inputs["fixed"]))
        return TaskResult(
            self.name,
            images=images,
            transforms={"shift": shift},
            measures={"mean difference": float(difference.mean())},
            info={"label_info": CHANGED, "config": context.config.to_dict()},
        )


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _centre(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image).astype(float)
    k, j, i = (np.indices(array.shape) * array).reshape(3, -1).sum(axis=1) / array.sum()
    return np.array(image.TransformContinuousIndexToPhysicalPoint((i, j, k)))


@pytest.fixture(autouse=True)
def difference_task():
    task = register_task(DifferenceTask, replace=True)
    yield task
    unregister_task(task.name)


def _blob(centre: tuple[float, float, float]) -> sitk.Image:
    k, j, i = np.meshgrid(*[np.arange(n, dtype=float) for n in (12, 18, 20)], indexing="ij")
    radius2 = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2
    image = sitk.GetImageFromArray((100 * np.exp(-radius2 / 20)).astype(np.float32))
    image.SetSpacing((1.2, 0.9, 2.0))
    image.SetOrigin((10.0, -20.0, 5.5))
    image.SetDirection(sitk.VersorTransform((0.2, 0.3, 0.9), 0.4).GetMatrix())
    return image


@pytest.fixture
def pair(scene):
    """Two volumes on one oblique grid, in a study folder of the subject hierarchy."""
    hierarchy = scene.GetSubjectHierarchyNode()
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Study")
    fixed = mrml.volume_node_from_image(_blob((9, 8, 5)), scene, "T1")
    moving = mrml.volume_node_from_image(_blob((11, 9, 6)), scene, "T1 follow-up")
    for node in (fixed, moving):
        hierarchy.CreateItem(study, node)
    return fixed, moving


def _check_outputs(outputs, fixed, moving, scale: float) -> None:
    fixed_image, moving_image = map(mrml.image_from_volume_node, (fixed, moving))
    difference = outputs.nodes["difference"]
    assert difference.GetName() == "T1 difference"
    image = mrml.image_from_volume_node(difference)
    expected = scale * (sitk.GetArrayFromImage(moving_image) - sitk.GetArrayFromImage(fixed_image))
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), fixed_image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), fixed_image.GetDirection(), atol=1e-9)
    shift = outputs.nodes["shift"]
    assert shift.IsA("vtkMRMLLinearTransformNode") and shift.GetName() == "T1 shift"
    expected_shift = _centre(moving_image) - _centre(fixed_image)
    np.testing.assert_allclose(
        mrml.affine_matrix_lps(mrml.transform_from_node(shift))[:3, 3], expected_shift, atol=1e-6
    )
    assert outputs.result.measures["mean difference"] == pytest.approx(expected.mean(), abs=1e-4)
    assert difference.GetAttribute(tasklogic.TASK_ATTRIBUTE) == "test-difference"
    hierarchy = fixed.GetScene().GetSubjectHierarchyNode()
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(fixed))
    for node in outputs.all_nodes:
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_a_two_input_task_writes_its_outputs_as_new_nodes_by_kind(scene, pair):
    fixed, moving = pair
    before = fingerprint(fixed), fingerprint(moving)
    logic = tasklogic.TaskLogic("test-difference", scene)
    reported = []
    outputs = logic.run(
        {"fixed": fixed, "moving": moving},
        scale=2.0,
        wanted=["changed"],
        labelmap=True,
        progress=lambda fraction, message: reported.append(fraction),
    )
    assert (fingerprint(fixed), fingerprint(moving)) == before
    _check_outputs(outputs, fixed, moving, 2.0)
    changed = outputs.nodes["changed"]
    assert changed.IsA("vtkMRMLSegmentationNode")
    assert changed.GetName() == "T1 changed segmentation"
    assert changed.GetSegmentation().GetNthSegment(0).GetName() == "Changed"
    assert outputs.labelmaps["changed"].GetName() == "T1 changed labels"
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(mrml.labels_from_segmentation_node(changed, fixed)),
        sitk.GetArrayFromImage(outputs.result.images["changed"]),
    )
    assert reported == sorted(reported) and reported[-1] == 1.0
    assert "mean difference" in outputs.summary()


def test_show_puts_the_input_in_the_slice_views_and_the_segmentation_in_3d(scene, pair):
    fixed, moving = pair
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    outputs = tasklogic.TaskLogic("test-difference", scene).run(
        {"fixed": fixed, "moving": moving}, wanted=["changed"], show=True
    )
    # The difference is the task's main volume output: it is what the views show.
    assert composite.GetBackgroundVolumeID() == outputs.nodes["difference"].GetID()
    segmentation = outputs.nodes["changed"].GetSegmentation()
    assert segmentation.ContainsRepresentation("Closed surface")


def test_options_and_outputs_are_checked_before_any_work(scene, pair):
    fixed, moving = pair
    before = scene_state(scene)
    logic = tasklogic.TaskLogic("test-difference", scene)
    with pytest.raises(TaskError, match="no option named colour"):
        logic.run({"fixed": fixed, "moving": moving}, colour="red")
    with pytest.raises(TaskError, match="no optional output named shape"):
        logic.start({"fixed": fixed, "moving": moving}, wanted=["shape"])
    with pytest.raises(TaskError, match="needs the input"):
        logic.run({"fixed": fixed})
    assert scene_state(scene) == before


def test_a_failing_task_leaves_the_scene_as_it_was(scene, pair):
    fixed, moving = pair
    before = scene_state(scene)
    with pytest.raises(InvalidImageError, match="do not overlap"):
        tasklogic.TaskLogic("test-difference", scene).run(
            {"fixed": fixed, "moving": moving}, fail=True
        )
    assert scene_state(scene) == before


def test_a_failure_while_adding_nodes_removes_those_already_added(scene, pair, monkeypatch):
    fixed, moving = pair
    hierarchy = scene.GetSubjectHierarchyNode()
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(fixed))
    before = scene_state(scene)

    def no_transforms(*args, **kwargs):
        raise mrml.MRMLConversionError("cannot add the transform")

    monkeypatch.setattr(mrml, "transform_node_from_transform", no_transforms)
    with pytest.raises(mrml.MRMLConversionError):
        tasklogic.TaskLogic("test-difference", scene).run(
            {"fixed": fixed, "moving": moving}, wanted=["changed"], labelmap=True
        )
    assert scene_state(scene) == before
    assert hierarchy.GetNumberOfItemChildren(study) == 2


def test_cancel_during_the_run_leaves_the_scene_as_it_was(scene, pair):
    fixed, moving = pair
    before = scene_state(scene)
    token = CancelToken()
    with pytest.raises(Cancelled):
        tasklogic.TaskLogic("test-difference", scene).run(
            {"fixed": fixed, "moving": moving},
            progress=lambda fraction, message: token.cancel(),
            cancel=token,
        )
    assert scene_state(scene) == before


def background_logic(scene) -> tasklogic.TaskLogic:
    # The worker imports this file by "test_tasklogic:DifferenceTask" from the Testing folder.
    return tasklogic.TaskLogic(
        "test-difference", scene, worker_environment={"PYTHONPATH": TESTING_DIR}
    )


def test_a_background_run_streams_progress_and_gives_the_same_nodes(scene, pair):
    fixed, moving = pair
    job = background_logic(scene).start(
        {"fixed": fixed, "moving": moving}, scale=2.0, wanted=["changed"]
    )
    events = []
    while not job.done:
        events.extend(job.poll())
        time.sleep(0.02)
    events.extend(job.poll())
    assert job.state == jobs.SUCCEEDED, job.error
    assert events and events[-1].fraction == 1.0
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions)
    outputs = job.result()
    _check_outputs(outputs, fixed, moving, 2.0)
    assert outputs.nodes["changed"].GetName() == "T1 changed segmentation"
    assert not job.folder.exists()


def test_cancelling_a_background_run_adds_nothing_and_removes_its_files(scene, pair):
    fixed, moving = pair
    before = scene_state(scene)
    job = background_logic(scene).start({"fixed": fixed, "moving": moving}, passes=100000)
    deadline = time.monotonic() + 120
    while not job.poll() and not job.done and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for real work, so the cancel hits it
    assert job.state == jobs.RUNNING
    job.cancel()
    assert job.state == jobs.CANCELLED and job.fraction < 0.5
    with pytest.raises(Cancelled):
        job.result()
    assert scene_state(scene) == before
    assert not job.folder.exists()


def test_a_background_failure_gives_the_tasks_message_and_adds_nothing(scene, pair):
    fixed, moving = pair
    before = scene_state(scene)
    job = background_logic(scene).start({"fixed": fixed, "moving": moving}, fail=True)
    with pytest.raises(jobs.JobError, match="do not overlap; align them first"):
        job.result()
    assert scene_state(scene) == before


def test_an_roi_crops_every_input_on_the_grid_and_pastes_the_outputs_back(scene, pair):
    fixed, moving = pair
    full = mrml.image_from_volume_node(fixed)
    low = np.array(full.TransformIndexToPhysicalPoint((4, 3, 2)))
    high = np.array(full.TransformIndexToPhysicalPoint((13, 12, 7)))
    axes = np.eye(4)
    axes[:3, :3] = mrml.LPS_TO_RAS @ np.asarray(full.GetDirection()).reshape(3, 3)
    axes[:3, 3] = mrml.LPS_TO_RAS @ ((low + high) / 2)
    roi_node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi_node.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(axes))
    roi_node.SetSize(*(np.array([9, 9, 5]) * np.array(full.GetSpacing())))
    outputs = tasklogic.TaskLogic("test-difference", scene).run(
        {"fixed": fixed, "moving": moving}, roi_node=roi_node
    )
    difference = sitk.GetArrayFromImage(mrml.image_from_volume_node(outputs.nodes["difference"]))
    inside = np.zeros(difference.shape, dtype=bool)
    inside[2:8, 3:13, 4:14] = True
    assert outputs.result.info["crop_box"] == [[4, 3, 2], [14, 13, 8]]
    expected = sitk.GetArrayFromImage(mrml.image_from_volume_node(moving)) - sitk.GetArrayFromImage(
        full
    )
    np.testing.assert_allclose(difference[inside], expected[inside], atol=1e-4)
    assert not difference[~inside].any()


class SavedChoices(dict):
    """Slicer's QSettings as far as DeepMRI uses it (value/setValue), in memory."""

    def value(self, key):
        return self.get(key)

    def setValue(self, key, value):
        self[key] = value


def test_the_precision_chosen_in_the_models_panel_reaches_the_task(scene, pair):
    from DeepMRILib.models import SavedSettings

    fixed, moving = pair
    settings = SavedChoices()
    # What the Models panel does when the user picks bf16 and 3 threads ...
    assert SavedSettings(device="cpu", precision="bf16", threads=3).save(settings)
    # ... and what the Segmentation panel and its console logic do before a run.
    logic = SavedSettings.load(settings).apply_to(background_logic(scene))
    outputs = logic.run({"fixed": fixed, "moving": moving})
    assert outputs.result.info["config"] == {"device": "cpu", "precision": "bf16", "threads": 3}
    # A configuration given to the run itself wins over the saved one.
    explicit = logic.run({"fixed": fixed, "moving": moving}, config=RunConfig(precision="fp32"))
    assert explicit.result.info["config"]["precision"] == "fp32"
    job = logic.start({"fixed": fixed, "moving": moving})
    assert json.loads((job.folder / "request.json").read_text())["config"]["precision"] == "bf16"
    assert job.result().result.info["config"]["precision"] == "bf16"
    # A device chosen in a module panel overrides the saved one; "auto" there does not.
    assert SavedSettings.load(settings).run_config(device="auto").device == "cpu"
    assert SavedSettings.load(settings).run_config(device="cuda").device == "cuda"


class InvertTask(Task):
    """A synthetic-contrast stand-in: the inverted input, labelled synthetic as a real task does."""

    name = "test-invert"
    inputs = (InputSpec("image", Kind.VOLUME, "a volume"),)
    outputs = (OutputSpec("synthetic", Kind.VOLUME, "the SYNTHETIC inverted contrast"),)

    def run(self, inputs, options, context):
        synthetic = sitk.InvertIntensity(inputs["image"], 100.0)
        info = {"name_suffix": " -> inverted (synthetic)", "description": "SYNTHETIC: computed."}
        return TaskResult(self.name, images={"synthetic": synthetic}, info=info)


def test_a_synthetic_output_is_named_and_described_as_the_task_says(scene, pair):
    fixed, _ = pair
    register_task(InvertTask, replace=True)
    try:
        outputs = tasklogic.TaskLogic("test-invert", scene).run(fixed)
    finally:
        unregister_task("test-invert")
    node = outputs.nodes["synthetic"]
    assert node.GetName() == "T1 -> inverted (synthetic)"
    assert node.GetDescription() == "SYNTHETIC: computed."


class MaskedMeanTask(Task):
    """Reads a label map and a transform input: the mean inside the mask, and where it moves."""

    name = "test-masked-mean"
    inputs = (
        InputSpec("image", Kind.VOLUME, "a volume"),
        InputSpec("mask", Kind.LABELS, "labels on the volume's grid"),
        InputSpec("shift", Kind.TRANSFORM, "a transform", optional=True),
    )
    outputs = (OutputSpec("masked", Kind.VOLUME, "the volume inside the mask"),)

    def run(self, inputs, options, context):
        image, mask = inputs["image"], inputs["mask"]
        values = sitk.GetArrayFromImage(image) * (sitk.GetArrayFromImage(mask) > 0)
        moved = inputs["shift"].TransformPoint((0.0, 0.0, 0.0)) if "shift" in inputs else None
        return TaskResult(
            self.name,
            images={"masked": _like(values.astype(np.float32), image)},
            measures={"inside": float(values.sum())},
            info={"moved_origin": moved, "mask_sum": int(sitk.GetArrayFromImage(mask).sum())},
        )


@pytest.mark.parametrize("background", [False, True], ids=["in-process", "worker"])
def test_label_and_transform_inputs_are_read_from_their_nodes(scene, pair, background):
    fixed, _ = pair
    register_task(MaskedMeanTask, replace=True)
    image = mrml.image_from_volume_node(fixed)
    mask = sitk.Cast(image > 50, sitk.sitkUInt8)
    segmentation = mrml.segmentation_node_from_labels(mask, CHANGED, scene, "mask")
    labelmap = mrml.labelmap_node_from_image(mask, scene, "mask labels")
    shift = mrml.linear_transform_node_from_affine(
        sitk.TranslationTransform(3, (1.0, -2.0, 3.0)), scene, "shift"
    )
    logic = background_logic(scene)
    logic.task_name = "test-masked-mean"
    expected_sum = int(sitk.GetArrayFromImage(mask).sum())
    try:
        # Through the worker the inputs travel as files: one label input is enough there.
        for mask_node in (segmentation,) if background else (segmentation, labelmap):
            inputs = {"image": fixed, "mask": mask_node, "shift": shift}
            outputs = logic.start(inputs).result() if background else logic.run(inputs)
            assert outputs.result.info["mask_sum"] == expected_sum
            assert outputs.result.info["moved_origin"] == pytest.approx([1.0, -2.0, 3.0])
            assert outputs.nodes["masked"].GetName().startswith("T1 masked")
    finally:
        unregister_task("test-masked-mean")


def test_show_centres_the_slice_views_and_the_3d_camera_on_what_was_segmented(scene, pair):
    # A result off to one side of a large field of view is shown without searching for it.
    fixed, moving = pair
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    camera = scene.AddNewNodeByClass("vtkMRMLCameraNode")
    camera.SetPosition(0.0, 500.0, 0.0)
    outputs = tasklogic.TaskLogic("test-difference", scene).run(
        {"fixed": fixed, "moving": moving}, wanted=["changed"], show=True
    )
    labels = outputs.result.images["changed"]
    inside = np.argwhere(sitk.GetArrayFromImage(labels) > 0)
    middle = (inside.min(axis=0) + inside.max(axis=0)) / 2.0
    x, y, z = labels.TransformContinuousIndexToPhysicalPoint(middle[::-1].tolist())
    centre = [-x, -y, z]
    slice_to_ras = red.GetSliceToRAS()
    np.testing.assert_allclose([slice_to_ras.GetElement(i, 3) for i in range(3)], centre)
    np.testing.assert_allclose(camera.GetFocalPoint(), centre)
    np.testing.assert_allclose(np.subtract(camera.GetPosition(), centre), [0.0, 500.0, 0.0])
