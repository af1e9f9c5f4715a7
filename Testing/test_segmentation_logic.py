"""Segmentation through the generic Slicer task logic on real slicer-core MRML.

A real threshold segmenter declared as a task (Testing/threshold_segmenter.py) stands in for trained
models; the real `segment` task runs too, with a small random UNet and with the bundled models.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from conftest import make_oblique_image  # noqa: E402
from deepmri.errors import InvalidImageError  # noqa: E402
from deepmri.runconfig import RunConfig  # noqa: E402
from deepmri.tasks import register_task, unregister_task  # noqa: E402
from DeepMRILib import jobs, mrml, tasklogic  # noqa: E402
from DeepMRILib.roi import ROIError, crop_box_from_roi  # noqa: E402
from mrml_helpers import fingerprint, mrml_scene, scene_state  # noqa: E402, F401 (fixture)
from threshold_segmenter import LABELS, ThresholdSegmentTask, threshold_segment  # noqa: E402

TESTING_DIR = str(Path(__file__).resolve().parent)
CPU = RunConfig(device="cpu")


@pytest.fixture(autouse=True)
def threshold_task():
    task = register_task(ThresholdSegmentTask, replace=True)
    yield task
    unregister_task(task.name)


@pytest.fixture
def input_node(scene):
    # A smooth oblique head-like volume: a bright ellipsoid with a darker core.
    image = make_oblique_image(size=(40, 36, 24))
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 36, 40)], indexing="ij")
    radius = np.sqrt(i**2 + j**2 + k**2)
    array = np.where(radius < 0.9, 300 - 200 * radius, 0).astype(np.float32)
    head = sitk.GetImageFromArray(array)
    head.CopyInformation(image)
    return mrml.volume_node_from_image(head, scene, "MRHead")


def threshold_logic(scene, **kwargs) -> tasklogic.TaskLogic:
    # The worker imports the task by "threshold_segmenter:ThresholdSegmentTask" from Testing/.
    return tasklogic.TaskLogic(
        "test-threshold", scene, worker_environment={"PYTHONPATH": TESTING_DIR}, **kwargs
    )


def test_run_adds_named_segments_and_leaves_the_input_untouched(scene, input_node):
    before = fingerprint(input_node)
    image = mrml.image_from_volume_node(input_node)
    reported = []
    outputs = threshold_logic(scene).run(
        input_node,
        model="threshold-model",
        labelmap=True,
        progress=lambda f, m: reported.append(f),
    )
    assert fingerprint(input_node) == before
    segmentation = outputs.segmentation
    assert segmentation is outputs.nodes["labels"]
    assert segmentation.GetName() == "MRHead segmentation (threshold model)"
    assert segmentation.GetAttribute("DeepMRI.model") == "threshold-model"
    names = [
        segmentation.GetSegmentation().GetNthSegment(i).GetName()
        for i in range(segmentation.GetSegmentation().GetNumberOfSegments())
    ]
    assert names == ["Dark", "Middle", "Bright"]
    middle = segmentation.GetSegmentation().GetNthSegment(1)
    assert "SCT^389082009^Grey matter" in middle.GetTerminology()
    expected = sitk.GetArrayFromImage(threshold_segment(image).labels)
    exported = mrml.labels_from_segmentation_node(segmentation, input_node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(exported), expected)
    labelmap = outputs.labelmaps["labels"]
    assert labelmap.GetName() == "MRHead labels (threshold model)"
    labelmap_image = mrml.image_from_volume_node(labelmap)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap_image), expected)
    np.testing.assert_allclose(labelmap_image.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(labelmap_image.GetOrigin(), image.GetOrigin(), atol=1e-9)
    assert reported == sorted(reported) and reported[-1] == 1.0
    summary = outputs.summary()
    assert summary.startswith("Dark ") and summary.endswith(" mL") and "(mL)" not in summary


def test_probabilities_and_uncertainty_become_volumes_on_the_input_grid(scene, input_node):
    outputs = threshold_logic(scene).run(input_node, wanted=["probability", "uncertainty"])
    probabilities = outputs.nodes_of("probability")
    assert list(probabilities) == ["probability-dark", "probability-middle", "probability-bright"]
    middle = probabilities["probability-middle"]
    assert middle.GetName() == "MRHead Middle probability (threshold)"
    image = mrml.image_from_volume_node(middle)
    expected = threshold_segment(mrml.image_from_volume_node(input_node), probabilities=True)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected.probabilities["Middle"])
    )
    assert outputs.nodes["uncertainty"].GetName() == "MRHead uncertainty (threshold)"
    assert len(outputs.all_nodes) == 5


def test_an_overlay_map_colours_its_whole_range_and_leaves_near_zero_clear(scene, input_node):
    # Auto window/level on a map that is ~0 almost everywhere washed the whole view in colour.
    outputs = threshold_logic(scene).run(input_node, wanted=["probability", "uncertainty"])
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    for key, (low, high) in (("probability-middle", (0.0, 1.0)), ("uncertainty", (0.0, 0.5))):
        node = outputs.nodes[key]
        tasklogic.show_overlay(scene, node)
        display = node.GetDisplayNode()
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert not display.GetAutoWindowLevel()
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (low, high)
        assert display.GetApplyThreshold()
        assert display.GetLowerThreshold() == pytest.approx(0.05 * high)
    tasklogic.show_overlay(scene, node, show=False)
    assert not composite.GetForegroundVolumeID()


def test_roi_segments_only_inside_it_and_pastes_into_the_full_grid(scene, input_node):
    full = mrml.image_from_volume_node(input_node)
    # Voxels i 10..19, j 8..17, k 6..11: corner voxel centres, the ROI reaching half a voxel beyond.
    low = np.array(full.TransformIndexToPhysicalPoint((10, 8, 6)))
    high = np.array(full.TransformIndexToPhysicalPoint((19, 17, 11)))
    # An ROI aligned with the (oblique) voxel axes, its frame given by the volume's directions.
    axes = np.eye(4)
    axes[:3, :3] = mrml.LPS_TO_RAS @ np.asarray(full.GetDirection()).reshape(3, 3)
    axes[:3, 3] = mrml.LPS_TO_RAS @ ((low + high) / 2)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(axes))
    size = np.array([9, 9, 5]) * np.array(full.GetSpacing())
    roi.SetSize(*size)
    outputs = threshold_logic(scene).run(input_node, roi_node=roi, labelmap=True)
    labels = sitk.GetArrayFromImage(mrml.image_from_volume_node(outputs.labelmaps["labels"]))
    inside = np.zeros(labels.shape, dtype=bool)
    inside[6:12, 8:18, 10:20] = True
    assert labels[~inside].max() == 0
    part = full[10:20, 8:18, 6:12]
    np.testing.assert_array_equal(
        labels[inside].reshape(6, 10, 10), sitk.GetArrayFromImage(threshold_segment(part).labels)
    )
    assert outputs.result.info["crop_box"] == [[10, 8, 6], [20, 18, 12]]


def test_roi_outside_the_volume_is_refused_and_adds_nothing(scene, input_node):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far away")
    roi.SetCenter(5000.0, 5000.0, 5000.0)
    roi.SetSize(10.0, 10.0, 10.0)
    before = scene_state(scene)
    with pytest.raises(ROIError, match="does not overlap"):
        threshold_logic(scene).run(input_node, roi_node=roi)
    assert scene_state(scene) == before


def test_a_failing_model_leaves_the_scene_unchanged(scene, input_node):
    before, fingerprint_before = scene_state(scene), fingerprint(input_node)
    with pytest.raises(InvalidImageError, match="No brain was found"):
        threshold_logic(scene).run(input_node, fail=True, wanted=["probability"])
    assert scene_state(scene) == before
    assert fingerprint(input_node) == fingerprint_before


def test_background_run_gives_the_same_nodes_as_the_console_run(scene, input_node):
    job = threshold_logic(scene).start(input_node, wanted=["probability"])
    events = []
    while not job.done:
        events.extend(job.poll())
        time.sleep(0.02)
    outputs = job.result()
    assert job.state == jobs.SUCCEEDED and job.fraction == 1.0
    assert events and events[-1].fraction == 1.0
    assert outputs.segmentation.GetName() == "MRHead segmentation (threshold)"
    expected = threshold_segment(mrml.image_from_volume_node(input_node), probabilities=True)
    exported = mrml.labels_from_segmentation_node(outputs.segmentation, input_node)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(expected.labels)
    )
    names = [node.GetName() for node in outputs.nodes_of("probability").values()]
    assert names == [f"MRHead {label['name']} probability (threshold)" for label in LABELS]


def _bundled_models() -> set[str]:
    try:
        from deepmri.models import ModelStore

        return {info.id for info in ModelStore().list()}
    except Exception:
        return set()


@pytest.mark.parametrize("model", ["brain-extraction", "brain-tissue"])
def test_bundled_models_through_the_logic_give_the_cores_result(scene, model):
    if not {model, "brain-extraction"} <= _bundled_models():
        pytest.skip(f"the bundled {model} model is not installed yet")
    from deepmri.tasks.segment import segment

    image = _real_head()
    node = mrml.volume_node_from_image(image, scene, "anatomical")
    before = fingerprint(node)
    outputs = tasklogic.TaskLogic("segment", scene).run(node, model=model, config=CPU)
    assert fingerprint(node) == before
    segmentation = outputs.segmentation.GetSegmentation()
    card_names = [label["name"] for label in outputs.result.info["label_info"]]
    assert [
        segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())
    ] == card_names
    labels = mrml.labels_from_segmentation_node(outputs.segmentation, node)
    direct = segment(image, model, device="cpu")
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(direct.labels)
    )
    assert sitk.GetArrayViewFromImage(labels).any()


def test_roi_is_taken_into_the_frame_of_a_transformed_volume(scene, input_node):
    full = mrml.image_from_volume_node(input_node)
    centre = mrml.LPS_TO_RAS @ np.array(full.TransformIndexToPhysicalPoint((20, 18, 12)))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetCenter(*centre)
    roi.SetSize(6.0, 8.0, 5.0)
    box_in_place = crop_box_from_roi(full, roi, input_node)
    # Move the volume by a transform and the ROI with it: the same voxels are inside.
    shift = np.array([30.0, -12.0, 7.5])
    moved = np.eye(4)
    moved[:3, 3] = shift
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(moved))
    input_node.SetAndObserveTransformNodeID(transform.GetID())
    roi.SetCenter(*(centre + shift))
    assert crop_box_from_roi(full, roi, input_node) == box_in_place
    assert all(
        a < v < b
        for a, v, b in zip(box_in_place.start, (20, 18, 12), box_in_place.stop, strict=True)
    )
    input_node.SetAndObserveTransformNodeID(None)
    assert crop_box_from_roi(full, roi, input_node) != box_in_place


def test_the_scripting_guide_calls_only_functions_and_keywords_that_exist():
    import ast
    import inspect
    import re

    from deepmri.tasks import get_task
    from DeepMRILib import deps

    guide = (Path(__file__).resolve().parent.parent / "Docs" / "scripting.md").read_text()
    owners = {
        "mrml": [mrml],
        "deps": [deps],
        "jobs": [jobs],
        "logic": [tasklogic.TaskLogic],
        "job": [jobs.WorkerJob],
        "outputs": [tasklogic.TaskOutputs],
    }
    # Keywords a logic call passes on to the task as options (`model="brain-tissue"`).
    task_options = {option.name for option in get_task("segment").options}
    checked = 0
    for block in re.findall(r"```python\n(.*?)```", guide, re.S):
        for node in ast.walk(ast.parse(block)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = ast.unparse(node.func.value)
            if receiver not in owners:
                continue
            found = [
                getattr(o, node.func.attr) for o in owners[receiver] if hasattr(o, node.func.attr)
            ]
            assert found, f"the guide calls {receiver}.{node.func.attr}, which does not exist"
            signature = inspect.signature(found[0])
            parameters = set(signature.parameters)
            if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
                parameters |= task_options
            keywords = {k.arg for k in node.keywords if k.arg}
            assert keywords <= parameters, (
                f"{receiver}.{node.func.attr} takes no {keywords - parameters}"
            )
            checked += 1
    for name in re.findall(r"^\| `(\w+)\(", guide, re.M):
        assert hasattr(mrml, name), f"the guide's table lists mrml.{name}, which does not exist"
        checked += 1
    assert checked > 20


@pytest.fixture(scope="module")
def random_unet_model(tmp_path_factory) -> Path:
    """A real model folder (card.json + safetensors) holding a small MONAI UNet with fixed random
    weights: the real store, engine and segment task run end to end with no trained model."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepmri.engine")
    models = pytest.importorskip("deepmri.models")
    from deepmri.nets import build_network

    card = models.example_card(
        id="test-random-unet",
        labels=[
            {
                "value": 1,
                "name": "Brain",
                "color": [0.87, 0.72, 0.53],
                "terminology": {
                    "category": {
                        "scheme": "SCT",
                        "code": "123037004",
                        "meaning": "Anatomical Structure",
                    },
                    "type": {"scheme": "SCT", "code": "12738006", "meaning": "Brain"},
                },
            }
        ],
    )
    card["preprocessing"]["spacing"] = [4.0, 4.0, 4.0]
    card["inference"]["patch_size"] = [16, 16, 16]
    torch.manual_seed(0)
    network = build_network(card["architecture"]["name"], card["architecture"]["config"])
    root = tmp_path_factory.mktemp("models")
    models.save_model(network, card, root / "test-random-unet", dtype="float32")
    return root


def _real_head() -> sitk.Image:
    import nibabel

    # A real MRI shipped with nibabel: 33x41x25 at 2 mm, y axis flipped.
    return sitk.ReadImage(str(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"))


def test_the_real_segment_task_runs_through_the_logic_with_a_real_model(
    scene, random_unet_model, tmp_path
):
    from deepmri.models import ModelStore
    from deepmri.settings import Settings
    from deepmri.tasks.segment import segment

    store = ModelStore(Settings(home=tmp_path / "home"), extra_paths=(random_unet_model,))
    image = _real_head()
    node = mrml.volume_node_from_image(image, scene, "anatomical")
    before = fingerprint(node)
    logic = tasklogic.TaskLogic("segment", scene, store=store)
    outputs = logic.run(
        node, model="test-random-unet", config=CPU, wanted=["probability", "uncertainty"]
    )
    assert fingerprint(node) == before
    assert outputs.segmentation.GetName() == "anatomical segmentation (test random unet)"
    segments = outputs.segmentation.GetSegmentation()
    brain = segments.GetNthSegment(0)
    assert segments.GetNumberOfSegments() == 1 and brain.GetName() == "Brain"
    assert "SCT^12738006^Brain" in brain.GetTerminology()
    direct = segment(image, "test-random-unet", device="cpu", uncertainty=True, store=store)
    exported = mrml.labels_from_segmentation_node(outputs.segmentation, node)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(direct.labels)
    )
    probability_node = outputs.nodes["probability-brain"]
    assert probability_node.GetName() == "anatomical Brain probability (test random unet)"
    probability = mrml.image_from_volume_node(probability_node)
    assert probability.GetSize() == image.GetSize()
    np.testing.assert_allclose(probability.GetDirection(), image.GetDirection())
    np.testing.assert_allclose(probability.GetOrigin(), image.GetOrigin())
    assert "uncertainty" in outputs.nodes


def test_the_real_segment_task_runs_in_the_background_worker(scene, random_unet_model, tmp_path):
    from deepmri.models import ModelStore
    from deepmri.settings import Settings
    from deepmri.tasks.segment import segment
    from DeepMRILib.models import SavedSettings

    image = _real_head()
    node = mrml.volume_node_from_image(image, scene, "anatomical")
    logic = tasklogic.TaskLogic(
        "segment", scene, worker_environment={"DEEPMRI_HOME": str(tmp_path)}
    )
    # The model folder as saved in the Models panel reaches the worker's store.
    SavedSettings(extra_model_paths=str(random_unet_model)).apply_to(logic)
    job = logic.start(node, model="test-random-unet", config=CPU, wanted=["probability"])
    job.wait()
    outputs = job.result()
    assert job.state == jobs.SUCCEEDED
    store = ModelStore(Settings(home=tmp_path / "home"), extra_paths=(random_unet_model,))
    direct = segment(image, "test-random-unet", device="cpu", store=store)
    exported = mrml.labels_from_segmentation_node(outputs.segmentation, node)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(direct.labels)
    )
    assert outputs.result.info["provenance"]["models"][0]["id"] == "test-random-unet"


