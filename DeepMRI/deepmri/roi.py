"""A region of interest as a box of voxels: crop the inputs to it, paste the outputs back.

Front doors find the box their own way (Slicer from a markups ROI, a script from physical points)
and hand the corners here in LPS millimetres; everything after that is plain image work, so it
lives in the core and every task's outputs go back onto the full input grid the same way.

Examples:
    >>> import SimpleITK as sitk
    >>> image = sitk.Image([20, 20, 10], sitk.sitkFloat32)
    >>> box = box_from_points(image, [(2.0, 3.0, 1.0), (9.0, 12.0, 4.0)])
    >>> box
    CropBox(start=(2, 3, 1), stop=(10, 13, 5))
    >>> paste(crop(image, box), image, box).GetSize()
    (20, 20, 10)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from deepmri.errors import DeepMRIError
from deepmri.geometry import same_geometry
from deepmri.tasks.base import TaskResult


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

    def to_list(self) -> list[list[int]]:
        """[[start], [stop]], as result.info["crop_box"] records it."""
        return [list(self.start), list(self.stop)]


def box_from_points(
    image: sitk.Image, points_lps: Iterable[Sequence[float]], name: str = "The region of interest"
) -> CropBox:
    """The voxels of `image` covered by the bounding box of physical points (LPS, mm).

    Pass the 8 corners of an oriented ROI; the box is rounded outwards to whole voxels and
    clipped to the image. An ROI that misses the image raises `ROIError`.
    """
    indices = np.array(
        [
            image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point))
            for point in points_lps
        ]
    )
    size = np.array(image.GetSize())
    start = np.clip(np.floor(indices.min(axis=0) + 0.5).astype(int), 0, size)
    stop = np.clip(np.floor(indices.max(axis=0) + 0.5).astype(int) + 1, 0, size)
    if np.any(stop <= start):
        raise ROIError(
            f"{name} does not overlap the input volume; move it over the anatomy to process."
        )
    return CropBox(tuple(int(v) for v in start), tuple(int(v) for v in stop))


def crop(image: sitk.Image, box: CropBox) -> sitk.Image:
    """The sub-image in `box`, with its origin moved so it stays in place in physical space."""
    (i0, j0, k0), (i1, j1, k1) = box.start, box.stop
    return image[i0:i1, j0:j1, k0:k1]


def paste(part: sitk.Image, full_grid: sitk.Image, box: CropBox) -> sitk.Image:
    """`part` placed back at `box` in a zero image on `full_grid`'s grid (same pixel type)."""
    array = sitk.GetArrayViewFromImage(part)
    full = np.zeros(full_grid.GetSize()[::-1] + array.shape[3:], dtype=array.dtype)
    full[box.slices()] = array
    image = sitk.GetImageFromArray(full, isVector=part.GetNumberOfComponentsPerPixel() > 1)
    image.CopyInformation(full_grid)
    return image


def same_grid(first: sitk.Image, second: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within `tolerance`)."""
    return same_geometry(first, second, tolerance)


def paste_result(
    result: TaskResult, full_grid: sitk.Image, box: CropBox, cropped_grid: sitk.Image
) -> TaskResult:
    """A `TaskResult` computed on a crop, as it would be on the whole input.

    Images on the cropped grid go back into zeros (background) on `full_grid`; images on any
    other grid (a task with its own output grid) and transforms are kept as they are; the box
    is recorded in `info["crop_box"]`.
    """
    images = {
        key: paste(image, full_grid, box) if same_grid(image, cropped_grid) else image
        for key, image in result.images.items()
    }
    info = {**result.info, "crop_box": box.to_list()}
    return TaskResult(result.task, images, dict(result.transforms), dict(result.measures), info)
