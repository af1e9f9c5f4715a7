"""Geometry helpers: reorientation and resampling that keep the physical space exact.

Tasks move the input to the model's grid (orientation, spacing) and results back to the exact
input grid with these, so a segmentation overlays its input voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk


def reorient(image: sitk.Image, orientation: str = "RAS") -> sitk.Image:
    """Permute/flip axes so the array axes follow `orientation` (ITK's convention, e.g. 'LPS')."""
    return sitk.DICOMOrient(image, orientation)


def resample_to_spacing(
    image: sitk.Image,
    spacing: Sequence[float],
    interpolator: int = sitk.sitkLinear,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample to a new spacing over the same physical extent, same origin and direction."""
    old_spacing = np.asarray(image.GetSpacing(), dtype=float)
    new_spacing = np.asarray(spacing, dtype=float)
    old_size = np.asarray(image.GetSize(), dtype=float)
    new_size = np.maximum(np.round(old_size * old_spacing / new_spacing), 1).astype(int)
    # Keep the physical centre of the field of view where it was.
    old_centre = (old_size - 1) * old_spacing / 2
    new_centre = (new_size - 1) * new_spacing / 2
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction @ (old_centre - new_centre)
    return sitk.Resample(
        image,
        [int(size) for size in new_size],
        sitk.Transform(),
        interpolator,
        tuple(origin),
        tuple(float(value) for value in new_spacing),
        image.GetDirection(),
        default_value,
        image.GetPixelID(),
    )


def resample_like(
    image: sitk.Image,
    reference: sitk.Image,
    interpolator: int = sitk.sitkLinear,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample `image` onto the exact grid (size, spacing, origin, direction) of `reference`."""
    return sitk.Resample(
        image, reference, sitk.Transform(), interpolator, default_value, image.GetPixelID()
    )


def same_geometry(first: sitk.Image, second: sitk.Image, tolerance: float = 1e-6) -> bool:
    """True if two images share size, spacing, origin and direction (to `tolerance`)."""
    return (
        first.GetSize() == second.GetSize()
        and np.allclose(first.GetSpacing(), second.GetSpacing(), atol=tolerance)
        and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=tolerance)
        and np.allclose(first.GetDirection(), second.GetDirection(), atol=tolerance)
    )
