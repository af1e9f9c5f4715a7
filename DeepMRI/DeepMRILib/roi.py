"""A markups ROI as a box of voxels of an input volume, and the crop/paste that goes with it.

The box is found here (it needs MRML: the ROI's frame and the volume's parent transforms); cropping
the inputs and pasting the outputs back onto the full grid are plain image operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from deepmri.errors import DeepMRIError

from DeepMRILib import mrml


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
            "move it over the anatomy to process."
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


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within `tolerance`)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )
