"""Displacement fields as SimpleITK transforms, and where they are implausible (Jacobian, folding).

ITK's convention throughout: a registration transform maps points of the fixed image to points
of the moving image, in LPS millimetres, so `sitk.Resample(moving, fixed, transform)` warps.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def displacement_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A `DisplacementFieldTransform` (linear interpolation) over a copy of `field`."""
    # The constructor takes the image's buffer; copy so the caller's image stays intact.
    copy = sitk.Cast(field, sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(copy)
    transform.SetInterpolator(sitk.sitkLinear)
    return transform


def compose(linear: sitk.Transform | None, field: sitk.Image | None) -> sitk.Transform:
    """The fixed->moving transform x -> linear(x + u(x)) as one SimpleITK transform.

    A `CompositeTransform` applies its last transform first, so the field comes last.
    """
    transforms: list[sitk.Transform] = []
    if linear is not None:
        transforms.append(linear)
    if field is not None:
        transforms.append(displacement_transform(field))
    if not transforms:
        return sitk.Transform(3, sitk.sitkIdentity)
    return sitk.CompositeTransform(transforms)


def jacobian_determinant(field: sitk.Image) -> sitk.Image:
    """det(I + grad u) of the map x -> x + u(x) on the field's grid (float32, same geometry).

    Computed in index space, which has the same determinant as physical space (the grid's
    spacing and direction are a similarity that cancels). Values <= 0 mark folding.
    """
    vectors = sitk.GetArrayViewFromImage(field)  # (k, j, i, 3) in LPS mm
    direction = np.asarray(field.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(field.GetSpacing(), dtype=np.float64)
    # Displacement in voxels along i, j, k: S^-1 D^T u.
    to_index = (direction / spacing).T  # rows: i, j, k
    gradients = np.empty((3, 3, *vectors.shape[:3]), dtype=np.float32)
    for row in range(3):
        component = (vectors @ to_index[row]).astype(np.float32)  # (k, j, i)
        along_k, along_j, along_i = np.gradient(component)
        gradients[row, 0], gradients[row, 1], gradients[row, 2] = along_i, along_j, along_k
        gradients[row, row] += 1.0
    g = gradients
    determinant = (
        g[0, 0] * (g[1, 1] * g[2, 2] - g[1, 2] * g[2, 1])
        - g[0, 1] * (g[1, 0] * g[2, 2] - g[1, 2] * g[2, 0])
        + g[0, 2] * (g[1, 0] * g[2, 1] - g[1, 1] * g[2, 0])
    )
    image = sitk.GetImageFromArray(determinant.astype(np.float32))
    image.CopyInformation(field)
    return image


def folding_percent(jacobian: sitk.Image, mask: sitk.Image | None = None) -> float:
    """Percentage of voxels (inside `mask`, if given) where the Jacobian determinant is <= 0."""
    values = sitk.GetArrayViewFromImage(jacobian)
    if mask is not None:
        values = values[sitk.GetArrayViewFromImage(mask) > 0]
    if values.size == 0:
        return 0.0
    return float(100.0 * np.count_nonzero(values <= 0) / values.size)
