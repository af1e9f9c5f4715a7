"""Binary masks as voxel arrays: NumPy and SciPy only.

Kept apart from `deepmri.geometry` (SimpleITK) so that training, which shares these definitions
with inference, runs where SimpleITK is not installed (the lent GPU machine).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def distance_outside_mm(inside: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from every voxel to the nearest voxel of `inside` (0 on it).

    `inside` is a (z, y, x) array and `spacing` the (x, y, z) voxel size SimpleITK gives: the
    one definition of "mm from the brain" that training labels and inference share.
    """
    from scipy import ndimage

    return ndimage.distance_transform_edt(~inside, sampling=tuple(spacing)[::-1])
