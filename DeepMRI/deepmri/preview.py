"""PNG previews: orthogonal slices of a volume with labels overlaid in their card colours.

Used by the CLI demo and batch so a result can be checked at a glance without a viewer. The
slices go through the centre of the labelled structure (of the volume without labels): axial,
coronal, the mid-sagittal and a parasagittal slice PARASAGITTAL_MM to the right. The exact
midline is the interhemispheric fissure, mostly CSF, where tissue labels look wrong to anyone
expecting cortex; the parasagittal slice shows the cortical ribbon and the mid-sagittal the
brainstem and cerebellum a brain mask must hold.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri.geometry import reorient, resample_to_spacing

PARASAGITTAL_MM = 12.0


def _to_display_grid(image: sitk.Image, interpolator: int) -> tuple[np.ndarray, float]:
    """Radiological display: RAS-oriented, isotropic (1 mm or finer), so slices are not squashed;
    the array and its voxel size in mm."""
    oriented = reorient(image, "RAS")
    spacing = min(min(oriented.GetSpacing()), 1.0)
    resampled = resample_to_spacing(oriented, [spacing] * 3, interpolator)
    return sitk.GetArrayFromImage(resampled), spacing


def _grey(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, [0.5, 99.5])
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0, 1)
    return np.repeat(scaled[..., None], 3, axis=-1)


def _centre(labels: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """(k, j, i) of the labelled voxels' centre, or of the volume where there are none."""
    if labels is None or not labels.any():
        return tuple(size // 2 for size in shape)
    return tuple(int(round(float(c))) for c in np.argwhere(labels > 0).mean(axis=0))


def _views(volume: np.ndarray, centre: Sequence[int], right_voxels: int) -> list[np.ndarray]:
    """Axial, coronal, mid-sagittal and parasagittal (`right_voxels` to the patient's right)
    slices through `centre`, flipped so superior/anterior are up."""
    k, j, i = centre
    parasagittal = int(np.clip(i + right_voxels, 0, volume.shape[2] - 1))  # x runs to the right
    axial = volume[k][::-1, ::-1]  # rows: anterior at top; columns: patient right on the left
    coronal = volume[:, j][::-1, ::-1]
    return [axial, coronal, volume[:, :, i][::-1], volume[:, :, parasagittal][::-1]]


def overlay_png(
    image: sitk.Image,
    path: str | os.PathLike,
    labels: sitk.Image | None = None,
    label_info: Sequence[dict[str, Any]] = (),
    opacity: float = 0.45,
) -> str:
    """Write a PNG of four slices of `image` (module docstring), `labels` blended in colour."""
    volume, spacing = _to_display_grid(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkLinear)
    label_volume = None
    if labels is not None:
        label_volume, _ = _to_display_grid(labels, sitk.sitkNearestNeighbor)
    centre = _centre(label_volume, volume.shape)
    right = int(round(PARASAGITTAL_MM / spacing))
    grey_views = [_grey(view) for view in _views(volume, centre, right)]
    if label_volume is not None:
        colours = {int(info["value"]): np.asarray(info["color"], float) for info in label_info}
        for view, label_view in zip(grey_views, _views(label_volume, centre, right), strict=True):
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
