"""PNG previews: three orthogonal slices of a volume with labels overlaid in their card colours.

Used by the CLI demo and batch so a result can be checked at a glance without a viewer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri.geometry import reorient, resample_to_spacing


def _to_display_grid(image: sitk.Image, interpolator: int) -> np.ndarray:
    """Radiological display: RAS-oriented, 1 mm isotropic, so slices are not squashed."""
    oriented = reorient(image, "RAS")
    spacing = min(min(oriented.GetSpacing()), 1.0)
    return sitk.GetArrayFromImage(resample_to_spacing(oriented, [spacing] * 3, interpolator))


def _grey(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, [0.5, 99.5])
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat(scaled[..., None], 3, axis=-1)


def _three_views(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal central slices, flipped so superior/anterior are up."""
    k, j, i = (size // 2 for size in volume.shape)
    axial = volume[k][::-1, ::-1]  # rows: anterior at top; columns: patient right on the left
    coronal = volume[:, j][::-1, ::-1]
    sagittal = volume[:, :, i][::-1]
    return [axial, coronal, sagittal]


def overlay_png(
    image: sitk.Image,
    path: str | os.PathLike,
    labels: sitk.Image | None = None,
    label_info: Sequence[dict[str, Any]] = (),
    opacity: float = 0.45,
) -> str:
    """Write a PNG of three orthogonal slices of `image`, with `labels` blended in their colours."""
    volume = _to_display_grid(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkLinear)
    grey_views = [_grey(view) for view in _three_views(volume)]
    if labels is not None:
        label_volume = _to_display_grid(labels, sitk.sitkNearestNeighbor)
        colours = {int(info["value"]): np.asarray(info["color"], float) for info in label_info}
        for view, label_view in zip(grey_views, _three_views(label_volume), strict=True):
            for value, colour in colours.items():
                selected = label_view == value
                view[selected] = (1 - opacity) * view[selected] + opacity * colour
    height = max(view.shape[0] for view in grey_views)
    padded = [np.pad(view, ((0, height - view.shape[0]), (0, 4), (0, 0))) for view in grey_views]
    mosaic = (np.concatenate(padded, axis=1) * 255).astype(np.uint8)
    png = sitk.GetImageFromArray(mosaic, isVector=True)
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sitk.WriteImage(png, path)
    return path
