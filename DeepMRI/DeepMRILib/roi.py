"""A markups ROI node as a box of voxels of an input volume (the crop and paste are `deepmri.roi`).

Finding the box needs MRML: the ROI's own frame, its parent transforms and the volume's; the box
itself, the crop of the inputs and the paste of the outputs are plain image work in the core.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from deepmri.roi import CropBox, ROIError, box_from_points

from DeepMRILib import mrml

__all__ = ["CropBox", "ROIError", "crop_box_from_roi"]


def crop_box_from_roi(image: sitk.Image, roi_node: Any, volume_node: Any | None = None) -> CropBox:
    """The voxels of `image` inside a markups ROI (its bounding box in voxel space).

    The ROI's corners go to world RAS, into the volume's own frame (undoing the volume's parent
    transform, if any) and to LPS; `deepmri.roi.box_from_points` rounds the box outwards and
    clips it.
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
    corners_lps = [mrml.LPS_TO_RAS @ np.asarray(corner) for corner in corners_world]
    return box_from_points(image, corners_lps, f"The region of interest '{roi_node.GetName()}'")