def test_the_users_csf_border_reaches_the_bundled_brain_extraction_through_the_logic(scene):
    # The module's "CSF border" box and the console pass csf_border_mm as the CLI does.
    if "brain-extraction" not in _bundled_models():
        pytest.skip("the bundled brain-extraction model is not installed yet")
    from deepmri.tasks.segment import segment

    image = _real_head()
    node = mrml.volume_node_from_image(image, scene, "anatomical")
    logic = tasklogic.TaskLogic("segment", scene)
    outputs = logic.run(
        node, model="brain-extraction", csf_border_mm=0.0, config=CPU, wanted=["stripped"]
    )
    labels = sitk.GetArrayFromImage(mrml.labels_from_segmentation_node(outputs.segmentation, node))
    # The skull-stripped scan a user asks for in the panel: a volume of the input inside the mask.
    stripped = outputs.nodes["stripped"]
    assert stripped.GetName() == "anatomical stripped (brain extraction)"
    kept = sitk.GetArrayFromImage(mrml.image_from_volume_node(stripped))
    original = sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(kept, np.where(labels > 0, original, 0))
    direct = segment(image, "brain-extraction", device="cpu", csf_border_mm=0.0)
    default = sitk.GetArrayFromImage(segment(image, "brain-extraction", device="cpu").labels)
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(direct.labels))
    assert outputs.result.info["provenance"]["csf_border_mm"] == 0.0
    assert not (labels > 0)[default == 0].any()  # a narrower border only takes CSF away
    assert 0 < (labels > 0).sum() < (default > 0).sum()


