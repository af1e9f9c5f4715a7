"""Intensity normalisation shared by training and inference, so models see the same value range.

Kept free of torch and training extras so the segmentation task imports it cheaply.
"""

from __future__ import annotations

import numpy as np


def normalize_percentile(
    array: np.ndarray,
    lower: float = 0.5,
    upper: float = 99.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Map the `lower`..`upper` percentiles of the voxels inside `mask` to 0..1, clipping outside.

    Without `mask` the percentiles are taken over voxels > 0 (air and the zero padding of
    skull-stripped or resampled images would otherwise pull the lower percentile to 0 and waste
    the range), falling back to all voxels when none is positive (e.g. inverted contrasts
    shifted below zero). Training and the segmentation task both call this without `mask`.

    Examples:
        >>> import numpy as np
        >>> out = normalize_percentile(np.array([0.0, 10.0, 20.0, 30.0]), lower=0, upper=100)
        >>> [round(float(v), 3) for v in out]
        [0.0, 0.0, 0.5, 1.0]
    """
    values = np.asarray(array, dtype=np.float32)
    region = values > 0 if mask is None else np.asarray(mask, dtype=bool)
    if not region.any():
        region = np.ones(values.shape, dtype=bool)
    low, high = np.percentile(values[region], [lower, upper])
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)
