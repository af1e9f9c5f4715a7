"""The one validation every task runs on its input before any work starts.

Each check raises `InvalidImageError` with what is wrong and what to do, so bad input fails in
a second with a clear message instead of minutes later inside a network.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from deepmri.errors import InvalidImageError


def _describe_size(image: sitk.Image) -> str:
    return "x".join(str(size) for size in image.GetSize())


def validate_image(image: sitk.Image, name: str = "The input") -> None:
    """Check that an image is a finite, non-empty 3D scalar volume with sane geometry.

    Raises:
        InvalidImageError: naming the first problem found and how to fix it.

    Examples:
        >>> validate_image(sitk.Image([8, 8, 8], sitk.sitkFloat32) + 1.0)
    """
    if not isinstance(image, sitk.Image):
        raise InvalidImageError(f"{name} is a {type(image).__name__}, not an image.")
    dimension = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidImageError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector or "
            "colour image); this needs a single-channel (scalar) 3D MRI. Extract one channel first."
        )
    if dimension == 2:
        raise InvalidImageError(
            f"{name} is 2D ({_describe_size(image)}); this needs a 3D volume. Load the whole series, "
            "not a single slice."
        )
    if dimension == 4:
        raise InvalidImageError(
            f"{name} is 4D ({_describe_size(image)}), for example a time series or multi-echo scan; "
            "this needs a 3D volume. Extract one 3D frame first."
        )
    if dimension != 3:
        raise InvalidImageError(f"{name} is {dimension}D; this needs a 3D volume.")
    if min(image.GetSize()) < 2:
        raise InvalidImageError(
            f"{name} has a single slice ({_describe_size(image)}); this needs a 3D volume."
        )
    _check_geometry(image, name)
    _check_values(image, name)


def _check_geometry(image: sitk.Image, name: str) -> None:
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InvalidImageError(
            f"{name} has invalid voxel spacing {tuple(spacing)}; fix its header."
        )
    if np.any(spacing > 50) or np.any(spacing < 0.01):
        raise InvalidImageError(
            f"{name} has voxel spacing {tuple(np.round(spacing, 4))} mm, which is not a plausible "
            "MRI spacing; check the units in its header."
        )
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
        raise InvalidImageError(
            f"{name} has a direction matrix that is not orthonormal (sheared geometry); resample it "
            "to an orthogonal grid first."
        )


def _check_values(image: sitk.Image, name: str) -> None:
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating):
        nan_count = int(np.isnan(values).sum())
        inf_count = int(np.isinf(values).sum())
        if nan_count or inf_count:
            raise InvalidImageError(
                f"{name} contains {nan_count} NaN and {inf_count} infinite voxels; replace them "
                "(for example with 0) before processing."
            )
    if values.size == 0 or values.min() == values.max():
        raise InvalidImageError(
            f"{name} is empty: every voxel has the value {values.flat[0] if values.size else 'none'}."
        )
