"""The Registration, Super-resolution and Synthesis modules' logic on real slicer-core MRML.

Each module's `Logic` (a thin TaskLogic subclass) runs its core task on the real MNI152 template at
4 mm: new nodes of the right class, named as the module names them, on the right grid; a registration
transform node applied in MRML gives the warped volume (linear and grid); a cancel adds nothing.
slicer-core has no Qt or Slicer app, so each Logic is built from its module file's declarations.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from deepmri.errors import Cancelled, DeepMRIError  # noqa: E402
from deepmri.geometry import resample_to_spacing, same_geometry  # noqa: E402
from deepmri.models import ModelStore, save_model  # noqa: E402
from deepmri.progress import CancelToken  # noqa: E402
from deepmri.runconfig import RunConfig  # noqa: E402
from deepmri.settings import Settings  # noqa: E402
from DeepMRILib import mrml, tasklogic  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parent.parent / "DeepMRI"
CPU = RunConfig(device="cpu", threads=1)


def module_logic(module: str, scene, **kwargs) -> tasklogic.TaskLogic:
    """The module file's `<module>Logic` as slicer-core can build it: its task and its class
    declarations (output names, label grids, ...) read from the file, on the generic TaskLogic.

    The file itself imports the Slicer app's scripted-module classes, which slicer-core lacks.
    """
    tree = ast.parse((MODULE_DIR / f"{module}.py").read_text(encoding="utf-8"))
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{module}Logic")
    declared = {
        statement.targets[0].id: ast.literal_eval(statement.value)
        for statement in logic.body
        if isinstance(statement, ast.Assign) and statement.targets[0].id != "parameterNodeClass"
    }
    task = declared.pop("taskName")
    return type(f"{module}Logic", (tasklogic.TaskLogic,), declared)(task, scene, **kwargs)


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    scene.GetSubjectHierarchyNode()
    scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # what a slice view shows
    yield scene
    scene.Clear(True)


@pytest.fixture(scope="module")
def head(mni_t1) -> sitk.Image:
    return resample_to_spacing(sitk.Cast(mni_t1, sitk.sitkFloat32), (4.0, 4.0, 4.0))


def shown(scene) -> str:
    """The volume in the slice view's background."""
    return scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode").GetBackgroundVolumeID()


def scene_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


# --- registration -------------------------------------------------------------------------


def moved_copy(fixed: sitk.Image) -> sitk.Image:
    """The head under a known rotation and shift, on an oblique grid of its own."""
    motion = sitk.Euler3DTransform()
    motion.SetCenter((0.0, -18.0, 18.0))
    motion.SetRotation(np.deg2rad(8.0), np.deg2rad(-3.0), np.deg2rad(4.0))
    motion.SetTranslation((6.0, -3.0, 4.0))
    grid = sitk.Image([52, 60, 50], sitk.sitkFloat32)
    grid.SetSpacing((4.2, 3.8, 4.0))
    rotation = sitk.VersorTransform((0.2, -0.4, 0.9), np.deg2rad(15.0))
    grid.SetDirection(rotation.GetMatrix())
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    half = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ (
        (np.asarray(grid.GetSize()) - 1) / 2 * np.asarray(grid.GetSpacing())
    )
    grid.SetOrigin(tuple(np.asarray(centre) - half))
    return sitk.Resample(fixed, grid, motion, sitk.sitkLinear, 0.0)


@pytest.fixture
def tiny_deformable_budget(monkeypatch):
    """Every named budget is sized for real 1 mm images; here each is made much smaller."""
    import deepmri.registration
    from deepmri.registration import DeformableSettings

    def tiny(budget, **values):
        return DeformableSettings(**{"levels_mm": (8.0,), "iterations": (40,), **values})

    monkeypatch.setattr(deepmri.registration, "settings_for_budget", tiny)


@pytest.fixture
def pair(scene, head):
    fixed = mrml.volume_node_from_image(head, scene, "MNI")
    moving = mrml.volume_node_from_image(moved_copy(head), scene, "MNI moved")
    return fixed, moving


def hardened_on_fixed_grid(scene, moving_node, transform_node, fixed: sitk.Image) -> np.ndarray:
    """The moving volume put under the transform node and hardened, as a user does in the
    Transforms module, then looked up at the fixed voxels (a copy: the input stays as it is)."""
    copy = mrml.volume_node_from_image(mrml.image_from_volume_node(moving_node), scene, "copy")
    copy.SetAndObserveTransformNodeID(transform_node.GetID())
    assert slicer.vtkSlicerTransformLogic().hardenTransform(copy)
    hardened = mrml.image_from_volume_node(copy)
    mrml.remove_nodes(scene, [copy])
    resampled = sitk.Resample(hardened, fixed, sitk.Transform(), sitk.sitkLinear, np.nan)
    return sitk.GetArrayFromImage(resampled)


