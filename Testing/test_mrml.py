"""MRML <-> SimpleITK conversions on real slicer-core MRML: geometry, segmentations, transforms.

The RAS/LPS convention is checked against Slicer's own file writer and reader, not only round trips.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from conftest import make_oblique_image  # noqa: E402
from DeepMRILib import mrml  # noqa: E402


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(True)


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-6) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)


def ras(point_lps) -> np.ndarray:
    return np.asarray(point_lps, dtype=float) * np.array([-1.0, -1.0, 1.0])


def test_volume_round_trip_keeps_oblique_geometry_and_voxels(scene, oblique_image):
    node = mrml.volume_node_from_image(oblique_image, scene, "oblique")
    back = mrml.image_from_volume_node(node)
    assert_same_geometry(back, oblique_image, 1e-9)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(oblique_image)
    )
    assert back.GetPixelID() == oblique_image.GetPixelID()


def test_node_maps_voxel_index_to_the_ras_of_the_itk_lps_point(scene, oblique_image):
    node = mrml.volume_node_from_image(oblique_image, scene, "oblique")
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(_ijk_to_ras_matrix(node))
    for index in [(0, 0, 0), (39, 0, 0), (3, 17, 22), (39, 35, 23)]:
        lps = oblique_image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose((ijk_to_ras @ [*index, 1.0])[:3], ras(lps), atol=1e-9)


def _ijk_to_ras_matrix(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_volume_written_by_slicer_reads_in_simpleitk_with_the_same_geometry(
    scene, oblique_image, tmp_path, suffix
):
    node = mrml.volume_node_from_image(oblique_image, scene, "oblique")
    path = tmp_path / f"written-by-slicer{suffix}"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    read_by_itk = sitk.ReadImage(str(path))
    assert_same_geometry(read_by_itk, oblique_image, 1e-5)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(read_by_itk), sitk.GetArrayFromImage(oblique_image)
    )


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_volume_written_by_simpleitk_converts_from_the_slicer_loaded_node(
    scene, oblique_image, tmp_path, suffix
):
    path = tmp_path / f"written-by-itk{suffix}"
    sitk.WriteImage(oblique_image, str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loaded")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    converted = mrml.image_from_volume_node(node)
    assert_same_geometry(converted, oblique_image, 1e-5)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(oblique_image)
    )


def test_non_volume_and_empty_volume_are_refused_with_a_clear_message(scene):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(mrml.MRMLConversionError, match="scalar volume"):
        mrml.image_from_volume_node(segmentation)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(Exception, match="no voxels"):
        mrml.image_from_volume_node(empty)


LABELS = [
    {"value": 1, "name": "CSF", "color": [0.2, 0.4, 0.9], "terminology": None},
    {
        "value": 2,
        "name": "Grey matter",
        "color": [0.6, 0.6, 0.6],
        "terminology": {
            "category": ["SCT", "85756007", "Tissue"],
            "type": ["SCT", "389082009", "Grey matter"],
        },
    },
    {"value": 3, "name": "White matter", "color": [1.0, 1.0, 0.9], "terminology": None},
    {"value": 4, "name": "Lesion", "color": [1.0, 0.0, 0.0], "terminology": None},
]


def _label_image(reference: sitk.Image) -> sitk.Image:
    array = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
    array[2:8, 3:12, 4:20] = 1
    array[10:14, 5:30, 5:30] = 2
    array[15:20, 1:9, 30:38] = 3
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(reference)
    return labels


def test_labels_become_named_coloured_segments_that_export_back_identically(scene, oblique_image):
    labels = _label_image(oblique_image)
    volume = mrml.volume_node_from_image(oblique_image, scene, "T1")
    node = mrml.segmentation_node_from_labels(
        labels, LABELS, scene, "T1 segmentation (brain tissue)", reference_node=volume
    )
    segmentation = node.GetSegmentation()
    names = [
        segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
        for i in range(segmentation.GetNumberOfSegments())
    ]
    assert names == ["CSF", "Grey matter", "White matter", "Lesion"]
    grey = segmentation.GetSegment(mrml.segment_id_for_label(node, 2))
    np.testing.assert_allclose(grey.GetColor(), [0.6, 0.6, 0.6])
    assert "SCT^389082009^Grey matter" in grey.GetTerminology()
    assert grey.GetTerminology().startswith(
        mrml.DEFAULT_TERMINOLOGY_CONTEXT + "~SCT^85756007^Tissue"
    )
    exported = mrml.labels_from_segmentation_node(node, volume)
    assert_same_geometry(exported, oblique_image, 1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(labels))


def test_terminology_accepts_slicer_strings_and_code_dicts():
    entry = mrml.terminology_entry(
        {
            "category": {"scheme": "SCT", "value": "123037004", "meaning": "Anatomical Structure"},
            "type": "SCT^12738006^Brain",
        }
    )
    assert entry.split("~")[1:3] == ["SCT^123037004^Anatomical Structure", "SCT^12738006^Brain"]
    assert mrml.terminology_entry(entry) == entry
    assert mrml.terminology_entry(None) is None


def test_new_nodes_sit_next_to_their_input_in_the_subject_hierarchy(scene, oblique_image):
    hierarchy = scene.GetSubjectHierarchyNode()
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Patient study")
    volume = mrml.volume_node_from_image(oblique_image, scene, "T1")
    hierarchy.CreateItem(study, volume)
    segmentation = mrml.segmentation_node_from_labels(
        _label_image(oblique_image), LABELS, scene, "seg", reference_node=volume
    )
    probability = mrml.volume_node_from_image(oblique_image, scene, "p", reference_node=volume)
    for node in (segmentation, probability):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_output_names_follow_the_input_and_model():
    volume = slicer.vtkMRMLScalarVolumeNode()
    volume.SetName("MRHead")
    assert mrml.output_name(volume, "segmentation", "brain-tissue") == (
        "MRHead segmentation (brain tissue)"
    )


def _affine() -> sitk.AffineTransform:
    rotation = sitk.VersorTransform((0.2, 0.9, -0.3), np.deg2rad(17.0)).GetMatrix()
    affine = sitk.AffineTransform(3)
    matrix = np.asarray(rotation).reshape(3, 3) @ np.diag([1.1, 0.95, 1.02])
    affine.SetMatrix(matrix.ravel())
    affine.SetTranslation((4.0, -7.5, 2.25))
    affine.SetCenter((10.0, 20.0, -30.0))
    return affine


POINTS_LPS = [(0.0, 0.0, 0.0), (12.5, -40.0, 33.0), (-60.0, 25.0, -10.0)]


def test_affine_becomes_a_from_parent_transform_that_maps_points_like_itk(scene):
    affine = _affine()
    node = mrml.linear_transform_node_from_affine(affine, scene, "affine")
    from_parent = node.GetTransformFromParent()
    for point in POINTS_LPS:
        expected = ras(affine.TransformPoint(point))
        np.testing.assert_allclose(from_parent.TransformPoint(ras(point)), expected, atol=1e-9)
    # The same transform given as a 4x4 LPS matrix gives the same node matrix.
    matrix_node = mrml.linear_transform_node_from_affine(
        mrml.affine_matrix_lps(affine), scene, "matrix"
    )
    np.testing.assert_allclose(
        slicer.util.arrayFromTransformMatrix(matrix_node),
        slicer.util.arrayFromTransformMatrix(node),
        atol=1e-12,
    )


def test_to_parent_option_stores_the_affine_as_the_child_to_parent_transform(scene):
    affine = _affine()
    node = mrml.linear_transform_node_from_affine(affine, scene, "affine", from_parent=False)
    to_parent = node.GetTransformToParent()
    for point in POINTS_LPS:
        expected = ras(affine.TransformPoint(point))
        np.testing.assert_allclose(to_parent.TransformPoint(ras(point)), expected, atol=1e-9)


def _displacement_field() -> sitk.Image:
    reference = make_oblique_image(size=(12, 10, 8), spacing=(4.0, 5.0, 6.0))
    rng = np.random.default_rng(3)
    vectors = rng.normal(0.0, 2.0, size=(*reference.GetSize()[::-1], 3))
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(reference)
    return field


def test_displacement_field_becomes_a_grid_transform_that_maps_points_like_itk(scene):
    field = _displacement_field()
    itk_transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    node = mrml.grid_transform_node_from_displacement(field, scene, "warp")
    from_parent = node.GetTransformFromParent()
    # Grid points and points between them (linear interpolation on both sides).
    indices = [(0, 0, 0), (5, 4, 3), (11, 9, 7), (2.5, 3.25, 1.75), (7.4, 0.6, 5.5)]
    for index in indices:
        point = field.TransformContinuousIndexToPhysicalPoint(index)
        expected = ras(itk_transform.TransformPoint(point))
        # VTK interpolates some points in single precision: agreement to 0.1 micrometre.
        np.testing.assert_allclose(from_parent.TransformPoint(ras(point)), expected, atol=1e-4)


def test_displacement_field_must_hold_3d_vectors(scene, oblique_image):
    with pytest.raises(mrml.MRMLConversionError, match="3 components"):
        mrml.grid_transform_node_from_displacement(oblique_image, scene, "bad")


def _continuous_index(image: sitk.Image, point) -> np.ndarray:
    return np.array(image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point)))


def test_a_volume_hardened_under_the_affine_node_equals_itk_resampling(scene):
    # Slicer's own transform logic (not our point arithmetic) decides what from-parent means.
    moving = sitk.SmoothingRecursiveGaussian(make_oblique_image(), 3.0)
    rigid = sitk.Euler3DTransform((10.0, 20.0, -5.0), 0.1, -0.2, 0.15, (3.0, -4.0, 2.0))
    node = mrml.volume_node_from_image(moving, scene, "moving")
    transform = mrml.linear_transform_node_from_affine(rigid, scene, "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert slicer.vtkSlicerTransformLogic().hardenTransform(node)
    hardened = mrml.image_from_volume_node(node)
    fixed = make_oblique_image(seed=1)
    in_slicer = sitk.Resample(hardened, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
    in_itk = sitk.Resample(moving, fixed, rigid, sitk.sitkLinear, 0.0)
    assert (sitk.GetArrayViewFromImage(in_itk) != 0).mean() > 0.3  # the images overlap
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(in_slicer), sitk.GetArrayFromImage(in_itk), atol=1e-3
    )


def test_a_volume_hardened_under_the_grid_node_equals_itk_resampling_inside_the_field(scene):
    moving = sitk.SmoothingRecursiveGaussian(make_oblique_image(), 3.0)
    field = _displacement_field()
    node = mrml.volume_node_from_image(moving, scene, "moving")
    transform = mrml.grid_transform_node_from_displacement(field, scene, "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert slicer.vtkSlicerTransformLogic().hardenTransform(node)
    hardened = mrml.image_from_volume_node(node)  # resampled by Slicer on a grid it chose
    itk_transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    in_itk = sitk.GetArrayFromImage(
        sitk.Resample(moving, hardened, itk_transform, sitk.sitkLinear, 0.0)
    )
    in_slicer = sitk.GetArrayFromImage(hardened)
    # Outside the field's grid VTK and ITK extrapolate displacements differently; compare where
    # the point lies inside the field and its mapped point inside the moving image (1-voxel margin).
    compared = 0
    for index in np.ndindex(*in_slicer.shape[::-1]):
        if sum(index) % 7:
            continue
        point = hardened.TransformIndexToPhysicalPoint(index)
        in_field = _continuous_index(field, point)
        mapped = _continuous_index(moving, itk_transform.TransformPoint(point))
        if (
            np.all(in_field >= 1)
            and np.all(in_field <= np.array(field.GetSize()) - 2)
            and np.all(mapped >= 1)
            and np.all(mapped <= np.array(moving.GetSize()) - 2)
        ):
            compared += 1
            k_j_i = index[::-1]
            assert abs(in_slicer[k_j_i] - in_itk[k_j_i]) < 1e-3, index
    assert compared > 1000


def test_transform_nodes_read_back_as_the_itk_transforms_they_were_made_from(scene):
    affine = _affine()
    node = mrml.linear_transform_node_from_affine(affine, scene, "affine")
    back = mrml.transform_from_node(node)
    field = _displacement_field()
    grid = mrml.grid_transform_node_from_displacement(field, scene, "warp")
    warp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    warp_back = mrml.transform_from_node(grid)
    assert isinstance(warp_back, sitk.DisplacementFieldTransform)
    assert_same_geometry(warp_back.GetDisplacementField(), field, tolerance=1e-9)
    for point in POINTS_LPS:
        np.testing.assert_allclose(back.TransformPoint(point), affine.TransformPoint(point))
    for index in [(0, 0, 0), (5, 4, 3), (2.5, 3.25, 1.75)]:
        point = field.TransformContinuousIndexToPhysicalPoint(index)
        np.testing.assert_allclose(warp_back.TransformPoint(point), warp.TransformPoint(point))
    with pytest.raises(mrml.MRMLConversionError, match="linear or grid transform"):
        mrml.transform_from_node(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))


def test_any_itk_transform_becomes_the_node_kind_that_holds_it(scene, oblique_image):
    translation = sitk.TranslationTransform(3, (3.0, -4.0, 5.0))
    linear = mrml.transform_node_from_transform(sitk.Transform(translation), scene, "shift")
    assert linear.IsA("vtkMRMLLinearTransformNode")
    np.testing.assert_allclose(
        mrml.transform_from_node(linear).TransformPoint((1.0, 2.0, 3.0)), (4.0, -2.0, 8.0)
    )
    field = _displacement_field()
    warp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    assert mrml.transform_node_from_transform(warp, scene, "warp").IsA("vtkMRMLGridTransformNode")
    # A B-spline has no grid of its own: it is sampled on the reference image's grid.
    bspline = sitk.BSplineTransformInitializer(oblique_image, [2, 2, 2])
    bspline.SetParameters(np.linspace(-1, 1, len(bspline.GetParameters())).tolist())
    node = mrml.transform_node_from_transform(
        bspline, scene, "bspline", reference_image=oblique_image
    )
    sampled = mrml.transform_from_node(node).GetDisplacementField()
    assert_same_geometry(sampled, oblique_image, tolerance=1e-9)
    point = oblique_image.TransformContinuousIndexToPhysicalPoint((10.0, 9.0, 6.0))
    np.testing.assert_allclose(
        mrml.transform_from_node(node).TransformPoint(point),
        bspline.TransformPoint(point),
        atol=1e-6,
    )
    with pytest.raises(mrml.MRMLConversionError, match="no image grid"):
        mrml.transform_node_from_transform(bspline, scene, "bspline")


FIRST_SEGMENTATION_IN_3D = """
import numpy as np, SimpleITK as sitk, slicer
from DeepMRILib import mrml
k, j, i = np.mgrid[:30, :30, :30] - 15
ball = sitk.GetImageFromArray(((i**2 + j**2 + k**2) < 100).astype(np.uint8))
node = mrml.segmentation_node_from_labels(
    ball, [{"value": 1, "name": "Ball", "color": [1, 0, 0]}], slicer.vtkMRMLScene(), "ball"
)
print("surface", node.CreateClosedSurfaceRepresentation())
"""


def test_the_first_segmentation_of_a_fresh_process_can_be_shown_in_3d():
    # A segmentation takes the converters registered when it is made; outside the desktop
    # (slicer-core, scripts) they are registered by the module logic, which must come first.
    import os
    import subprocess
    import sys
    from pathlib import Path

    library = str(Path(mrml.__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-c", FIRST_SEGMENTATION_IN_3D],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": library},
    )
    assert "surface True" in done.stdout, done.stdout + done.stderr
