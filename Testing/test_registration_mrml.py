"""Registration transforms in MRML (slicer-core): nodes map points as the core says, and a moving
volume hardened under the node is the core's warped volume.

ITK maps fixed points to moving points in LPS; Slicer stores that as the transform "from parent"
in RAS. Checked with Slicer's own transform classes on oblique grids, linear and deformable.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from conftest import make_oblique_image  # noqa: E402
from deepmri.registration.fields import compose  # noqa: E402
from DeepMRILib import mrml  # noqa: E402

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(True)


def registration_like() -> tuple[sitk.Image, sitk.Image, sitk.AffineTransform, sitk.Image]:
    """Oblique fixed and moving grids, an affine and a smooth field on the fixed grid."""
    fixed = make_oblique_image(size=(30, 28, 20), spacing=(1.5, 1.2, 2.0), seed=1)
    moving = sitk.SmoothingRecursiveGaussian(make_oblique_image(seed=2), 2.0)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.04, 0.05, 0.0, -0.03, 0.97, 0.06, 0.02, -0.04, 1.01))
    affine.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([14.5, 13.5, 9.5]))
    centre_moving = moving.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in moving.GetSize()]
    )
    affine.SetTranslation(tuple(np.subtract(centre_moving, affine.GetCenter())))
    index = np.indices(fixed.GetSize()[::-1], dtype=float)  # k, j, i
    vectors = np.stack(
        [
            2.0 * np.sin(index[2] / 6.0),
            1.5 * np.cos(index[1] / 5.0),
            1.0 * np.sin((index[0] + index[2]) / 7.0),
        ],
        axis=-1,
    )
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(fixed)
    return fixed, moving, affine, field


def from_parent_ras(node, point_lps) -> np.ndarray:
    transform = node.GetTransformFromParent()
    return np.asarray(transform.TransformPoint(tuple(np.asarray(point_lps) * LPS_TO_RAS)))


def fixed_voxel_points(fixed: sitk.Image, count: int = 60) -> list[tuple[float, ...]]:
    rng = np.random.default_rng(0)
    return [
        fixed.TransformIndexToPhysicalPoint([int(rng.integers(1, s - 1)) for s in fixed.GetSize()])
        for _ in range(count)
    ]


def test_linear_and_deformable_nodes_map_points_like_the_core(scene):
    fixed, _, affine, field = registration_like()
    composite = compose(affine, field)
    linear_node = mrml.transform_node_from_transform(affine, scene, "affine")
    grid_node = mrml.transform_node_from_transform(
        composite, scene, "deformable", reference_image=fixed
    )
    assert linear_node.IsA("vtkMRMLLinearTransformNode")
    assert grid_node.IsA("vtkMRMLGridTransformNode")
    for point in fixed_voxel_points(fixed):
        expected_linear = np.asarray(affine.TransformPoint(point)) * LPS_TO_RAS
        expected = np.asarray(composite.TransformPoint(point)) * LPS_TO_RAS
        np.testing.assert_allclose(from_parent_ras(linear_node, point), expected_linear, atol=1e-6)
        np.testing.assert_allclose(from_parent_ras(grid_node, point), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "deformable"])
def test_moving_volume_hardened_under_the_node_is_the_cores_warped_volume(scene, kind):
    fixed, moving, affine, field = registration_like()
    transform = affine if kind == "linear" else compose(affine, field)
    node = mrml.volume_node_from_image(moving, scene, "moving")
    transform_node = mrml.transform_node_from_transform(
        transform, scene, "registration", reference_image=fixed
    )
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    assert slicer.vtkSlicerTransformLogic().hardenTransform(node)
    hardened = mrml.image_from_volume_node(node)
    # The core's warped volume, and the hardened one looked up at the same fixed voxels.
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear))
    in_slicer = sitk.GetArrayFromImage(
        sitk.Resample(hardened, fixed, sitk.Transform(), sitk.sitkLinear, np.nan)
    )
    mapped = (
        np.array(
            [
                moving.TransformPhysicalPointToContinuousIndex(
                    transform.TransformPoint(fixed.TransformIndexToPhysicalPoint(index))
                )
                for index in np.ndindex(*fixed.GetSize())
            ]
        )
        .reshape(*fixed.GetSize(), 3)
        .transpose(2, 1, 0, 3)
    )
    inside = np.all(mapped >= 2, axis=-1) & np.all(
        mapped <= np.array(moving.GetSize()) - 3, axis=-1
    )
    inside &= np.isfinite(in_slicer)
    assert inside.sum() > 2000
    # Linear: Slicer only moves the volume (exact); grid: Slicer resamples once more on its own
    # grid, so the comparison carries one extra linear interpolation of a smooth image.
    tolerance = 1e-3 if kind == "linear" else 0.02 * float(np.ptp(warped[inside]))
    difference = np.abs(in_slicer[inside] - warped[inside])
    assert float(np.median(difference)) < tolerance, (kind, float(np.median(difference)))
    assert np.corrcoef(in_slicer[inside], warped[inside])[0, 1] > 0.98