@pytest.mark.parametrize(
    ("method", "node_class"),
    [("affine", "vtkMRMLLinearTransformNode"), ("deformable", "vtkMRMLGridTransformNode")],
)
def test_registration_transform_node_applied_in_mrml_gives_the_warped_volume(
    scene, pair, method, node_class, tiny_deformable_budget
):
    fixed_node, moving_node = pair
    before = slicer.util.arrayFromVolume(moving_node).copy()
    logic = module_logic("DeepMRIRegistration", scene)
    outputs = logic.run(
        {"fixed": fixed_node, "moving": moving_node}, method=method, config=CPU, show=True
    )
    # The displacement field is in the grid transform node, not a volume of its own.
    assert set(outputs.nodes) == {"transform", "warped"} | (
        {"jacobian"} if method == "deformable" else set()
    )
    transform, warped = outputs.nodes["transform"], outputs.nodes["warped"]
    assert shown(scene) == warped.GetID()  # not the Jacobian that comes after it
    if method == "deformable":
        jacobian = outputs.nodes["jacobian"]
        assert jacobian.GetName() == "MNI moved to MNI Jacobian"
        assert same_geometry(mrml.image_from_volume_node(jacobian), head_image(fixed_node))
    assert transform.IsA(node_class)
    assert transform.GetName() == "MNI moved to MNI"
    assert warped.GetName() == "MNI moved registered to MNI"
    fixed = mrml.image_from_volume_node(fixed_node)
    assert same_geometry(mrml.image_from_volume_node(warped), fixed)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving_node), before)
    in_mrml = hardened_on_fixed_grid(scene, moving_node, transform, fixed)
    values = slicer.util.arrayFromVolume(warped)
    inside = np.isfinite(in_mrml) & (values > 0.1 * values.max())
    assert inside.sum() > 5000
    # Linear: Slicer only moves the volume; grid: it resamples once more on its own grid.
    tolerance = 0.002 if method == "affine" else 0.03
    difference = np.abs(in_mrml[inside] - values[inside]) / float(np.ptp(values[inside]))
    assert float(np.median(difference)) < tolerance, (method, float(np.median(difference)))
    # And the registration did its job: the warped volume is much nearer the fixed one than the
    # moving volume was (measured 0.96 against 0.7 at 4 mm; resampled twice).
    head = slicer.util.arrayFromVolume(fixed_node)
    unmoved = sitk.GetArrayFromImage(
        sitk.Resample(mrml.image_from_volume_node(moving_node), fixed, sitk.Transform())
    )
    before_registration = np.corrcoef(head[inside], unmoved[inside])[0, 1]
    after_registration = np.corrcoef(head[inside], values[inside])[0, 1]
    assert after_registration > 0.94 and after_registration > before_registration + 0.1, (
        before_registration,
        after_registration,
    )


def head_image(node) -> sitk.Image:
    return mrml.image_from_volume_node(node)


def test_moving_segmentation_is_carried_onto_the_fixed_grid_from_its_own_grid(scene, pair):
    fixed_node, moving_node = pair
    moving = mrml.image_from_volume_node(moving_node)
    labels = sitk.Cast(moving > float(np.percentile(sitk.GetArrayViewFromImage(moving), 80)), 8)
    info = [{"value": 1, "name": "Bright", "color": [1.0, 0.8, 0.1], "terminology": None}]
    segmentation = mrml.segmentation_node_from_labels(labels, info, scene, "MNI moved bright")
    logic = module_logic("DeepMRIRegistration", scene)
    outputs = logic.run(
        {"fixed": fixed_node, "moving": moving_node, "moving_labels": segmentation},
        method="rigid",
        leave_out=["jacobian"],
        config=CPU,
    )
    carried = outputs.nodes["warped_labels"]
    assert carried.IsA("vtkMRMLSegmentationNode")
    assert carried.GetName() == "MNI moved bright registered to MNI"
    assert carried.GetSegmentation().GetNthSegment(0).GetName() == "Bright"
    # The core's nearest-neighbour resampling of the labels read on the moving grid.
    expected = sitk.Resample(
        labels,
        head_image(fixed_node),
        outputs.result.transforms["transform"],
        sitk.sitkNearestNeighbor,
    )
    found = mrml.labels_from_segmentation_node(carried, fixed_node)
    agreement = np.mean(sitk.GetArrayViewFromImage(found) == sitk.GetArrayViewFromImage(expected))
    assert agreement > 0.999 and sitk.GetArrayViewFromImage(found).sum() > 500