def test_the_panels_mask_options_follow_the_model_menu():
    # What the Segmentation panel's checkbox and "CSF border" box send, for the bundled models
    # as the model menu lists them: the border only for a model with both conventions.
    from DeepMRILib.models import ModelsLogic, SavedSettings, border_text, mask_options

    logic = ModelsLogic(SavedSettings())
    menu = {model["id"]: model for model in logic.models_for_task("segmentation")}
    if not {"brain-extraction", "brain-tissue"} <= set(menu):
        pytest.skip("the bundled models are not installed yet")
    extraction, tissue = menu["brain-extraction"], menu["brain-tissue"]
    parts = {row["id"]: row["task"] for row in logic.list_models() if "part of" in row["task"]}
    assert parts == {"brain-extraction-fine": "segmentation, part of brain-extraction"}
    assert not set(parts) & set(menu)  # a part of a model is not offered alone
    assert border_text(extraction) == f"{extraction['csf_border_mm']:g} mm"
    assert border_text(tissue) == "none"
    assert mask_options(extraction, True, -0.5) == {"csf": True, "csf_border_mm": None}
    assert mask_options(extraction, True, 2.0) == {"csf": True, "csf_border_mm": 2.0}
    assert mask_options(extraction, False, 2.0) == {"csf": False, "csf_border_mm": None}
    assert mask_options(tissue, False, 2.0) == {"csf": True, "csf_border_mm": None}
