"""Output grids for super-resolution: the input's physical extent at a new spacing, and resampling onto it.

"Same physical extent" here means: the output has the input's direction, the box its voxels cover
(from the outer edge of the first voxel to the outer edge of the last) has the same centre, and it
holds round(extent / spacing) voxels of exactly the spacing asked for along each axis. When the
extent is a whole number of new voxels (always so for an integer factor) the two boxes coincide
exactly: the first output voxel's outer edge is the first input voxel's outer edge. Otherwise the
output box is shorter or longer by under one output voxel, shared equally between the two ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from deepmri.errors import DeepMRIError

# Spacing ratio (thick / finest in-plane) under which a volume counts as isotropic already.
ISOTROPIC_RATIO = 1.2


class AlreadyIsotropicError(DeepMRIError):
    """The volume has no thick axis to super-resolve."""


@dataclass(frozen=True)
class Grid:
    """A voxel grid in physical (LPS) space: what an output image will have, before it exists."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(
            tuple(int(value) for value in image.GetSize()),
            tuple(float(value) for value in image.GetSpacing()),
            tuple(float(value) for value in image.GetOrigin()),
            tuple(float(value) for value in image.GetDirection()),
        )

    def image(self, array: np.ndarray) -> sitk.Image:
        """`array` (k, j, i) as an image on this grid."""
        if tuple(array.shape[::-1]) != self.size:
            raise ValueError(f"array {array.shape[::-1]} does not fit grid {self.size}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def extent(self) -> np.ndarray:
        return np.asarray(self.size) * np.asarray(self.spacing)

    def centre(self) -> np.ndarray:
        """The physical centre of the box the voxels cover."""
        direction = np.asarray(self.direction).reshape(3, 3)
        half = (np.asarray(self.size) - 1) * np.asarray(self.spacing) / 2.0
        return np.asarray(self.origin) + direction @ half


def thick_axis(image: sitk.Image) -> int:
    """The through-plane axis (0, 1, 2 in SimpleITK's i, j, k order); refuses isotropic volumes."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    axis = int(np.argmax(spacing))
    in_plane = np.delete(spacing, axis)
    ratio = spacing[axis] / in_plane.max()
    if ratio < ISOTROPIC_RATIO:
        spacing_text = " x ".join(f"{value:g}" for value in spacing)
        raise AlreadyIsotropicError(
            f"The volume is already (nearly) isotropic ({spacing_text} mm): super-resolution "
            "restores thin slices from thick ones and needs one axis at least "
            f"{ISOTROPIC_RATIO:g}x coarser than the other two. To change the voxel size of an "
            "isotropic volume, resample it instead (Slicer: Resample Scalar Volume)."
        )
    return axis


def default_spacing(image: sitk.Image, axis: int) -> tuple[float, float, float]:
    """In-plane spacing kept; the thick axis takes the mean in-plane spacing (near-isotropic)."""
    spacing = list(image.GetSpacing())
    spacing[axis] = float(np.mean(np.delete(np.asarray(spacing), axis)))
    return tuple(spacing)


def target_spacing(
    image: sitk.Image,
    axis: int,
    spacing: Sequence[float] | None = None,
    factor: float | None = None,
) -> tuple[float, float, float]:
    """The spacing asked for: explicit, or the thick axis divided by `factor`, or near-isotropic."""
    if spacing is not None and factor is not None:
        raise DeepMRIError("Give either a target spacing or a factor, not both.")
    if factor is not None:
        if not factor > 1.0:
            raise DeepMRIError(f"The super-resolution factor must be above 1, not {factor:g}.")
        values = list(image.GetSpacing())
        values[axis] = values[axis] / float(factor)
        return tuple(float(value) for value in values)
    if spacing is None:
        return default_spacing(image, axis)
    values = tuple(float(value) for value in spacing)
    if len(values) != 3 or not all(0.01 <= value <= 50 for value in values):
        raise DeepMRIError(
            f"The target spacing must be three values in mm between 0.01 and 50, not {values}."
        )
    return values


def output_grid(image: sitk.Image, spacing: Sequence[float]) -> Grid:
    """The input's physical extent (same centre and direction) at `spacing` (see module doc)."""
    grid = Grid.of(image)
    new_spacing = np.asarray(spacing, dtype=float)
    size = np.maximum(np.round(grid.extent() / new_spacing - 1e-9), 1).astype(int)
    direction = np.asarray(grid.direction).reshape(3, 3)
    origin = grid.centre() - direction @ ((size - 1) * new_spacing / 2.0)
    return Grid(
        tuple(int(value) for value in size),
        tuple(float(value) for value in new_spacing),
        tuple(float(value) for value in origin),
        grid.direction,
    )


INTERPOLATORS = {
    "cubic": sitk.sitkBSpline,
    "sinc": sitk.sitkHammingWindowedSinc,
    "linear": sitk.sitkLinear,
}


def interpolate_along(
    image: sitk.Image, grid: Grid, axis: int, interpolation: str = "sinc"
) -> sitk.Image:
    """`resample_onto` for a grid that differs from the image's only along `axis`, made cheap.

    Every other axis keeps its sample positions, so a separable kernel (SimpleITK's windowed sinc
    or B-spline) weighs only the samples along `axis` there, and the interpolation is one linear
    map along that axis. Its matrix is what SimpleITK makes of unit impulses (an identity image
    resampled the same way), so the values are SimpleITK's, boundary rule included.
    """
    source = Grid.of(image)
    if any(
        source.size[other] != grid.size[other] or source.spacing[other] != grid.spacing[other]
        for other in range(3)
        if other != axis
    ):
        raise ValueError("interpolate_along needs grids that differ only along one axis")
    matrix = interpolation_matrix(
        source.size[axis], source.spacing[axis], grid.size[axis], grid.spacing[axis], interpolation
    )
    values = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    moved = np.moveaxis(values, 2 - axis, -1)
    result = moved @ matrix.T.astype(np.float32)
    return grid.image(np.ascontiguousarray(np.moveaxis(result, -1, 2 - axis)))


def interpolation_matrix(
    count: int, step: float, new_count: int, new_step: float, interpolation: str
) -> np.ndarray:
    """SimpleITK's interpolation from `count` samples to `new_count` on the same centred extent.

    Rows: new samples; columns: old ones. Found by resampling unit impulses (an identity image
    whose second axis is the one interpolated); points past the end samples extrapolate.
    """
    impulses = sitk.GetImageFromArray(np.eye(count, dtype=np.float32))
    impulses.SetSpacing((1.0, step))
    first = (count * step - new_count * new_step) / 2.0 + new_step / 2.0 - step / 2.0
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([count, new_count])
    resampler.SetOutputSpacing((1.0, new_step))
    resampler.SetOutputOrigin((0.0, first))
    resampler.SetInterpolator(INTERPOLATORS[interpolation])
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(resampler.Execute(impulses)).astype(np.float64)


def resample_onto(image: sitk.Image, grid: Grid, interpolation: str = "cubic") -> sitk.Image:
    """`image` resampled onto `grid` (float32); points past the last slice centre extrapolate.

    "cubic" is cubic B-spline interpolation, "sinc" a Hamming-windowed sinc (SimpleITK's).
    """
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(list(grid.size))
    resampler.SetOutputSpacing(grid.spacing)
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(INTERPOLATORS[interpolation])
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return resampler.Execute(sitk.Cast(image, sitk.sitkFloat32))
