"""Slice profiles and the 1-D linear operators of thick-slice acquisition: blur-and-sample, cubic upsampling.

A thick-slice scan samples the true anatomy through a slice profile (Gaussian-like or rectangular)
at slice centres one spacing apart; both that degradation and cubic B-spline interpolation back to a
fine grid are linear along one axis, so each is a small matrix applied along that axis.

Examples:
    >>> profile = SliceProfile(thickness=4.0, spacing=4.0)
    >>> weights = degradation_matrix(fine_count=16, fine_spacing=1.0, profile=profile)
    >>> weights.shape
    (4, 16)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates
from scipy.special import erf

from deepmri.errors import DeepMRIError

PROFILE_SHAPES = ("gaussian", "rect")
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class SliceProfile:
    """How one thick slice was acquired: nominal thickness, centre-to-centre spacing, shape (mm).

    `gaussian`: the profile is a Gaussian whose full width at half maximum is the thickness;
    `rect`: a box of width `thickness`. The gap between slices is `spacing - thickness`.
    """

    thickness: float
    spacing: float
    shape: str = "gaussian"

    def __post_init__(self) -> None:
        if self.shape not in PROFILE_SHAPES:
            raise DeepMRIError(
                f"The slice profile must be one of {', '.join(PROFILE_SHAPES)}, not '{self.shape}'."
            )
        if not (self.thickness > 0 and self.spacing > 0):
            raise DeepMRIError(
                f"Slice thickness ({self.thickness} mm) and spacing ({self.spacing} mm) must be "
                "positive."
            )

    @property
    def gap(self) -> float:
        return self.spacing - self.thickness

    @classmethod
    def from_header(
        cls,
        spacing: float,
        thickness: float | None = None,
        gap: float | None = None,
        shape: str = "gaussian",
    ) -> SliceProfile:
        """The profile of slices `spacing` mm apart; thickness or gap as the user knows them.

        With neither, slices are contiguous (thickness = spacing, no gap). With both, they must
        add up to the spacing the header says.
        """
        if thickness is None and gap is None:
            thickness = spacing
        elif thickness is None:
            thickness = spacing - float(gap)
        elif gap is not None and abs(float(thickness) + float(gap) - spacing) > 1e-3 * spacing:
            raise DeepMRIError(
                f"Slice thickness {thickness} mm plus gap {gap} mm does not match the slice "
                f"spacing in the image header ({spacing:g} mm); give only one of them."
            )
        if thickness <= 0:
            raise DeepMRIError(
                f"A slice gap of {gap} mm leaves no slice thickness at a spacing of {spacing:g} mm."
            )
        return cls(thickness=float(thickness), spacing=float(spacing), shape=shape)

    def weights(self, edges: np.ndarray, centre: float) -> np.ndarray:
        """The share of this profile (centred at `centre`) that falls in each [edge_i, edge_i+1)."""
        lower, upper = edges[:-1] - centre, edges[1:] - centre
        if self.shape == "gaussian":
            sigma = self.thickness * _FWHM_TO_SIGMA
            scale = 1.0 / (sigma * math.sqrt(2.0))
            return 0.5 * (erf(upper * scale) - erf(lower * scale))
        half = self.thickness / 2.0
        return np.clip(np.minimum(upper, half) - np.maximum(lower, -half), 0.0, None) / (
            self.thickness
        )


def slice_centres(extent: float, spacing: float) -> np.ndarray:
    """Centres (mm from the first edge) of as many slices of `spacing` as fit, centred in `extent`."""
    count = max(1, int(math.floor(extent / spacing + 1e-6)))
    offset = (extent - count * spacing) / 2.0
    return offset + (np.arange(count) + 0.5) * spacing


def degradation_matrix(
    fine_count: int,
    fine_spacing: float,
    profile: SliceProfile,
    centres: np.ndarray | None = None,
) -> np.ndarray:
    """Rows: one thick slice each, as weights over the fine voxels it integrates (rows sum to 1).

    Fine voxel i covers [i, i+1) * fine_spacing mm (its partial overlap with the profile is
    integrated exactly). Slices are centred in the fine extent unless `centres` (mm) are given.
    Near the ends a profile that runs past the data is renormalised over what is there.
    """
    edges = np.arange(fine_count + 1) * fine_spacing
    if centres is None:
        centres = slice_centres(fine_count * fine_spacing, profile.spacing)
    matrix = np.stack([profile.weights(edges, centre) for centre in centres])
    return matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1e-12)


def cubic_matrix(
    coarse_centres: np.ndarray, coarse_spacing: float, positions: np.ndarray
) -> np.ndarray:
    """Cubic B-spline interpolation from evenly spaced samples to `positions` (both mm), as a matrix.

    Rows: positions; columns: samples. Half-sample-symmetric boundaries, so a position inside the
    first or last slice (beyond its centre) is interpolated, not left empty.
    """
    count = len(coarse_centres)
    index = (np.asarray(positions, dtype=float) - coarse_centres[0]) / coarse_spacing
    if count == 1:
        return np.ones((len(index), 1))
    columns = [
        map_coordinates(unit, [index], order=3, mode="reflect")
        for unit in np.eye(count, dtype=float)
    ]
    return np.stack(columns, axis=1)


def apply_along(array: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    """`matrix` (out x in) applied along `axis` of `array`, as float32."""
    moved = np.moveaxis(array, axis, -1).astype(np.float32, copy=False)
    result = moved @ matrix.T.astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(result, -1, axis))


def degrade_and_upsample_matrix(count: int, spacing: float, profile: SliceProfile) -> np.ndarray:
    """Acquire `count` fine voxels as thick slices and interpolate them back (cubic): one matrix.

    This is what the network learns to undo: the in-plane axis of the volume put through the
    through-plane acquisition.
    """
    degrade = degradation_matrix(count, spacing, profile)
    centres = slice_centres(count * spacing, profile.spacing)
    positions = (np.arange(count) + 0.5) * spacing
    return cubic_matrix(centres, profile.spacing, positions) @ degrade


def simulate_thick_slices(
    image: sitk.Image,
    slice_spacing: float,
    thickness: float | None = None,
    shape: str = "gaussian",
    axis: int = 2,
) -> sitk.Image:
    """`image` as a thick-slice scan along `axis` (0, 1, 2 = i, j, k) would have acquired it.

    Slices `slice_spacing` mm apart, each integrating the profile (`thickness` defaults to the
    spacing: no gap), centred in the input's extent along `axis`; other axes and the direction
    are kept. When the extent is a whole number of slices, the two extents are the same.
    """
    profile = SliceProfile(float(thickness or slice_spacing), float(slice_spacing), shape)
    step = image.GetSpacing()[axis]
    count = image.GetSize()[axis]
    centres = slice_centres(count * step, profile.spacing)
    matrix = degradation_matrix(count, step, profile, centres)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    thick = sitk.GetImageFromArray(apply_along(array, matrix, 2 - axis))
    spacing = list(image.GetSpacing())
    spacing[axis] = profile.spacing
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction[:, axis] * (centres[0] - step / 2.0)
    thick.SetSpacing(spacing)
    thick.SetOrigin(tuple(float(value) for value in origin))
    thick.SetDirection(image.GetDirection())
    return thick