def test_cancelled_registration_leaves_the_scene_as_it_was(scene, pair):
    before = scene_ids(scene)
    token = CancelToken()

    def progress(fraction: float, message: str) -> None:
        if fraction > 0.05:
            token.cancel()

    with pytest.raises(Cancelled):
        module_logic("DeepMRIRegistration", scene).run(
            dict(zip(("fixed", "moving"), pair, strict=True)),
            method="affine",
            config=CPU,
            progress=progress,
            cancel=token,
        )
    assert scene_ids(scene) == before


# --- super-resolution ---------------------------------------------------------------------


@pytest.fixture
def thick_node(scene, head):
    """The head at 4 x 4 x 12 mm (slices three times thicker than the in-plane spacing)."""
    blurred = sitk.SmoothingRecursiveGaussian(head, [0.01, 0.01, 12.0 / 2.355])
    thick = resample_to_spacing(blurred, (4.0, 4.0, 12.0))
    return mrml.volume_node_from_image(thick, scene, "MNI thick")


def centre(image: sitk.Image) -> np.ndarray:
    return np.asarray(
        image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    )


@pytest.mark.parametrize(
    ("options", "wanted"),
    [({"method": "cubic"}, []), ({"method": "ssl", "budget": "3"}, ["uncertainty"])],
)
def test_superresolution_adds_a_thin_volume_on_the_inputs_extent(
    scene, thick_node, options, wanted
):
    thick = mrml.image_from_volume_node(thick_node)
    logic = module_logic("DeepMRISuperResolution", scene)
    outputs = logic.run(thick_node, options, wanted=wanted, config=CPU, show=True)
    assert set(outputs.nodes) == {"superresolved", *wanted}
    restored_node = outputs.nodes["superresolved"]
    assert restored_node.IsA("vtkMRMLScalarVolumeNode")
    assert restored_node.GetName() == "MNI thick super-resolved"
    restored = mrml.image_from_volume_node(restored_node)
    np.testing.assert_allclose(restored.GetSpacing(), (4.0, 4.0, 4.0), atol=1e-6)
    np.testing.assert_allclose(restored.GetDirection(), thick.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(centre(restored), centre(thick), atol=1e-4)
    extent = np.multiply(restored.GetSize(), restored.GetSpacing())
    np.testing.assert_allclose(extent, np.multiply(thick.GetSize(), thick.GetSpacing()), atol=1e-4)
    assert "same physical extent" in restored_node.GetDescription()
    if wanted:
        uncertainty = outputs.nodes["uncertainty"]
        assert uncertainty.GetName() == "MNI thick super-resolution uncertainty"
        assert same_geometry(mrml.image_from_volume_node(uncertainty), restored)
    assert shown(scene) == restored_node.GetID()


def test_cancelled_superresolution_adds_nothing(scene, thick_node):
    before = scene_ids(scene)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        module_logic("DeepMRISuperResolution", scene).run(
            thick_node, method="ssl", budget="3", config=CPU, cancel=token
        )
    assert scene_ids(scene) == before


# --- synthesis ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthesis_store(tmp_path_factory):
    """No synthesis model ships yet: the test-only 1 - x network of test_synthesize_task."""
    from test_synthesize_task import Inverter, inverter_card

    root = tmp_path_factory.mktemp("synthesis-models")
    save_model(Inverter(), inverter_card(), root / "test-t1w-to-t2w")
    return ModelStore(Settings(home=root / "home"), extra_paths=(root,))


def test_synthesis_adds_a_volume_named_and_described_synthetic_on_the_input_grid(
    scene, head, synthesis_store
):
    source = mrml.volume_node_from_image(head, scene, "MNI T1")
    before = slicer.util.arrayFromVolume(source).copy()
    logic = module_logic("DeepMRISynthesis", scene, store=synthesis_store)
    outputs = logic.run(
        source,
        model="test-t1w-to-t2w",
        skull_stripped=True,
        wanted=["uncertainty"],
        config=CPU,
        show=True,
    )
    synthetic, uncertainty = outputs.nodes["synthetic"], outputs.nodes["uncertainty"]
    assert synthetic.GetName() == "MNI T1 -> T2w (synthetic)"
    assert synthetic.GetDescription().startswith("SYNTHETIC T2w")
    assert uncertainty.GetName() == "MNI T1 synthesis uncertainty"
    for node in (synthetic, uncertainty):
        assert node.IsA("vtkMRMLScalarVolumeNode")
        assert same_geometry(mrml.image_from_volume_node(node), head)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(source), before)
    assert shown(scene) == synthetic.GetID()
    values = slicer.util.arrayFromVolume(synthetic)
    assert values[before == 0].max() == 0.0 and values[before > 0].max() > 0.0


