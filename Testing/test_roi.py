"""The core ROI helpers: a box from physical corners, crop, paste back onto the full grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_oblique_image
from deepmri.geometry import same_geometry
from deepmri.roi import ROIError, box_from_points, crop, paste, paste_result
from deepmri.tasks import TaskResult


def test_a_box_from_physical_corners_covers_them_on_an_oblique_grid():
    image = make_oblique_image()
    corners = [image.TransformIndexToPhysicalPoint(index) for index in [(3, 4, 2), (20, 30, 9)]]
    box = box_from_points(image, corners)
    assert (box.start, box.stop) == ((3, 4, 2), (21, 31, 10))
    part = crop(image, box)
    # The crop stays where it was in physical space, voxel for voxel.
    assert part.GetOrigin() == pytest.approx(image.TransformIndexToPhysicalPoint((3, 4, 2)))
    assert part.GetPixel(0, 0, 0) == image.GetPixel(3, 4, 2)
    assert part.GetDirection() == image.GetDirection()


def test_paste_puts_the_part_back_with_background_outside():
    image = make_oblique_image()
    box = box_from_points(
        image, [image.TransformIndexToPhysicalPoint(i) for i in [(5, 5, 5), (9, 9, 9)]]
    )
    pasted = paste(crop(image, box), image, box)
    assert same_geometry(pasted, image, tolerance=0.0)
    values, original = sitk.GetArrayFromImage(pasted), sitk.GetArrayFromImage(image)
    np.testing.assert_array_equal(values[box.slices()], original[box.slices()])
    assert values.sum() == pytest.approx(original[box.slices()].sum())


def test_paste_result_restores_images_on_the_crop_grid_and_keeps_the_rest():
    image = make_oblique_image()
    box = box_from_points(
        image, [image.TransformIndexToPhysicalPoint(i) for i in [(2, 2, 2), (12, 12, 8)]]
    )
    part = crop(image, box)
    other_grid = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    result = TaskResult("t", images={"labels": part > 100, "coarse": other_grid}, info={"a": 1})
    full = paste_result(result, image, box, part)
    assert same_geometry(full.images["labels"], image, tolerance=0.0)
    assert full.images["coarse"] is other_grid
    assert full.info == {"a": 1, "crop_box": [[2, 2, 2], [13, 13, 9]]}


def test_a_box_that_misses_the_image_is_refused():
    image = make_oblique_image()
    far = [(1000.0, 1000.0, 1000.0), (1100.0, 1100.0, 1100.0)]
    with pytest.raises(ROIError, match="does not overlap"):
        box_from_points(image, far)