def test_cancelled_synthesis_adds_nothing(scene, head, synthesis_store):
    source = mrml.volume_node_from_image(head, scene, "MNI T1")
    before = scene_ids(scene)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        module_logic("DeepMRISynthesis", scene, store=synthesis_store).run(
            source, model="test-t1w-to-t2w", skull_stripped=True, config=CPU, cancel=token
        )
    assert scene_ids(scene) == before


# --- in the background worker, as the panels run them ----------------------------------------


def test_background_registration_adds_a_transform_node_that_maps_like_the_cores(scene, pair):
    fixed_node, moving_node = pair
    logic = module_logic("DeepMRIRegistration", scene, worker_environment={"OMP_NUM_THREADS": "1"})
    inputs = {"fixed": fixed_node, "moving": moving_node}
    outputs = logic.start(inputs, method="affine", config=CPU, show=True).result()
    assert set(outputs.nodes) == {"transform", "warped"}
    assert outputs.nodes["transform"].IsA("vtkMRMLLinearTransformNode")
    assert outputs.nodes["warped"].GetName() == "MNI moved registered to MNI"
    # The node maps fixed points as the core's transform that came back from the worker (.h5).
    fixed = mrml.image_from_volume_node(fixed_node)
    core = outputs.result.transforms["transform"]
    node = mrml.transform_from_node(outputs.nodes["transform"])
    for index in np.ndindex(3, 3, 3):
        point = fixed.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) * (0.2 + 0.3 * i) for n, i in zip(fixed.GetSize(), index, strict=True)]
        )
        np.testing.assert_allclose(
            node.TransformPoint(point), core.TransformPoint(point), atol=1e-4
        )


def test_cancelling_background_registration_adds_nothing(scene, pair):
    before = scene_ids(scene)
    logic = module_logic("DeepMRIRegistration", scene, worker_environment={"OMP_NUM_THREADS": "1"})
    job = logic.start(dict(zip(("fixed", "moving"), pair, strict=True)), config=CPU)
    deadline = time.monotonic() + 120
    while not job.poll() and not job.done and time.monotonic() < deadline:
        time.sleep(0.05)  # until it reports work, so the cancel stops real work
    asked = time.monotonic()
    job.cancel()
    with pytest.raises(Cancelled):
        job.result()
    # The worker stops on the cancel token at its next iteration, or is killed at the 2 s grace.
    assert time.monotonic() - asked < 2.5
    assert scene_ids(scene) == before


def test_mismatched_registration_inputs_fail_in_one_line_and_add_nothing(scene, head, pair):
    fixed_node = pair[0]
    single_slice = sitk.RegionOfInterest(head, [head.GetWidth(), head.GetHeight(), 1], [0, 0, 20])
    empty = sitk.Image(head.GetSize(), sitk.sitkFloat32)
    empty.CopyInformation(head)
    piece = sitk.RegionOfInterest(head, [5, 5, 5], [20, 24, 20])  # a 20 mm cube of brain
    cases = {"single slice": single_slice, "empty": empty, "covers only": piece}
    nodes = {
        words: mrml.volume_node_from_image(image, scene, words) for words, image in cases.items()
    }
    before = scene_ids(scene)
    logic = module_logic("DeepMRIRegistration", scene)
    for words, moving in nodes.items():
        with pytest.raises(DeepMRIError, match=words) as caught:
            logic.run({"fixed": fixed_node, "moving": moving}, method="affine", config=CPU)
        assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    # Through the background worker, as the panel runs it: the same one line, nothing added.
    worker = module_logic("DeepMRIRegistration", scene, worker_environment={"OMP_NUM_THREADS": "1"})
    job = worker.start({"fixed": fixed_node, "moving": nodes["empty"]}, config=CPU)
    with pytest.raises(DeepMRIError, match="empty") as caught:
        job.result()
    assert "\n" not in str(caught.value).strip() and "Traceback" not in str(caught.value)
    assert scene_ids(scene) == before
